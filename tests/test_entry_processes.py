"""Every entry script as a real process, through ``scripts/smoke_entry.py``.

One process each: every training script trains 2 updates on the tiny toy corpus, validates and
saves, and every evaluation script evaluates that checkpoint; its metrics must equal the
training's own validation of the same weights. Under ``torchrun --nproc_per_node 2`` (Gloo):
TVR training with the released ``eval_with_query_type`` + ``distributed_eval`` (a query type
with one query is absent on one rank: the by-type rank averaging must not crash), and each
evaluation script; the global metrics, re-scored on the merged lists, must equal the
one-process ones exactly.

TVC scoring runs without Java here (``no_java``: METEOR costs ~6 s per evaluation; the Java path
is tested in test_caption_metrics.py).
"""
from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers_model import small_config

from scripts import bench_model, benchmark, smoke_entry
from scripts.smoke_entry import ENTRIES, EVAL, TRAIN, Smoke, precision_flags

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"
STEPS = 2
pytestmark = pytest.mark.slow


def smoke_cli(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "scripts/smoke_entry.py", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def records(out: Path) -> dict:
    lines = (out / "summary.jsonl").read_text().splitlines()
    return {r["label"]: r for r in map(json.loads, lines)}


def comparable(metrics: dict, by_name: bool = False) -> dict:
    """The numbers both sides compute: no timings, no training loss, no text, and no
    ``_rank_avg`` (upstream's rank-weighted average exists only with several ranks).
    ``by_name`` keys QA/VIOLIN figures by their last part: training and eval prefix them
    differently (``val_tvqa/tvqa_val_valid/acc`` vs ``valid/acc``)."""
    return {(k.rsplit("/", 1)[-1] if by_name else k): v for k, v in metrics.items()
            if not isinstance(v, str) and "per_s" not in k and "_rank_avg" not in k
            and k != "train/loss"}


def two_ranks_loaded(record) -> bool:
    """Both ranks of an evaluation loaded the model (each logs it once)."""
    return Path(record["log"]).read_text().count("eval.common -   loaded Hero") == 2


@pytest.fixture(scope="module")
def single(toy_dbs, tmp_path_factory):
    """Every entry once, one process each, two runs at a time, through the runner's CLI."""
    out = tmp_path_factory.mktemp("smoke")
    proc = smoke_cli("--dbs", toy_dbs, "--out", out, "--jobs", 2, "--no_java")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, records(out)


def test_every_entry_script_runs_as_one_process(single):
    out, runs = single
    assert set(runs) == set(ENTRIES)
    for name, entry in TRAIN.items():
        run, run_dir = runs[name], out / name
        assert run["cmd"][1:3] == [entry.script, "--config"] and run["rc"] == 0
        finished = json.loads((run_dir / "log" / "finished.json").read_text())
        assert finished["global_step"] == STEPS
        assert (run_dir / "ckpt" / f"model_step_{STEPS}.pt").is_file()
        hps = json.loads((run_dir / "log" / "hps.json").read_text())
        assert hps["num_train_steps"] == STEPS and hps["n_gpu"] == 1
        assert math.isfinite(run["metrics"]["train/loss"]), name
        assert len(comparable(run["metrics"])) >= 2, name  # a validation was logged
    pretrain = runs["pretrain"]["metrics"]
    for task in ("mlm", "mfm-nce", "fom", "vsm"):
        assert any(k.startswith(f"valid_{task}_tv_all/") for k in pretrain), task


@pytest.mark.parametrize("name", list(EVAL))
def test_eval_script_matches_training_validation(single, name):
    """The evaluation script on the saved checkpoint computes what the training's validation
    of the same weights computed (same batches), to the last bit."""
    _, runs = single
    by_name = name in ("eval_tvqa", "eval_violin")
    evaluated = comparable(runs[name]["metrics"], by_name)
    validated = comparable(runs[EVAL[name].trains]["metrics"], by_name)
    assert evaluated and evaluated.keys() <= validated.keys()
    assert evaluated == {k: validated[k] for k in evaluated}


def one_query_type(toy_raw) -> str:
    """A TVR val query type held by a single query: with 2 ranks one rank has none of it."""
    rows = [json.loads(line) for line in (toy_raw / "tvr_val_release.jsonl").open()]
    counts = Counter(r["type"] for r in rows)
    singles = [t for t, n in counts.items() if n == 1]
    assert singles, f"the toy TVR val split has no single-query type: {counts}"
    return singles[0]


def test_two_process_tvr_training_and_eval_equal_one_process(single, toy_dbs, toy_raw):
    out, _ = single
    rare = one_query_type(toy_raw)
    smoke = Smoke(toy_dbs, out, STEPS, no_java=True)
    train = smoke.run("train_tvr", nproc=2, tag="np2")
    assert train["rc"] == 0, Path(train["log"]).read_text()[-3000:]
    hps = json.loads((out / "train_tvr_np2" / "log" / "hps.json").read_text())
    assert hps["n_gpu"] == 2 and hps["distributed_eval"] and hps["eval_with_query_type"]
    validated = train["metrics"]
    assert any("_rank_avg" in k and f"_{rare}-" in k for k in validated)
    one = smoke.run("eval_tvr", nproc=1, tag="np2_1", train_tag="np2")
    two = smoke.run("eval_tvr", nproc=2, tag="np2_2", train_tag="np2")
    assert one["rc"] == two["rc"] == 0, Path(two["log"]).read_text()[-3000:]
    assert two_ranks_loaded(two) and not any("_rank_avg" in k for k in one["metrics"])
    assert any("_rank_avg" in k for k in two["metrics"])
    assert comparable(two["metrics"]) == comparable(one["metrics"])
    assert comparable(one["metrics"]).items() <= comparable(validated).items()
    assert_same_rankings(ranked(out / "eval_tvr_np2_2"), ranked(out / "eval_tvr_np2_1"))


def assert_same_rankings(a: dict, b: dict, rel: float = 1e-5) -> None:
    """The same moments in the same order; scores equal up to float rounding. Ranks encode
    different video batches, and the packed F-TRM's GEMM shapes follow the batch, so scores may
    differ in the last bits (seen: 4e-7 relative)."""
    assert a.keys() == b.keys()
    for task in a:
        assert a[task].keys() == b[task].keys(), task
        for qid, preds in a[task].items():
            assert [p[:3] for p in preds] == [p[:3] for p in b[task][qid]], (task, qid)
            assert [p[3] for p in preds] == pytest.approx([p[3] for p in b[task][qid]],
                                                          rel=rel), (task, qid)


def ranked(run_dir: Path) -> dict:
    """Per task, query id -> its ranked predictions (merged rank lists come in rank order)."""
    sub = json.loads((run_dir / "results.json").read_text())
    return {task: {row["desc_id"]: row["predictions"] for row in rows}
            for task, rows in sub.items() if task != "video2idx"}


@pytest.mark.parametrize("name", ["eval_msrvtt", "eval_tvqa", "eval_violin", "inf_tvc"])
def test_two_process_eval_equals_one_process(single, toy_dbs, name):
    out, runs = single
    two = Smoke(toy_dbs, out, STEPS, no_java=True).run(name, nproc=2, tag="np2")
    assert two["rc"] == 0, Path(two["log"]).read_text()[-3000:]
    assert two_ranks_loaded(two)
    one_m, two_m = comparable(runs[name]["metrics"]), comparable(two["metrics"])
    assert one_m.keys() == two_m.keys() and one_m
    for key, value in one_m.items():
        if key.endswith("loss"):  # fp32 batch losses summed per rank, then across ranks
            assert two_m[key] == pytest.approx(value, rel=1e-6), key
        else:
            assert two_m[key] == value, key
    if name == "inf_tvc":
        lines = lambda d: sorted((out / d / "pred.jsonl").read_text().splitlines())
        assert lines("inf_tvc_np2") == lines("inf_tvc")
    elif name == "eval_msrvtt":
        assert ranked(out / "eval_msrvtt_np2") == ranked(out / "eval_msrvtt")
    else:
        results = lambda d: json.loads((out / d / "results.json").read_text())
        assert results(f"{name}_np2") == results(name)


def test_precision_and_extra_flags_reach_every_command(toy_dbs, tmp_path):
    proc = smoke_cli("--dbs", toy_dbs, "--out", tmp_path, "--only", "eval_msrvtt",
                     "--precision", "bf16", "--tag", "bf16", "--", "--n_workers", "0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = records(tmp_path)
    assert set(runs) == {"train_msrvtt_bf16", "eval_msrvtt_bf16"}
    for run in runs.values():
        assert run["cmd"][-3:] == ["--bf16", "--n_workers", "0"] and run["precision"] == "bf16"
    hps = json.loads((tmp_path / "train_msrvtt_bf16" / "log" / "hps.json").read_text())
    assert hps["bf16"] is True and not hps["fp16"]
    assert "| eval_msrvtt_bf16 | `eval_vr.py` | 1 | bf16 | 0 |" in proc.stdout
    assert precision_flags("inf_tvc.py", "fp32") == (["--no_fp16"], "")
    assert precision_flags("inf_tvc.py", "bf16")[0] == []


def test_failed_runs_are_named_and_exit_nonzero(tmp_path):
    empty = tmp_path / "no_dbs"
    empty.mkdir()
    proc = smoke_cli("--dbs", empty, "--out", tmp_path / "out", "--only", "train_msrvtt")
    assert proc.returncode == 1
    assert "1 of 1 runs failed: train_msrvtt" in proc.stderr
    assert records(tmp_path / "out")["train_msrvtt"]["rc"] != 0


def processes_mentioning(marker: Path) -> list:
    """Live processes whose command line names ``marker`` (a run's config or output)."""
    needle = str(marker).encode()
    return [p.name for p in Path("/proc").iterdir() if p.name.isdigit()
            and needle in _cmdline(p)]


def _cmdline(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "cmdline").read_bytes()
    except OSError:
        return b""


def test_timeout_kills_the_whole_process_group(toy_dbs, tmp_path):
    run = Smoke(toy_dbs, tmp_path, STEPS, timeout=3).run("train_msrvtt", nproc=2)
    assert run["rc"] == 124 and run["seconds"] < 30
    time.sleep(0.5)
    assert not processes_mentioning(tmp_path / "configs"), "a worker outlived the timeout"


def test_sigterm_stops_the_runner_and_its_torchrun_workers(toy_dbs, tmp_path):
    """What ``timeout`` in gpu_check.sh does to the runner: its runs must not outlive it."""
    proc = subprocess.Popen([sys.executable, "scripts/smoke_entry.py", "--dbs", str(toy_dbs),
                             "--out", str(tmp_path), "--only", "train_msrvtt", "--nproc", "2"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(processes_mentioning(tmp_path / "configs")) < 3 and time.time() < deadline:
        time.sleep(0.2)  # torchrun and both workers started
    assert len(processes_mentioning(tmp_path / "configs")) >= 3
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    time.sleep(0.5)
    assert not processes_mentioning(tmp_path / "configs")


# ------------------------------------------------------------------ scripts/gpu_check.sh
def test_gpu_check_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_check_refuses_to_start_without_cuda(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(GPU_CHECK)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device visible to torch" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "out").exists()


def dry_run_steps(tmp_path) -> dict:
    """step name -> (time limit in s, argv) from ``gpu_check.sh --dry-run``."""
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(GPU_CHECK), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    steps = {}
    for line in proc.stdout.splitlines()[1:]:
        name, limit, *argv = shlex.split(line)
        steps[name] = (int(limit.rstrip("s")), argv)
    return steps


def test_gpu_check_dry_run_lists_parsable_steps_covering_the_issue(tmp_path):
    """Every step's command line parses with its script's own parser (a typo in a flag would
    otherwise surface only on the GPU), and together they cover every benchmark of ``all``,
    bf16 and fp16 model steps, TVR ranking at 1k and 10k, and the entry scripts in fp16/bf16."""
    steps = dry_run_steps(tmp_path)
    assert list(steps)[:2] == ["corpus", "dbs"] and list(steps)[-1] == "report"
    benches, smoke_precisions = [], set()
    for _, argv in steps.values():
        if "scripts/benchmark.py" in argv:
            benches.append(benchmark.parse_args(argv[argv.index("scripts/benchmark.py") + 1:]))
        elif "scripts/smoke_entry.py" in argv:
            opts = smoke_entry.parse_args(argv[argv.index("scripts/smoke_entry.py") + 1:])
            assert set(opts.only) == set(ENTRIES) and opts.nproc == 1
            smoke_precisions.add(opts.precision)
    assert {b.command for b in benches} == set(benchmark.BENCHMARKS) - {"all"}
    assert {b.model_precision for b in benches if b.command == "model"} == {"bf16", "fp16"}
    vcmr = {(b.vcmr_videos, b.vcmr_queries): b.vcmr_impls for b in benches
            if b.command == "vcmr"}
    assert vcmr == {(1000, 1000): ["fast", "reference"], (10000, 10000): ["fast"]}
    assert smoke_precisions == {"fp16", "bf16"}


def test_benchmark_sizes_for_the_gpu_check_work_on_cpu(tmp_path):
    """The flags gpu_check.sh adds, at toy sizes: fast-only ranking, fp16 model step."""
    opts = benchmark.parse_args(["vcmr", "--vcmr_videos", "12", "--vcmr_queries", "6",
                                 "--vcmr_clip_len", "10", "--vcmr_impls", "fast"])
    names = {r["figure"].split("/", 2)[-1] for r in benchmark.BENCHMARKS["vcmr"].run(opts)}
    assert names == {"fast/seconds", "fast/queries_per_s", "fast/peak_memory"}
    opts.vcmr_impls = ["fast", "reference"]
    both = {r["figure"].split("/", 2)[-1]: r["value"]
            for r in benchmark.BENCHMARKS["vcmr"].run(opts)}
    assert both["identical_output"] == 1.0
    cfg = tmp_path / "vcmr.json"
    cfg.write_text(json.dumps(small_config(hidden=16, heads=2, f_layers=1, c_layers=1,
                                           vocab=40)))
    opts = benchmark.parse_args(["model", "--vcmr_config", str(cfg), "--model_device", "cpu",
                                 "--model_precision", "fp16", "--model_workloads", "vcmr_train",
                                 "--model_attn_impls", "sdpa", "--model_videos", "2",
                                 "--model_frames", "6", "--model_subs", "2",
                                 "--model_vfeat_dim", "8", "--model_iters", "1"])
    figures = {r["figure"]: r["value"] for r in benchmark.BENCHMARKS["model"].run(opts)}
    assert figures["model/vcmr_train/sdpa/fp16/ms_per_iter"] > 0
    assert bench_model.peak_tflops("cuda:0 NVIDIA H100 80GB HBM3", "fp16") == 989.0
