"""``scripts/benchmark.py extract``: video seconds extracted per wall second, decode vs network.

Synthetic clips (``--extract_videos`` of ``--extract_seconds`` s, ``--extract_resolution``
at ``--extract_fps``, mpeg4) are written to a temporary folder, then extracted from scratch
(random weights, full-size networks unless ``--extract_tiny``) on each device (CPU, plus CUDA
when present) and each ``--extract_workers`` count. Figures per run:
``video_s_per_s`` (seconds of video per second of wall time), ``decode_share`` and
``network_share`` = decode (worker) time and network time over their sum: with workers the
two overlap, so the shares say which side bounds the run, not how the wall time splits. On
CUDA one untimed warm-up extraction runs first (cuDNN autotuning, allocator).
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

from scripts.extract.pipeline import ExtractConfig, extract, find_videos, plan_jobs
from scripts.extract.recipe import FRAME_SIZE, STREAM_DIRS
from scripts.extract.video_io import write_test_video
from scripts.extract.weights import build_streams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--extract_videos", type=int, default=2, help="synthetic clips")
    parser.add_argument("--extract_seconds", type=float, default=6.0, help="seconds per clip")
    parser.add_argument("--extract_resolution", default="640x360", help="WIDTHxHEIGHT")
    parser.add_argument("--extract_fps", type=int, default=30)
    parser.add_argument("--extract_workers", type=int, nargs="+", default=[0, 2],
                        help="decoding worker counts to measure")
    parser.add_argument("--extract_batch_size", type=int, default=8, help="rows per batch")
    parser.add_argument("--extract_frame_size", type=int, default=FRAME_SIZE)
    parser.add_argument("--extract_tiny", action="store_true",
                        help="one block per stage (measures the data path, not the networks)")
    parser.add_argument("--extract_devices", nargs="+", default=None,
                        help="default: cpu, plus cuda when available")


def _device_label(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} {torch.cuda.get_device_name(torch.device(device))}"
    return f"cpu ({os.cpu_count()} cores)"


def _figures(tag: str, summary, device: str) -> list:
    busy = max(summary.decode_s + summary.network_s, 1e-9)
    values = [("video_s_per_s", summary.video_s / max(summary.wall_s, 1e-9), "s/s"),
              ("decode_share", summary.decode_s / busy, "fraction"),
              ("network_share", summary.network_s / busy, "fraction")]
    return [{"figure": f"{tag}/{name}", "value": round(float(value), 3), "unit": unit,
             "device": _device_label(device)} for name, value, unit in values]


def _run_once(video_dir: str, out_dir: str, streams: dict, cfg: ExtractConfig):
    jobs, _ = plan_jobs(find_videos(video_dir), out_dir, list(STREAM_DIRS))
    summary = extract(jobs, out_dir, streams, cfg)
    if summary.failures:
        raise RuntimeError(f"benchmark extraction failed: {summary.failures}")
    return summary


def run(opts) -> list:
    width, height = (int(v) for v in opts.extract_resolution.lower().split("x"))
    devices = opts.extract_devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    streams = build_streams(list(STREAM_DIRS), random_weights=True, tiny=opts.extract_tiny)
    results = []
    with tempfile.TemporaryDirectory(prefix="hero_extract_bench_") as tmp:
        video_dir = os.path.join(tmp, "videos")
        os.makedirs(video_dir)
        for i in range(opts.extract_videos):
            write_test_video(os.path.join(video_dir, f"clip{i}.mp4"), opts.extract_seconds,
                             opts.extract_fps, width, height)
        for device in devices:
            bf16 = device.startswith("cuda")
            for workers in opts.extract_workers:
                cfg = ExtractConfig(batch_size=opts.extract_batch_size, num_workers=workers,
                                    device=device, precision="bf16" if bf16 else "fp32",
                                    frame_size=opts.extract_frame_size)
                if bf16 and not results:
                    _run_once(video_dir, os.path.join(tmp, "warmup"), streams, cfg)
                out_dir = os.path.join(tmp, f"out_{device}_{workers}")
                summary = _run_once(video_dir, out_dir, streams, cfg)
                tag = f"extract/{device}/workers={workers}/bs={opts.extract_batch_size}"
                results += _figures(tag, summary, device)
    return results
