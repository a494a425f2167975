"""``scripts/benchmark.py vcmr``: vectorised vs reference full-corpus ranking.

A synthetic corpus (``--vcmr_videos`` videos of random length ≤ ``--vcmr_clip_len`` frames,
``--vcmr_queries`` queries) is ranked batch by batch with both implementations of
:func:`eval.vcmr_ranking.rank_batch` (VR + VCMR + SVMR, TVR settings). Each query batch's
inputs (span probabilities, video scores, GT videos) are drawn from a seed derived from the
batch index, so both implementations see the same numbers; only the ranking is timed. Reports
seconds and queries/s per implementation, the speed-up, whether the ranked lists are
identical, and peak memory (CUDA allocator peak on a GPU, else the process's peak RSS, which
only grows, so the reference row includes the fast run).
"""
from __future__ import annotations

import os
import resource
import sys
import time
from types import SimpleNamespace

import torch
from tqdm import tqdm

from eval.vcmr_ranking import rank_batch

TVR_RANKING = dict(k_videos=100, min_l=2, max_l=16, max_before_nms=200, use_exp=True,
                   alpha=20.0)


def add_arguments(parser) -> None:
    parser.add_argument("--vcmr_videos", type=int, default=1000, help="corpus size")
    parser.add_argument("--vcmr_queries", type=int, default=1000, help="number of queries")
    parser.add_argument("--vcmr_clip_len", type=int, default=100, help="max frames (L)")
    parser.add_argument("--vcmr_q_batch", type=int, default=80, help="queries per batch")
    parser.add_argument("--vcmr_seed", type=int, default=0)
    parser.add_argument("--vcmr_impls", nargs="+", default=["fast", "reference"],
                        choices=["fast", "reference"],
                        help="implementations to time (the speed-up and identical-output "
                             "figures need both; the reference is too slow for 10k x 10k)")


def synthetic_batch(batch_idx, n_queries, n_videos, clip_len, seed, device):
    """(video scores, p_st, p_ed, gt_local) of one query batch, reproducible per index and
    device. Drawn on ``device``: at 10k videos a batch is ~10^8 numbers, which the CPU would
    take longer to draw than the GPU takes to rank them."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch_idx)
    lengths = torch.randint(clip_len // 2, clip_len + 1,
                            (n_videos,), generator=torch.Generator().manual_seed(seed))
    valid = torch.arange(clip_len)[None, :] < lengths[:, None]
    valid = valid.to(device)
    probs = []
    for _ in range(2):
        logits = torch.randn(n_queries, n_videos, clip_len, generator=gen, device=device) * 3
        probs.append(torch.softmax(logits.masked_fill(~valid, -1e4), dim=-1))
    scores = torch.rand(n_queries, n_videos, generator=gen, device=device) * 2 - 1
    gt_local = torch.randint(0, n_videos, (n_queries,), generator=gen, device=device)
    return [scores, *probs, gt_local]


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_impl(impl, opts, device):
    """(seconds spent ranking, ranked lists of every batch, peak memory in MiB)."""
    cfg = SimpleNamespace(**TVR_RANKING)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    outputs, elapsed = [], 0.0
    starts = range(0, opts.vcmr_queries, opts.vcmr_q_batch)
    for b, start in enumerate(tqdm(starts, desc=f"vcmr {impl}", file=sys.stderr)):
        n = min(opts.vcmr_q_batch, opts.vcmr_queries - start)
        scores, p_st, p_ed, gt = synthetic_batch(b, n, opts.vcmr_videos, opts.vcmr_clip_len,
                                                 opts.vcmr_seed, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        outputs.append(rank_batch(cfg, scores, p_st, p_ed, gt, impl))
        elapsed += time.perf_counter() - t0
        del scores, p_st, p_ed, gt
    return elapsed, outputs, _peak_mb(device)


def _device_name(device) -> str:
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    return f"cpu ({os.cpu_count()} cores)"


def bench_vcmr(opts) -> list:
    """Benchmark result dicts ``{"figure", "value", "unit", "device"}``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = _device_name(device)
    size = f"{opts.vcmr_videos}v_x_{opts.vcmr_queries}q_L{opts.vcmr_clip_len}"
    row = lambda fig, value, unit: {"figure": f"vcmr/{size}/{fig}",
                                    "value": round(float(value), 3), "unit": unit,
                                    "device": name}
    mem_unit = "MiB (CUDA peak)" if device.type == "cuda" else "MiB (process peak RSS)"
    figures, runs = [], {}
    for impl in dict.fromkeys(opts.vcmr_impls):
        secs, out, mem = runs[impl] = run_impl(impl, opts, device)
        figures += [row(f"{impl}/seconds", secs, "s"),
                    row(f"{impl}/queries_per_s", opts.vcmr_queries / secs, "queries/s"),
                    row(f"{impl}/peak_memory", mem, mem_unit)]
    if {"fast", "reference"} <= runs.keys():
        figures += [row("speedup", runs["reference"][0] / runs["fast"][0], "x"),
                    row("identical_output", float(runs["fast"][1] == runs["reference"][1]),
                        "bool")]
    return figures
