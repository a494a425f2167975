"""The ``virtual`` benchmark: what ``--virtual_world_size N`` costs (issue 16).

Three variants of the same pre-training run (toy corpus, ``--virtual_task``: ``vsm``, whose
ranking losses all-gather and so take the extra first pass, or ``mlm``, which does not):

* ``virtual``: 1 process with ``--virtual_world_size N``;
* ``real``: N processes under ``torchrun`` (Gloo on CPU; on GPU only when N GPUs exist);
* ``plain``: 1 process, 1 rank (what one GPU computes without the flag).

Each variant runs in fresh processes ``--virtual_rounds`` times, in alternating order (so load
drift hits all alike); each run makes ``--virtual_warmup`` untimed updates, then times
``--virtual_steps`` (>= 5) updates one by one. Figures: the median seconds per update, the
peak memory (CUDA: ``max_memory_allocated``; CPU: the peak RSS of the process, largest rank),
and the ratios virtual/real and virtual/plain. The worker is this module run as a script.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASK_INDEX = {"mlm": 0, "vsm": 3}  # positions in config/pretrain-demo.json's task list
VARIANTS = ("virtual", "real", "plain")


def add_virtual_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--virtual_n", type=int, default=2, help="N, the emulated ranks")
    parser.add_argument("--virtual_task", default="vsm", choices=sorted(TASK_INDEX))
    parser.add_argument("--virtual_batch_size", type=int, default=4, help="videos per rank")
    parser.add_argument("--virtual_steps", type=int, default=5, help="timed updates per run")
    parser.add_argument("--virtual_warmup", type=int, default=2, help="untimed first updates")
    parser.add_argument("--virtual_rounds", type=int, default=3, help="runs of each variant")


def write_config(root: str, opts, path: Path) -> Path:
    """The demo pre-training config on ``root`` with only ``--virtual_task`` drawn."""
    cfg = json.loads((REPO / "config" / "pretrain-demo.json").read_text())
    ratio = [0] * len(cfg["targets"][0]["splits"][0]["tasks"])
    ratio[TASK_INDEX[opts.virtual_task]] = 1
    cfg["targets"][0]["splits"][0]["ratio"] = ratio
    cfg.update(txt_db=os.path.join(root, "txt_db"), img_db=os.path.join(root, "video_db"),
               train_batch_size=opts.virtual_batch_size, gradient_accumulation_steps=1,
               valid_steps=10**9, save_steps=0, n_workers=0, dropout=0.1,
               num_train_steps=10**6)
    path.write_text(json.dumps(cfg))
    return path


def worker(config: str, out_dir: str, virtual: int, warmup: int, steps: int, report: str):
    """One training process (rank of a torchrun job or alone): per-update seconds and peak
    memory; rank 0 writes them, with the largest peak over ranks, to ``report``."""
    from pretrain import PretrainTask, parse_args
    from utils.distributed import all_gather_object, get_rank
    from utils.engine import Trainer
    opts = parse_args(["--config", config, "--output_dir", out_dir, "--log_steps", "10000000",
                       "--virtual_world_size", str(virtual)])
    trainer = Trainer(PretrainTask(opts), opts)
    trainer.setup()
    cuda = trainer.device.type == "cuda"
    times = []
    try:
        for i in range(warmup + steps):
            if i == warmup and cuda:
                torch.cuda.reset_peak_memory_stats()
            trainer.opts.num_train_steps = trainer.global_step + 1
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.train()
            if cuda:
                torch.cuda.synchronize()
            trainer.pbar.close()
            times.append(time.perf_counter() - start)
    finally:
        trainer.close()
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    peaks = all_gather_object(peak)
    if get_rank() == 0:
        Path(report).write_text(json.dumps({"times": times[warmup:], "peak": max(peaks)}))


def _launch(variant: str, opts, config: Path, tmp: str, i: int) -> dict:
    n = opts.virtual_n
    prefix = [sys.executable]
    if variant == "real":
        prefix += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    virtual = 1 if variant == "plain" else n
    report = os.path.join(tmp, f"{variant}_{i}.json")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    subprocess.run([*prefix, str(Path(__file__).resolve()), "--worker", str(config),
                    os.path.join(tmp, f"run_{variant}_{i}"), str(virtual),
                    str(opts.virtual_warmup), str(opts.virtual_steps), report],
                   check=True, cwd=REPO, stdout=sys.stderr,
                   env={**env, "PYTHONPATH": str(REPO)})
    return json.loads(Path(report).read_text())


def variants(n: int) -> list:
    """Real N processes need N GPUs on a GPU machine (CPU: N Gloo processes)."""
    if torch.cuda.is_available() and torch.cuda.device_count() < n:
        return ["virtual", "plain"]
    return list(VARIANTS)


def run_virtual_bench(opts, corpus_dir, result) -> list:
    if opts.virtual_steps < 5:
        raise ValueError("--virtual_steps must be at least 5")
    names, runs = variants(opts.virtual_n), {}
    with corpus_dir(opts.corpus) as root, tempfile.TemporaryDirectory() as tmp:
        config = write_config(root, opts, Path(tmp) / "pretrain.json")
        for i in range(opts.virtual_rounds):
            for variant in (names if i % 2 == 0 else names[::-1]):
                runs.setdefault(variant, []).append(_launch(variant, opts, config, tmp, i))
    return summarise(runs, opts, result)


def summarise(runs: dict, opts, result) -> list:
    tag = f"virtual/{opts.virtual_task}/N={opts.virtual_n}/bs={opts.virtual_batch_size}"
    step = {v: statistics.median(t for r in rs for t in r["times"]) for v, rs in runs.items()}
    peak = {v: max(r["peak"] for r in rs) / 2**20 for v, rs in runs.items()}
    out = []
    for v in runs:
        out += [result(f"{tag}/{v}/s_per_update", step[v], "s"),
                result(f"{tag}/{v}/peak_memory", peak[v], "MiB")]
    for ref in ("real", "plain"):
        if ref in runs:
            out += [result(f"{tag}/virtual_over_{ref}/step_time", step["virtual"] / step[ref],
                           "x"),
                    result(f"{tag}/virtual_over_{ref}/peak_memory",
                           peak["virtual"] / peak[ref], "x")]
    return out


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    cfg, out, virt, warm, n_steps, rep = sys.argv[2:8]
    worker(cfg, out, int(virt), int(warm), int(n_steps), rep)
