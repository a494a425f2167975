"""``make study`` (scripts/study.py, scripts/study_report.py) without its hour of training.

The scheduler runs real subprocesses (stub commands); the ablation configs go through the real
pre-training config check; the report reads run logs written by the engine's own JSONL writer.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from scripts import make_report, study, study_report
from scripts.study import Job, Scheduler
from tests.test_demo import PNG_MAGIC, write_jsonl_run

QA_KEY = "val_tvqa/tvqa_val_valid/acc"
TVR_KEY = "valid_val_VCMR/VCMR_0.5-r10"


def stub(out: Path, name: str, deps=(), code="pass") -> Job:
    """A job that appends its name to ``order.txt`` when it runs, then runs ``code``."""
    prog = f"open({str(out / 'order.txt')!r}, 'a').write({name!r} + '\\n'); {code}"
    return Job(name, [sys.executable, "-c", prog], out / "runs" / name, list(deps))


def test_scheduler_runs_in_dependency_order_and_reuses_finished_jobs(tmp_path, capsys):
    jobs = [stub(tmp_path, "c", ["a", "b"]), stub(tmp_path, "a"), stub(tmp_path, "b", ["a"])]
    Scheduler(tmp_path, jobs, slots=2).run()
    assert (tmp_path / "order.txt").read_text().split() == ["a", "b", "c"]
    assert all((tmp_path / ".jobs" / f"{n}.done").is_file() for n in "abc")
    (tmp_path / ".jobs" / "c.done").unlink()
    assert Scheduler(tmp_path, jobs, slots=2).run() == 2
    assert (tmp_path / "order.txt").read_text().split() == ["a", "b", "c", "c"]
    assert "reusing 2 finished job(s)" in capsys.readouterr().out


def test_scheduler_starts_the_heaviest_chain_first(tmp_path):
    """One slot: of the two ready jobs, the light one that leads to a heavy job goes first."""
    jobs = [stub(tmp_path, "long", []), stub(tmp_path, "data", []),
            stub(tmp_path, "pretrain", ["data"])]
    jobs[0].weight, jobs[1].weight, jobs[2].weight = 3.0, 0.2, 5.0
    assert study.chain_weights(jobs) == {"long": 3.0, "data": 5.2, "pretrain": 5.0}
    Scheduler(tmp_path, jobs, slots=1).run()
    assert (tmp_path / "order.txt").read_text().split() == ["data", "pretrain", "long"]


def test_scheduler_names_a_failed_job_and_starts_nothing_after_it(tmp_path):
    jobs = [stub(tmp_path, "bad", code="print('boom: disk full'); raise SystemExit(3)"),
            stub(tmp_path, "after", ["bad"]), stub(tmp_path, "other")]
    stale = tmp_path / "runs" / "bad"
    stale.mkdir(parents=True)
    (stale / "half-written").write_text("x")
    with pytest.raises(SystemExit) as err:
        Scheduler(tmp_path, jobs, slots=1).run()
    assert "job bad failed" in str(err.value) and "boom: disk full" in str(err.value)
    assert str(tmp_path / "logs" / "bad.log") in str(err.value)
    assert "after" not in (tmp_path / "order.txt").read_text().split()
    assert not stale.exists()                      # an unfinished job starts from a clean folder
    assert not (tmp_path / ".jobs" / "bad.done").exists()


def test_ablation_configs_keep_ratios_and_pass_the_pretraining_config_check(tmp_path):
    import pretrain

    base = json.loads((study.REPO / "config" / "pretrain-demo.json").read_text())
    ratio = dict(zip(base["targets"][0]["splits"][0]["tasks"],
                     base["targets"][0]["splits"][0]["ratio"]))
    for variant, tasks in study.ABLATIONS.items():
        path = study.demo_config("pretrain-demo.json", tmp_path, tmp_path / variant,
                                 study.only_tasks(tasks))
        split = json.loads(path.read_text())["targets"][0]["splits"][0]
        assert split["tasks"] == list(tasks)
        assert split["ratio"] == [ratio.get(t, ratio["mfm-nce"]) for t in tasks]
        opts = pretrain.parse_args(["--config", str(path)])
        assert opts.output_dir == str(tmp_path / "pretrain")


def test_seed_jobs_wire_the_demo_configs_and_seeds(tmp_path):
    jobs = {j.name: j for j in study.seed_jobs(tmp_path, 2) + study.ablation_jobs(tmp_path, 2)}
    assert len(jobs) == 2 + 12 + 4 * 3
    ft = jobs["s2-tvqa-pretrained"]
    assert ft.deps == ["s2-pretrain"] and ft.argv[ft.argv.index("--seed") + 1] == "79"
    ckpt = ft.argv[ft.argv.index("--checkpoint") + 1]
    assert ckpt.endswith(f"seed2/pretrain/ckpt/model_step_{study.pretrain_steps()}.pt")
    assert jobs["s2-tvqa-scratch"].argv[jobs["s2-tvqa-scratch"].argv.index("--checkpoint") + 1] \
        == ""
    cfg = json.loads(Path(ft.argv[ft.argv.index("--config") + 1]).read_text())
    assert cfg["train_query_txt_db"] == f"{tmp_path}/seed2/dbs/txt_db/tvqa_train.db"
    mffr = "s2-ablation-mlm_mffr_fom_vsm"
    assert jobs[f"{mffr}-tvr"].deps == [f"{mffr}-pretrain"]


def fake_seed(root: Path, seed: int, tvr: dict, qa: dict) -> None:
    """One seed folder with TVR and TVQA runs (value per init, in %); others missing."""
    for init in make_report.INITS:
        write_jsonl_run(root / f"seed{seed}" / "finetune" / f"tvr_{init}", [(1, "tvr", 1.0)],
                        {5: {TVR_KEY: tvr[init]}}, {})
        write_jsonl_run(root / f"seed{seed}" / "finetune" / f"tvqa_{init}", [(1, "tvqa", 1.0)],
                        {5: {QA_KEY: qa[init] / 100}}, {})


def test_study_report_mean_std_spread_and_ablation(tmp_path):
    fake_seed(tmp_path, 0, {"pretrained": 40.0, "scratch": 10.0}, {"pretrained": 60, "scratch": 30})
    fake_seed(tmp_path, 1, {"pretrained": 50.0, "scratch": 20.0}, {"pretrained": 40, "scratch": 50})
    for k, variant in enumerate(study.ABLATIONS):
        write_jsonl_run(tmp_path / "seed0" / "ablation" / variant / "finetune" / "tvr_pretrained",
                        [(1, "tvr", 1.0)], {5: {TVR_KEY: 20.0 + k}}, {})
    path = study_report.main(["--study_dir", str(tmp_path), "--wall_s", "12 s"])
    data = json.loads((tmp_path / "study.json").read_text())
    tvr, qa = data["tasks"]["tvr"], data["tasks"]["tvqa"]
    assert tvr["pretrained"]["mean"] == pytest.approx(45.0)
    assert tvr["pretrained"]["std"] == pytest.approx(7.0711, abs=1e-3)   # sample std
    assert tvr["gap"] == pytest.approx(30.0) and tvr["beyond_spread"] is True
    assert qa["gap"] == pytest.approx(10.0) and qa["beyond_spread"] is False
    assert data["ablation"]["mlm_mfm-nce_vsm"]["tvr"] == pytest.approx(22.0)
    assert data["ablation"]["all"]["tvr"] == pytest.approx(40.0)
    assert data["ablation"]["mlm_mfm-nce"]["tvqa"] is None
    text = path.read_text()
    assert "| TVR (VCMR) | VCMR R@10 IoU0.5 | 45.0 ± 7.1 | 15.0 ± 7.1 | +30.0 | yes |" in text
    assert "**1 of 6** tasks" in text and "12 s on" in text
    assert "| MLM + MFM-NCE + VSM | 22.00 | - |" in text
    assert ("- adding VSM to MLM + MFM-NCE: TVR (VCMR) VCMR R@10 IoU0.5 20.0 -> 22.0 (+2.0, "
            "within the spread ± 7.1); paper: VSM brings the largest gain on retrieval -> "
            "unresolved.") in text
    assert "MFM-NCE instead of MFFR: TVR (VCMR) VCMR R@10 IoU0.5 23.0 -> 40.0 (+17.0, " \
        "beyond" in text
    assert "MFM-NCE beats MFFR -> agrees." in text and "FOM helps QA" not in text
    for name in ("seeds", "ablation"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "seed1" / "report.md").is_file()


def test_demo_report_quotes_the_study_spread(tmp_path):
    fake_seed(tmp_path, 0, {"pretrained": 40.0, "scratch": 10.0}, {"pretrained": 60, "scratch": 30})
    fake_seed(tmp_path, 1, {"pretrained": 50.0, "scratch": 20.0}, {"pretrained": 40, "scratch": 50})
    study_report.main(["--study_dir", str(tmp_path)])
    demo = tmp_path / "seed0"
    report = make_report.main(["--demo_dir", str(demo), "--study",
                               str(tmp_path / "study.json")]).read_text()
    assert "## How large is the seed spread?" in report
    assert "| TVR (VCMR) | VCMR R@10 IoU0.5 | +30.0 | 45.0 ± 7.1 | 15.0 ± 7.1 | yes |" in report
    assert "| TVQA | accuracy | +30.0 | 50.0 ± 14.1 | 40.0 ± 14.1 | no |" in report
    bare = make_report.main(["--demo_dir", str(demo), "--study", ""]).read_text()
    assert "seed spread" not in bare
