"""Run every entry script as a real process on the toy corpus for a couple of updates.

Usage (from the repository root)::

    python scripts/smoke_entry.py --dbs DBS --out OUT [--only NAME ...] [--nproc N] [--jobs J]
        [--precision fp32|fp16|bf16] [--steps 2] [--timeout 600] [--tag T] [--no_java]
        [--markdown FILE] [-- EXTRA FLAGS]

Why: the tests call the scripts' ``main(argv)`` in-process, which skips their ``__main__``
blocks, a fresh interpreter's argument handling and ``torchrun``; this runs ``python SCRIPT
...`` (or ``python -m torch.distributed.run --standalone --nproc_per_node N SCRIPT ...``) as a
user does. ``DBS`` holds ``txt_db/`` and ``video_db/`` as ``scripts/build_toy_dbs.sh`` writes
them.

Training entries (:data:`TRAIN`) write ``OUT/configs/NAME.json`` from their demo config (paths
moved to ``DBS``, ``--steps`` updates validated and saved at the last, tiny batches, no
checkpoint, no workers) and train into ``OUT/NAME[_TAG]/``, removed first (it is this runner's
own output; a finished run there would be reused, not re-run). Evaluation entries
(:data:`EVAL`) evaluate ``ckpt/model_step_{steps}.pt`` of their training entry's folder and copy
the metrics and predictions they wrote to ``OUT/NAME[_TAG]/``. Every run appends a record
(command, exit code, seconds, metrics) to ``OUT/summary.jsonl`` and logs to
``OUT/logs/NAME[_TAG].log``. ``--precision`` maps to each script's switch (``--fp16`` /
``--bf16``; ``inf_tvc.py`` has no bf16, see :func:`precision_flags`); flags after ``--`` go to
every command. Exits 1, naming them, when runs failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.errors import HeroError, run_main  # noqa: E402

DEMO_DBS = "demo_output/dbs"
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
            "MASTER_PORT", "TORCHELASTIC_RUN_ID", "GROUP_RANK")
BATCH = 4  # training and evaluation batch size of every smoke run
GEN_STEPS = 5  # TVC greedy decoding steps (training validation and inf_tvc.py alike)
# Set wherever the demo config has the key: tiny batches, fast evaluation.
SMALL = dict(train_batch_size=BATCH, val_batch_size=BATCH, vcmr_eval_video_batch_size=BATCH,
             vr_eval_video_batch_size=BATCH, vr_eval_q_batch_size=BATCH,
             max_gen_step=GEN_STEPS)


class Train(NamedTuple):
    script: str
    config: str  # demo config under config/
    extra: dict  # more overrides (declared options the demo config leaves at their default)


class Eval(NamedTuple):
    script: str
    trains: str  # the TRAIN entry whose checkpoint is evaluated
    args: Callable  # (dbs, train_dir, step, out_dir) -> argv
    metrics: str  # glob, relative to the train dir (or out_dir for "OUT:"), of its metrics file


TRAIN = {
    "train_tvr": Train("train_vcmr.py", "train-tvr-demo.json",
                       dict(vcmr_eval_q_batch_size=BATCH)),
    "train_didemo": Train("train_vcmr.py", "train-didemo_video_only-demo.json",
                          dict(vcmr_eval_q_batch_size=BATCH)),
    "train_msrvtt": Train("train_vr.py", "train-msrvtt_video_only-demo.json", {}),
    "train_tvqa": Train("train_videoQA.py", "train-tvqa-demo.json", {}),
    "train_violin": Train("train_violin.py", "train-violin-demo.json", {}),
    "train_tvc": Train("train_tvc.py", "train-tvc-demo.json", {}),
    "pretrain": Train("pretrain.py", "pretrain-demo.json", {}),
}


def _retrieval_args(task, corpus, query_db, sub_db, kind):
    def args(dbs, train_dir, step, out_dir):
        argv = ["--query_txt_db", f"{dbs}/txt_db/{query_db}", "--split", "val",
                "--vfeat_db", f"{dbs}/video_db/{corpus}", "--task", task,
                "--output_dir", str(train_dir), "--checkpoint", str(step), "--n_workers", "0",
                "--batch_size", str(BATCH), f"--{kind}_eval_video_batch_size", str(BATCH)]
        return argv + (["--sub_txt_db", f"{dbs}/txt_db/{sub_db}"] if sub_db else [])
    return args


def _qa_args(corpus, query_db):
    def args(dbs, train_dir, step, out_dir):
        return ["--query_txt_db", f"{dbs}/txt_db/{query_db}", "--split", "val",
                "--vfeat_db", f"{dbs}/video_db/{corpus}",
                "--sub_txt_db", f"{dbs}/txt_db/{corpus}_subtitles.db",
                "--output_dir", str(train_dir), "--checkpoint", str(step), "--n_workers", "0",
                "--batch_size", str(BATCH)]
    return args


def _tvc_args(dbs, train_dir, step, out_dir):
    return ["--model_dir", str(train_dir), "--ckpt_step", str(step),
            "--target_clip", f"{dbs}/txt_db/tvc_val_release.jsonl",
            "--output", str(out_dir / "pred.jsonl"), "--n_workers", "0",
            "--batch_size", str(BATCH), "--max_gen_step", str(GEN_STEPS)]


EVAL = {
    "eval_tvr": Eval("eval_vcmr.py", "train_tvr",
                     _retrieval_args("tvr", "tv", "tvr_val.db", "tv_subtitles.db", "vcmr"),
                     "results_val/metrics_{step}_all.json"),
    "eval_didemo": Eval("eval_vcmr.py", "train_didemo",
                        _retrieval_args("didemo_video_only", "didemo", "didemo_val.db", None,
                                        "vcmr"), "results_val/metrics_{step}_all.json"),
    "eval_msrvtt": Eval("eval_vr.py", "train_msrvtt",
                        _retrieval_args("msrvtt_video_only", "msrvtt", "msrvtt_val.db", None,
                                        "vr"), "results_val/metrics_{step}_all.json"),
    "eval_tvqa": Eval("eval_videoQA.py", "train_tvqa", _qa_args("tv", "tvqa_val.db"),
                      "results_val*/metrics_{step}_all.json"),
    "eval_violin": Eval("eval_violin.py", "train_violin", _qa_args("violin", "violin_val.db"),
                        "results_val*/metrics_{step}_all.json"),
    "inf_tvc": Eval("inf_tvc.py", "train_tvc", _tvc_args, "OUT:pred_metrics.json"),
}
ENTRIES = (*TRAIN, *EVAL)


def write_config(dbs: Path, out: Path, name: str, steps: int) -> Path:
    """``OUT/configs/NAME.json``: the demo config with its ``demo_output/dbs`` paths moved to
    ``dbs``, ``steps`` updates validated and saved at the last, tiny batches."""
    entry = TRAIN[name]
    cfg = json.loads((ROOT / "config" / entry.config).read_text())
    for key, value in cfg.items():
        if isinstance(value, str) and value.startswith(DEMO_DBS):
            cfg[key] = str(dbs) + value[len(DEMO_DBS):]
    cfg.update({k: v for k, v in SMALL.items() if k in cfg}, **entry.extra)
    cfg.update(checkpoint=None, n_workers=0, num_train_steps=steps, valid_steps=steps,
               save_steps=steps, warmup_steps=1)
    path = out / "configs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=4))
    return path


def precision_flags(script: str, precision: str) -> tuple[list, str]:
    """(flags, note): ``--fp16``/``--bf16`` for every script but ``inf_tvc.py``, which decodes
    with fp16 autocast unless ``--no_fp16`` (CUDA only) and has no bf16 switch."""
    if script == "inf_tvc.py":
        if precision == "fp32":
            return ["--no_fp16"], ""
        note = "" if precision == "fp16" else "inf_tvc.py has no bf16: decoded fp16 (its default)"
        return [], note
    return {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"]}[precision], ""


def launcher(python: str, nproc: int) -> list:
    """``python`` or ``python -m torch.distributed.run --standalone --nproc_per_node N``."""
    if nproc == 1:
        return [python]
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(nproc)]


def child_env(no_java_in: Path | None = None) -> dict:
    """The caller's environment without a surrounding torchrun's rank variables; one thread per
    process unless OMP_NUM_THREADS is set. With ``no_java_in``, a ``java`` that fails is put
    first on PATH (in ``no_java_in/.no_java/``): TVC scoring then takes its Java-free fallback
    (no METEOR), which saves several seconds per TVC evaluation on a small machine."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.setdefault("OMP_NUM_THREADS", "1")
    if no_java_in is not None:
        shim = Path(no_java_in) / ".no_java" / "java"
        shim.parent.mkdir(parents=True, exist_ok=True)
        shim.write_text("#!/bin/sh\nexit 1\n")
        shim.chmod(0o755)
        env["PATH"] = f"{shim.parent}{os.pathsep}{env.get('PATH', '')}"
    return env


LIVE: set = set()  # running children (process-group leaders), killed on SIGTERM/SIGINT
LIVE_LOCK = threading.Lock()


def run_logged(argv: list, log: Path, timeout: float, env: dict) -> int:
    """Exit code of ``argv`` run from the repository root, output to ``log``; past ``timeout``
    the run (torchrun and its workers) is killed and 124 returned. Each run gets its own
    process group so that it can be killed whole; :func:`stop_children` kills them when
    the runner itself is stopped (``timeout`` in scripts/gpu_check.sh)."""
    with open(log, "w") as f:
        f.write(" ".join(argv) + "\n")
        f.flush()
        with LIVE_LOCK:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            LIVE.add(proc)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait()
            return 124
        finally:
            with LIVE_LOCK:
                LIVE.discard(proc)


def _descendants(pid: int) -> list:
    """Every live descendant of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children: dict = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill_group(proc) -> None:
    """SIGKILL the run's process group and every descendant: torchrun starts its workers in
    sessions of their own, so the group alone would leave them running."""
    pids = _descendants(proc.pid)
    for kill, target in [(os.killpg, proc.pid)] + [(os.kill, pid) for pid in pids]:
        try:
            kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def stop_children(signum, frame) -> None:
    """SIGTERM/SIGINT handler: kill every running group, then exit 128 + signal at once (queued
    runs must not start)."""
    with LIVE_LOCK:
        for proc in LIVE:
            _kill_group(proc)
        os._exit(128 + signum)


def newest(pattern: str, root: Path, since: float) -> Path | None:
    """The newest file matching ``pattern`` under ``root`` written after ``since``."""
    found = [p for p in root.glob(pattern) if p.stat().st_mtime >= since]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def train_metrics(run_dir: Path) -> dict:
    """The last validation record of ``log/metrics.jsonl`` and the last update's loss."""
    path = run_dir / "log" / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    valid = [r["valid"] for r in records if "valid" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    return {**(valid[-1] if valid else {}), **({"train/loss": losses[-1]} if losses else {})}


class Smoke:
    """Runs entries into ``out`` over the DBs in ``dbs``; see the module docstring."""

    def __init__(self, dbs, out, steps: int = 2, precision: str = "fp32", extra=(),
                 python: str = sys.executable, timeout: float = 600, no_java: bool = False):
        self.dbs, self.out = Path(dbs).resolve(), Path(out).resolve()
        self.steps, self.precision, self.extra = steps, precision, list(extra)
        self.python, self.timeout = python, timeout
        self.env = child_env(self.out if no_java else None)
        self._lock = threading.Lock()

    def command(self, name: str, nproc: int, out_dir: Path, train_dir: Path) -> tuple:
        """(argv, note) of one run."""
        entry = TRAIN.get(name) or EVAL[name]
        if name in TRAIN:
            args = ["--config", str(write_config(self.dbs, self.out, name, self.steps)),
                    "--output_dir", str(out_dir)]
        else:
            args = entry.args(self.dbs, train_dir, self.steps, out_dir)
        flags, note = precision_flags(entry.script, self.precision)
        return [*launcher(self.python, nproc), entry.script, *args, *flags, *self.extra], note

    def run(self, name: str, nproc: int = 1, tag: str = "", train_tag: str = "") -> dict:
        """Run entry ``name`` (under torchrun when ``nproc`` > 1) into ``OUT/NAME[_TAG]``; an
        evaluation reads ``OUT/TRAINS[_TRAIN_TAG]``. Returns the record it appends to
        ``OUT/summary.jsonl``; ``rc`` 124 when it ran past the timeout."""
        label = f"{name}_{tag}" if tag else name
        out_dir, train_dir = self.out / label, None
        if name in EVAL:
            trains = EVAL[name].trains
            train_dir = self.out / (f"{trains}_{train_tag}" if train_tag else trains)
        shutil.rmtree(out_dir, ignore_errors=True)
        if name in EVAL:
            out_dir.mkdir(parents=True)
        argv, note = self.command(name, nproc, out_dir, train_dir)
        log = self.out / "logs" / f"{label}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        rc = run_logged(argv, log, self.timeout, self.env)
        record = dict(name=name, label=label, script=(TRAIN.get(name) or EVAL[name]).script,
                      nproc=nproc, precision=self.precision, note=note, rc=rc,
                      seconds=round(time.time() - start, 2), cmd=argv, log=str(log),
                      run_dir=str(train_dir or out_dir),
                      metrics=self.metrics(name, out_dir, train_dir, start) if rc == 0 else {})
        with self._lock, open(self.out / "summary.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def metrics(self, name: str, out_dir: Path, train_dir: Path | None, since: float) -> dict:
        """A training's last validation (+ last loss); an evaluation's metrics file written by
        this run, copied with its predictions to ``OUT/NAME[_TAG]/{metrics,results}.json``."""
        if name in TRAIN:
            return train_metrics(out_dir)
        pattern = EVAL[name].metrics.format(step=self.steps)
        root = out_dir if pattern.startswith("OUT:") else train_dir
        path = newest(pattern.removeprefix("OUT:"), root, since)
        if path is None:
            return {}
        if root != out_dir:
            shutil.copyfile(path, out_dir / "metrics.json")
            results = path.with_name(f"results_{self.steps}_all.json")
            if results.is_file():
                shutil.copyfile(results, out_dir / "results.json")
        return json.loads(path.read_text())


def log_tail(record: dict, chars: int = 3000) -> str:
    """The end of a run's log, for failure messages."""
    return Path(record["log"]).read_text(errors="replace")[-chars:]


def headline(record: dict) -> str:
    """One figure for the summary table: a training's last loss, else the first recall /
    accuracy / CIDEr figure of the evaluation."""
    metrics = record["metrics"]
    if "train/loss" in metrics:
        return f"loss {metrics['train/loss']:.4f}"
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and any(
                k in key for k in ("VCMR_0.7-r1", "VR_r1", "acc", "CIDEr")):
            return f"{key.rsplit('/', 1)[-1]} {value:g}"
    return "-"


def summary_markdown(records: list) -> str:
    """A markdown table of the runs: entry, processes, precision, exit code, seconds, headline."""
    lines = ["| entry | script | processes | precision | exit | seconds | figure |",
             "|---|---|---:|---|---:|---:|---|"]
    for r in records:
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(f"| {r['label']} | `{r['script']}` | {r['nproc']} | {r['precision']}{note}"
                     f" | {r['rc']} | {r['seconds']:.1f} | {headline(r)} |")
    return "\n".join(lines) + "\n"


def report(record: dict) -> dict:
    """Print one line for a finished run (and the end of its log when it failed)."""
    status = "ok" if record["rc"] == 0 else f"FAILED (exit {record['rc']})"
    print(f"{record['label']}: {status} in {record['seconds']:.1f} s, {headline(record)}"
          f" (log: {record['log']})", flush=True)
    if record["rc"] != 0:
        print(log_tail(record, 1500), file=sys.stderr, flush=True)
    return record


def plan(names) -> list:
    """``names`` with each evaluation's training entry added before it, in ENTRIES order."""
    wanted = set(names)
    wanted |= {EVAL[n].trains for n in names if n in EVAL}
    return [n for n in ENTRIES if n in wanted]


def run_plan(smoke: Smoke, names, nproc: int = 1, tag: str = "", jobs: int = 1) -> list:
    """Records of ``plan(names)``, ``jobs`` runs at a time; an evaluation starts once its
    training has finished. Trainings are queued first, so a worker waiting for one never holds
    up a training still queued (no deadlock)."""
    names = plan(names)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {}
        for name in names:
            trains = futures.get(EVAL[name].trains) if name in EVAL else None

            def job(name=name, trains=trains):
                if trains is not None:
                    trains.result()
                return report(smoke.run(name, nproc, tag, tag))
            futures[name] = pool.submit(job)
        return [futures[name].result() for name in names]


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dbs", required=True, help="folder with txt_db/ and video_db/")
    p.add_argument("--out", required=True, help="output folder (runs, configs, logs)")
    p.add_argument("--only", nargs="+", choices=ENTRIES, default=list(ENTRIES),
                   help="entries to run (an evaluation brings its training along)")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun if > 1)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--steps", type=int, default=2, help="training updates per run")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses --nproc "
                   "processes of OMP_NUM_THREADS threads, default 1)")
    p.add_argument("--tag", default="", help="suffix of the run folders (OUT/NAME_TAG)")
    p.add_argument("--markdown", default=None, help="also write the summary table here")
    p.add_argument("--no_java", action="store_true",
                   help="score TVC without Java (no METEOR; faster on a small machine)")
    opts = p.parse_args(argv)
    opts.extra = extra
    return opts


class SmokeFailed(HeroError):
    """Some runs failed; their logs are named."""


def main(argv=None) -> list:
    """Run the planned entries in order; print one line per run and the summary table.
    Returns the records; raises :class:`SmokeFailed` (exit 1) when a run failed."""
    opts = parse_args(argv)
    smoke = Smoke(opts.dbs, opts.out, opts.steps, opts.precision, opts.extra,
                  timeout=opts.timeout, no_java=opts.no_java)
    # restored afterwards: a handler left behind would be inherited by any process a caller
    # forks later (e.g. a multiprocessing pool, whose terminate() then hangs)
    previous = {s: signal.signal(s, stop_children) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        records = run_plan(smoke, opts.only, opts.nproc, opts.tag, opts.jobs)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    table = summary_markdown(records)
    print(table)
    if opts.markdown:
        Path(opts.markdown).write_text(table)
    failed = [r for r in records if r["rc"] != 0]
    if failed:
        raise SmokeFailed(f"{len(failed)} of {len(records)} runs failed: "
                          + ", ".join(f"{r['label']} (log {r['log']})" for r in failed))
    return records


if __name__ == "__main__":
    run_main(main)
