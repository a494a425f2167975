"""The demo's report generator on small hand-made run logs, and demo.sh's step logic.

The full demo is not run here (minutes); the report reads logs written by the project's own
writers (``utils.logger.JsonlLogger`` and TensorBoard's ``SummaryWriter``), and demo.sh's
``step`` function is exercised on stub commands by sourcing the real script.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from scripts import make_report
from utils.logger import JsonlLogger

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_jsonl_run(run: Path, losses: list, valid: dict, hps: dict) -> None:
    """A run log as the engine writes it: one line per update, one per validation."""
    (run / "log").mkdir(parents=True)
    (run / "log" / "hps.json").write_text(json.dumps(hps))
    log = JsonlLogger()
    log.open(run / "log")
    for step, task, loss in losses:
        log.write(step=step, task=task, loss=loss, lr=1e-4, grad_norm=1.0)
    for step, metrics in valid.items():
        log.write(step=step, final=False, valid=metrics)
    log.close()


def write_tb_run(run: Path, scalars: list, hps: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter
    (run / "log").mkdir(parents=True)
    (run / "log" / "hps.json").write_text(json.dumps(hps))
    writer = SummaryWriter(str(run / "log"))
    for tag, value, step in scalars:
        writer.add_scalar(tag, value, step)
    writer.close()


def msrvtt_inputs(tmp_path: Path) -> dict:
    """A 4-video val corpus (query DB + results file) -> VR chance R@1 = 25 %, R@5 = 100 %."""
    qdb = tmp_path / "msrvtt_val.db"
    qdb.mkdir()
    (qdb / "query_data.jsonl").write_text("".join(
        json.dumps({"desc_id": f"q{i}", "clip_name": f"video{i}"}) + "\n" for i in range(3)))
    return {"val_query_txt_db": str(qdb)}


def one_video_vcmr_inputs(tmp_path: Path) -> dict:
    """One 4-frame video whose GT moment is the whole video: every allowed random moment
    (3 or 4 frames of 1.5 s) has IoU >= 0.75, so chance R@1 at IoU 0.7 is exactly 100 %."""
    qdb, vdb = tmp_path / "tvr_val.db", tmp_path / "video_db_tv"
    qdb.mkdir()
    vdb.mkdir()
    (qdb / "query_data.jsonl").write_text(json.dumps(
        {"desc_id": 7, "vid_name": "v0", "duration": 6.0, "ts": [0.0, 6.0], "type": "v"}) + "\n")
    (vdb / "id2nframe.json").write_text(json.dumps({"v0": 4}))
    return {"val_query_txt_db": str(qdb), "vfeat_db": str(vdb), "min_pred_l": 2,
            "max_pred_l": 16, "vfeat_interval": 1.5, "max_clip_len": 100}


@pytest.fixture()
def demo_dir(tmp_path):
    demo = tmp_path / "demo"
    write_jsonl_run(demo / "pretrain", [(1, "mlm_tv_all", 10.0), (2, "vsm_tv_all", 1.5),
                                        (3, "mlm_tv_all", 9.0)], {}, {})
    qa_key = "val_tvqa/tvqa_val_valid/acc"
    write_jsonl_run(demo / "finetune" / "tvqa_pretrained",
                    [(1, "tvqa", 1.6), (2, "tvqa", 1.5), (2, "tvqa", 1.4)],
                    {2: {qa_key: 0.30}, 4: {qa_key: 0.45}}, {})
    write_tb_run(demo / "finetune" / "tvqa_scratch",
                 [("loss/tvqa", 1.61, 1), ("loss/tvqa_qa", 1.0, 1), ("lr", 1e-4, 1),
                  (qa_key, 0.25, 4)], {})
    vr = "valid_val_VR/VR_r{}"
    msr = msrvtt_inputs(tmp_path)
    write_jsonl_run(demo / "finetune" / "msrvtt_video_only_pretrained",
                    [(1, "msrvtt_video_only", 0.9)],
                    {4: {vr.format(1): 50.0, vr.format(5): 100.0, vr.format(10): 100.0}}, msr)
    results = demo / "finetune" / "msrvtt_video_only_pretrained" / "results"
    results.mkdir()
    (results / "val_results_4_rank0.json").write_text(json.dumps(
        {"video2idx": {f"video{i}": i for i in range(4)}, "VR": []}))
    write_jsonl_run(demo / "finetune" / "tvr_scratch", [(1, "tvr", 2.0)],
                    {4: {"valid_val_VCMR/VCMR_0.7-r10": 12.5}}, one_video_vcmr_inputs(tmp_path))
    (demo / "timings.tsv").write_text("generate toy corpus\t5\tbuilt\npre-train\t0\treused\n")
    return demo


def rows_by(rows, task_prefix):
    return {r["metric"]: r for r in rows if r["task"].startswith(task_prefix)}


def test_report_reads_both_log_kinds_and_computes_chance(demo_dir, capsys):
    path = make_report.main(["--demo_dir", str(demo_dir)])
    rows, _ = make_report.collect(demo_dir)
    qa = rows_by(rows, "TVQA")["accuracy"]
    assert qa["pretrained"] == pytest.approx(45.0)      # last validation, in %
    assert qa["scratch"] == pytest.approx(25.0)         # read back from TensorBoard events
    assert qa["chance"] == pytest.approx(20.0)
    msr = rows_by(rows, "MSR-VTT")
    assert msr["VR R@1"]["pretrained"] == pytest.approx(50.0)
    assert msr["VR R@1"]["scratch"] is None             # run missing
    assert msr["VR R@1"]["chance"] == pytest.approx(25.0)
    assert msr["VR R@5"]["chance"] == pytest.approx(100.0)
    tvr = rows_by(rows, "TVR")
    assert tvr["VCMR R@10 IoU0.7"]["scratch"] == pytest.approx(12.5)
    assert tvr["VCMR R@10 IoU0.7"]["chance"] == pytest.approx(100.0)
    report = path.read_text()
    assert "| TVQA | accuracy | 45.00 | 25.00 | 20.00 |" in report
    assert "| **total** | **5** | |" in report
    for name in ("loss_pretrain", "loss_tvqa", "metrics"):
        png = demo_dir / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"(plots/{name}.png)" in report
    out = capsys.readouterr().out
    assert "TVQA" in out and "45.00" in out and "report:" in out


def test_jsonl_log_keeps_the_last_record_of_a_step(demo_dir):
    run = make_report.read_run(demo_dir / "finetune" / "tvqa_pretrained")
    assert run.source == "metrics.jsonl"
    assert run.losses["tvqa"] == [(1, 1.6), (2, 1.4)]
    assert run.valid["val_tvqa/tvqa_val_valid/acc"] == [(2, 0.30), (4, 0.45)]
    tb = make_report.read_run(demo_dir / "finetune" / "tvqa_scratch")
    assert tb.source == "tensorboard"
    assert set(tb.losses) == {"tvqa"}                   # components and lr are not losses
    assert tb.losses["tvqa"][0][1] == pytest.approx(1.61)


def test_report_refuses_a_missing_demo_dir(tmp_path):
    with pytest.raises(SystemExit, match="make demo"):
        make_report.main(["--demo_dir", str(tmp_path / "absent")])


def run_steps(out: Path, body: str) -> subprocess.CompletedProcess:
    """Source the real demo.sh (its main does not run) and call its functions."""
    script = f'source scripts/demo.sh\nOUT="{out}"\nN_STEPS=2\nmkdir -p "$OUT"\n{body}\n'
    return subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=30)


def test_demo_step_reuses_a_finished_step(tmp_path):
    out, counter = tmp_path / "out", tmp_path / "count"
    body = f'step "stub build" bash -c "echo x >> {counter}"'
    first = run_steps(out, body)
    second = run_steps(out, body)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert counter.read_text() == "x\n"                 # the command ran once
    assert "[1/2] stub build" in first.stdout and "done in" in first.stdout
    assert "stub build: already built, reusing it" in second.stdout
    built = (out / ".steps" / "stub_build.done").read_text().strip()
    assert built.isdigit()                              # the build time, reported on reuse
    assert (out / "timings.tsv").read_text().splitlines()[-1] == f"stub build\t{built}\treused"


def test_demo_step_rebuilds_when_its_inputs_change(tmp_path):
    out, counter, cfg = tmp_path / "out", tmp_path / "count", tmp_path / "cfg.json"
    body = (f'key=$(inputs_key prev {cfg})\n'
            f'STEP_KEY=$key step "stub train" bash -c "echo x >> {counter}"')
    cfg.write_text('{"learning_rate": 1e-3}')
    first, same = run_steps(out, body), run_steps(out, body)
    cfg.write_text('{"learning_rate": 5e-4}')            # an edited config
    edited = run_steps(out, body)
    for proc in (first, same, edited):
        assert proc.returncode == 0, proc.stderr
    assert counter.read_text() == "x\nx\n"             # built, reused, built again
    assert "stub train: already built, reusing it" in same.stdout
    assert "changed since it was built; rebuilding" in edited.stdout
    assert "done in" in edited.stdout


def test_inputs_key_covers_file_contents_and_the_earlier_key(tmp_path):
    cfg = tmp_path / "a.json"
    cfg.write_text("1")
    keys = [run_steps(tmp_path / "o", f"inputs_key {prev} {cfg}").stdout.strip()
            for prev in ("k1", "k1", "k2")]
    cfg.write_text("2")
    keys.append(run_steps(tmp_path / "o", f"inputs_key k1 {cfg}").stdout.strip())
    assert len(keys[0]) == 16 and keys[0] == keys[1]
    assert len({keys[0], keys[2], keys[3]}) == 3


def test_demo_stops_at_a_failing_step_and_names_it(tmp_path):
    out, after = tmp_path / "out", tmp_path / "after"
    proc = run_steps(out, f'step "stub ok" true\nstep "stub broken" bash -c "exit 3"\n'
                          f'touch {after}')
    assert proc.returncode == 1
    assert "step 'stub broken' failed (exit code 3)" in proc.stderr
    assert not after.exists()                           # nothing after the failure ran
    assert not (out / ".steps" / "stub_broken.done").exists()
    assert (out / ".steps" / "stub_ok.done").exists()


def test_demo_config_points_the_demo_configs_at_the_output_folder(tmp_path):
    out = tmp_path / "elsewhere"
    proc = run_steps(out, "cat \"$(demo_config pretrain-demo.json)\"")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    assert cfg["txt_db"] == f"{out}/dbs/txt_db" and cfg["output_dir"] == f"{out}/pretrain"
