"""Throughput benchmarks, one sub-command each, printing JSON lines.

Usage (from the repository root)::

    python scripts/benchmark.py data [--corpus DBS] [--workers 0 2] [--num_batches 20]
    python scripts/benchmark.py model [--model_videos 8] [--model_iters 10] [...]
    python scripts/benchmark.py tvc [--corpus DBS --toker DIR] [--tvc_config FILE] [...]
    python scripts/benchmark.py extract [--extract_seconds 6] [--extract_workers 0 2] [...]
    python scripts/benchmark.py virtual [--virtual_n 2] [--virtual_task vsm] [...]
    python scripts/benchmark.py search [--search_videos 1000] [--search_queries 7]
    python scripts/benchmark.py all  [...]

Every line is ``{"figure": str, "value": float, "unit": str, "device": str}``.

Extension point: a benchmark is a :class:`Bench` in :data:`BENCHMARKS` (sub-command name ->
``Bench(help, add_arguments, run)``); ``run(opts)`` returns a list of result dicts. ``model``,
``train``, ``vcmr`` and ``tvc`` are meant to be added there with :func:`register`; ``all``
runs every registered benchmark with the shared flags and writes ``docs/benchmarks.md``: each
figure beside its reference (the baseline variant of the same run, see :data:`REFERENCE_RULES`)
and the ratio, with the machine named.

``data`` measures items/s and batches/s of the VCMR training loader (items = queries) and of
the pre-training MetaLoader over MLM, MFM-NCE, FOM and VSM with ratios 2:2:1:2 (items =
videos), for each ``--workers`` value. The first batch (worker start-up) is excluded from the
timing. Batches go through ``PrefetchLoader``, so on a GPU machine host->device copies count.
Without ``--corpus`` the toy ``demo`` corpus is generated and built into a temporary folder
with ``scripts/make_toy_corpus.py`` and ``scripts/build_toy_dbs.sh``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from itertools import islice
from types import SimpleNamespace
from typing import NamedTuple

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from scripts import bench_model, bench_packing  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Bench(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], list]


BENCHMARKS: dict[str, Bench] = {}


def register(name: str, help: str, add_arguments=lambda parser: None):
    """Decorator adding ``run(opts) -> list[dict]`` as sub-command ``name``."""
    def wrap(run):
        BENCHMARKS[name] = Bench(help, add_arguments, run)
        return run
    return wrap


def device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name()}"
    return f"cpu ({os.cpu_count()} cores)"


def result(figure: str, value: float, unit: str) -> dict:
    return {"figure": figure, "value": round(float(value), 3), "unit": unit,
            "device": device_name()}


# ---------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------
@contextmanager
def corpus_dir(corpus):
    """Yield ``corpus`` or, when None, a freshly built toy ``demo`` corpus (deleted after)."""
    if corpus is not None:
        if not os.path.isdir(corpus):
            raise FileNotFoundError(f"--corpus folder not found: {corpus}")
        yield corpus
        return
    script = os.path.join(REPO, "scripts", "build_toy_dbs.sh")
    if not os.path.isfile(script):
        raise FileNotFoundError(f"{script} is missing: pass --corpus (a folder holding txt_db/ "
                                "and video_db/) instead")
    with tempfile.TemporaryDirectory(prefix="hero_bench_") as tmp:
        raw, dbs = os.path.join(tmp, "raw"), os.path.join(tmp, "dbs")
        subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_toy_corpus.py"),
                        "--out", raw, "--size", "demo"], check=True, stdout=sys.stderr)
        subprocess.run(["bash", script, raw, dbs], check=True, stdout=sys.stderr, cwd=REPO,
                       env={**os.environ, "PYTHON": sys.executable})
        yield dbs


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default=None,
                        help="folder with txt_db/ and video_db/ (default: build the toy demo)")
    parser.add_argument("--sub_db", default="txt_db/tv_subtitles.db",
                        help="subtitle DB, relative to --corpus")
    parser.add_argument("--vfeat_db", default="video_db/tv", help="video DB, relative to --corpus")
    parser.add_argument("--query_db", default="txt_db/tvr_train.db",
                        help="VCMR query DB, relative to --corpus")
    parser.add_argument("--pretrain_idx", default="txt_db/pretrain_splits/tv_train.json",
                        help="pre-training video list, relative to --corpus")
    parser.add_argument("--vfeat_interval", type=float, default=1.5)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="DataLoader worker counts to measure")
    parser.add_argument("--batch_size", type=int, default=8, help="items per batch")
    parser.add_argument("--num_batches", type=int, default=20, help="timed batches per loader")


def time_loader(loader, num_batches: int, count_items, desc: str):
    """``(items/s, batches/s)`` over ``num_batches`` batches after one warm-up batch."""
    it = iter(loader)
    next(it)
    items, start = 0, time.perf_counter()
    for batch in tqdm(islice(it, num_batches), total=num_batches, desc=desc, file=sys.stderr):
        items += count_items(batch)
    elapsed = time.perf_counter() - start
    return items / elapsed, num_batches / elapsed


def _loader_opts(opts, n_workers: int):
    return SimpleNamespace(train_batch_size=opts.batch_size, val_batch_size=opts.batch_size,
                           n_workers=n_workers, pin_mem=True, max_clip_len=100, sub_ctx_len=0,
                           max_txt_len=60, vfeat_version="resnet_slowfast",
                           compressed_db=False, task="tvr")


def vcmr_loader(root: str, opts, lopts):
    from data.data import load_video_sub_dataset
    from data.loader import PrefetchLoader, build_dataloader
    from data.txt_db import QueryTokLmdb
    from data.vcmr import VcmrDataset, get_video_ids, vcmr_collate
    query_path = os.path.join(root, opts.query_db)
    video_db = load_video_sub_dataset(os.path.join(root, opts.vfeat_db),
                                      os.path.join(root, opts.sub_db), opts.vfeat_interval, lopts)
    dataset = VcmrDataset(get_video_ids(query_path), video_db,
                          QueryTokLmdb(query_path, lopts.max_txt_len))
    return PrefetchLoader(build_dataloader(dataset, Counted(vcmr_collate), True, lopts))


def pretrain_loader(root: str, opts, lopts):
    """MetaLoader over the four TV pre-training tasks with the released ratios 2:2:1:2."""
    from data.data import load_video_sub_dataset
    from data.fom import FomDataset, fom_collate
    from data.loader import MetaLoader, PrefetchLoader, build_dataloader
    from data.mfm import MfmDataset, mfm_collate
    from data.mlm import VideoMlmDataset, mlm_collate
    from data.vsm import VsmDataset, vsm_collate
    with open(os.path.join(root, opts.pretrain_idx)) as f:
        vids = json.load(f)
    video_db = load_video_sub_dataset(os.path.join(root, opts.vfeat_db),
                                      os.path.join(root, opts.sub_db), opts.vfeat_interval, lopts)
    tasks = {"mlm_tv_all": (VideoMlmDataset, mlm_collate, 2),
             "mfm-nce_tv_all": (MfmDataset, mfm_collate, 2),
             "fom_tv_all": (FomDataset, fom_collate, 1),
             "vsm_tv_all": (VsmDataset, vsm_collate, 2)}
    loaders = {name: (build_dataloader(cls(vids, video_db), Counted(collate), True, lopts), ratio)
               for name, (cls, collate, ratio) in tasks.items()}
    return PrefetchLoader(MetaLoader(loaders, accum_steps=1))


class Counted:
    """Collate wrapper returning ``(n_items, batch)``: MLM batches no longer show their videos."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items):
        return len(items), self.collate(items)


@register("data", "items/s and batches/s of the VCMR and pre-training loaders",
          lambda parser: (add_corpus_arguments(parser), add_data_arguments(parser)))
def bench_data(opts) -> list:
    results = []
    with corpus_dir(opts.corpus) as root:
        for n_workers in opts.workers:
            lopts = _loader_opts(opts, n_workers)
            for name, build, count in (
                    ("vcmr", vcmr_loader, lambda batch: batch[0]),
                    ("pretrain", pretrain_loader, lambda task_batch: task_batch[1][0])):
                loader = build(root, opts, lopts)
                items, batches = time_loader(loader, opts.num_batches, count,
                                             f"{name} workers={n_workers}")
                prefix = f"data/{name}/workers={n_workers}/bs={opts.batch_size}"
                results += [result(f"{prefix}/items_per_s", items, "items/s"),
                            result(f"{prefix}/batches_per_s", batches, "batches/s")]
                del loader
    return results


# ---------------------------------------------------------------------------------------------
# model (code in scripts/bench_model.py)
# ---------------------------------------------------------------------------------------------
def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    bench_model.add_model_arguments(parser)
    bench_packing.add_packing_arguments(parser)


@register("model", "forward+backward of HeroForVcmr / HeroForTvc and TVC greedy decoding, "
          "sdpa vs math attention; VCMR step and encoding, packed vs padded F-TRM rows",
          _add_model_arguments)
def bench_model_all(opts) -> list:
    return bench_model.run_model_bench(opts) + bench_packing.run_packing_bench(opts)


# ---------------------------------------------------------------------------------------------
# vcmr (full-corpus ranking, vectorised vs reference; code in eval/bench_vcmr.py)
# ---------------------------------------------------------------------------------------------
def _add_vcmr_arguments(parser: argparse.ArgumentParser) -> None:
    from eval.bench_vcmr import add_arguments
    add_arguments(parser)


@register("vcmr", "full-corpus VCMR/SVMR/VR ranking, vectorised vs reference (synthetic)",
          _add_vcmr_arguments)
def bench_vcmr(opts) -> list:
    from eval.bench_vcmr import bench_vcmr as run
    return run(opts)


# ---------------------------------------------------------------------------------------------
# tvc (TVC decoding cached vs full recompute, QA/VIOLIN eval speed; code in eval/bench_tvc.py)
# ---------------------------------------------------------------------------------------------
def _add_tvc_arguments(parser: argparse.ArgumentParser) -> None:
    from eval.bench_tvc import add_arguments
    add_corpus_arguments(parser)
    add_arguments(parser)


@register("tvc", "inf_tvc captions/s with the KV cache vs full recompute per step, and "
          "TVQA/VIOLIN eval examples/s", _add_tvc_arguments)
def bench_tvc(opts) -> list:
    from eval.bench_tvc import bench_tvc as run
    return run(opts, corpus_dir, result)


# ---------------------------------------------------------------------------------------------
# extract (feature extraction from video files; code in scripts/extract/bench.py)
# ---------------------------------------------------------------------------------------------
def _add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    from scripts.extract.bench import add_arguments
    add_arguments(parser)


@register("extract", "seconds of video extracted per second (ResNet-152 + SlowFast R50), "
          "decode vs network share, CPU and CUDA", _add_extract_arguments)
def bench_extract(opts) -> list:
    from scripts.extract.bench import run
    return run(opts)


# ---------------------------------------------------------------------------------------------
# train (pre-training loop speed and engine overhead; code in scripts/bench_train.py)
# ---------------------------------------------------------------------------------------------
def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from scripts.bench_train import add_train_arguments
    add_corpus_arguments(parser)
    add_train_arguments(parser)


@register("train", "pre-training loop updates/s and videos/s; engine overhead over the pure "
          "model step", _add_train_arguments)
def bench_train(opts) -> list:
    from scripts.bench_train import run_train_bench
    return run_train_bench(opts, corpus_dir, result)


# ---------------------------------------------------------------------------------------------
# virtual (--virtual_world_size N on one process vs N processes; code in scripts/bench_virtual.py)
# ---------------------------------------------------------------------------------------------
def _add_virtual_arguments(parser: argparse.ArgumentParser) -> None:
    from scripts.bench_virtual import add_virtual_arguments
    add_corpus_arguments(parser)
    add_virtual_arguments(parser)


@register("virtual", "--virtual_world_size N on 1 process vs N processes and vs a plain "
          "1-process run: seconds per update and peak memory", _add_virtual_arguments)
def bench_virtual(opts) -> list:
    from scripts.bench_virtual import run_virtual_bench
    return run_virtual_bench(opts, corpus_dir, result)


# ---------------------------------------------------------------------------------------------
# search (moment-search query latency on CPU, 1,000 synthetic videos; code in search/bench.py)
# ---------------------------------------------------------------------------------------------
def _add_search_arguments(parser: argparse.ArgumentParser) -> None:
    from search.bench import add_arguments
    add_arguments(parser)


@register("search", "MomentIndex.search latency on CPU over a synthetic 1,000-video collection "
          "(full-size model, TVR settings; median of the timed queries)", _add_search_arguments)
def bench_search(opts) -> list:
    from search.bench import bench_search as run
    return run(opts, result)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
# A figure's reference is the same measurement of the baseline variant in the same run.
REFERENCE_RULES = (("/sdpa/", "/math/"), ("/packed/", "/padded/"), ("/jagged/", "/padded/"),
                   ("/fast/", "/reference/"), ("/engine/", "/pure/"),
                   ("/decode_cached/", "/decode_full_recompute/"),
                   ("/tvc_greedy_cached/", "/tvc_greedy_full/"))
RATIO_UNITS = ("x", "fraction", "bool")


def reference_of(figure: str, names) -> str | None:
    """The figure's baseline in ``names`` (workers=N -> workers=0, sdpa -> math, ...)."""
    candidates = [figure.replace(a, b) for a, b in REFERENCE_RULES if a in figure]
    if "/workers=" in figure and "/workers=0/" not in figure:
        head, tail = figure.split("/workers=", 1)
        candidates.append(f"{head}/workers=0/{tail.split('/', 1)[1]}")
    return next((c for c in candidates if c in names and c != figure), None)


def benchmarks_markdown(results: list, commands: str) -> str:
    """docs/benchmarks.md: every figure, its reference and value / reference, machine named."""
    by_name = {r["figure"]: r for r in results}
    devices = sorted({r["device"] for r in results})
    lines = ["# Benchmarks", "",
             f"Measured with `{commands}` on: {'; '.join(devices)} "
             f"({platform.platform()}, Python {platform.python_version()}, torch "
             f"{torch.__version__}), {time.strftime('%Y-%m-%d')}.", "",
             "Each figure is shown with its reference (the baseline variant measured in the "
             "same run) and the ratio value / reference; figures that are already ratios "
             "(unit `x`, `fraction`) stand alone. On a shared machine absolute numbers vary "
             "from run to run; the ratios are the figures to compare.", "",
             "| figure | value | unit | reference | reference value | value / reference |",
             "|---|---:|---|---|---:|---:|"]
    for r in results:
        ref = None if r["unit"] in RATIO_UNITS else reference_of(r["figure"], by_name)
        ref_value = by_name[ref]["value"] if ref else None
        ratio = f"{r['value'] / ref_value:.3f}" if ref_value else "-"
        lines.append(f"| `{r['figure']}` | {r['value']:g} | {r['unit']} | "
                     f"{f'`{ref}`' if ref else '-'} | "
                     f"{'-' if ref_value is None else f'{ref_value:g}'} | {ratio} |")
    return "\n".join(lines) + "\n"


def _add_all_arguments(parser: argparse.ArgumentParser) -> None:
    """Union of every benchmark's flags (shared ones such as ``--corpus`` declared once)."""
    for name, bench in BENCHMARKS.items():
        if name != "all":
            bench.add_arguments(parser)
    parser.add_argument("--docs", default=os.path.join(REPO, "docs", "benchmarks.md"),
                        help="markdown file to write ('' to skip)")


@register("all", "every registered benchmark in turn; writes docs/benchmarks.md",
          _add_all_arguments)
def bench_all(opts) -> list:
    results = [r for name, bench in BENCHMARKS.items() if name != "all" for r in bench.run(opts)]
    if opts.docs:
        os.makedirs(os.path.dirname(os.path.abspath(opts.docs)), exist_ok=True)
        with open(opts.docs, "w") as f:
            f.write(benchmarks_markdown(results, "python scripts/benchmark.py all"))
        print(f"wrote {opts.docs}", file=sys.stderr)
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    subs = parser.add_subparsers(dest="command", required=True)
    for name, bench in BENCHMARKS.items():
        bench.add_arguments(subs.add_parser(name, help=bench.help, conflict_handler="resolve"))
    return parser.parse_args(argv)


def main(argv=None) -> None:
    opts = parse_args(argv)
    for line in BENCHMARKS[opts.command].run(opts):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
