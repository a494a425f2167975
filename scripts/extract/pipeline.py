"""Batched, resumable extraction of per-clip feature files, and ``--check_against``.

Layout written (read by ``scripts/collect_video_feature_paths.py``):
``{out}/resnet_features/{folder}/{vid}.npz`` and ``{out}/slowfast_features/{folder}/{vid}.npz``,
key ``features``, float16, one row per interval. ``vid`` is the file stem; ``folder`` is the
video's sub-folder of ``--video_dir`` (``basename(video_dir)`` for videos at its top level).

Decoding runs in DataLoader workers (each worker takes every n-th video and streams chunks of
rows), the networks run in the main process on row batches gathered across videos, with bf16
autocast on CUDA. Resume: a stream whose file exists is skipped (files are written to a
temporary name and renamed, so an existing file is complete); a video with every stream done is
not decoded. A video that fails to decode is logged with its path, its partial rows are
dropped, the run goes on, and ``{out}/extract_failures.json`` lists every failure of the run.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from scripts.extract.recipe import (
    DEFAULT_FRAME_INTERVAL,
    DEFAULT_L2_NORMALIZE,
    FEATURE_DTYPE,
    FEATURE_KEY,
    FRAME_SIZE,
    STREAM_DIRS,
    VIDEO_EXTENSIONS,
)
from scripts.extract.video_io import iter_chunks

LOGGER = logging.getLogger(__name__)
FAILURES_FILE = "extract_failures.json"


@dataclass(frozen=True)
class VideoJob:
    path: str
    vid: str
    folder: str
    streams: tuple


@dataclass
class ExtractConfig:
    interval: float = DEFAULT_FRAME_INTERVAL
    batch_size: int = 16          # rows per network batch (and per decoded chunk)
    num_workers: int = 4
    device: str = "cpu"
    precision: str = "fp32"       # "bf16" autocast (CUDA default) or "fp32"
    l2_normalize: tuple = DEFAULT_L2_NORMALIZE
    frame_size: int = FRAME_SIZE


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failures: list = field(default_factory=list)   # [(path, reason)]
    rows: int = 0
    video_s: float = 0.0
    decode_s: float = 0.0
    network_s: float = 0.0
    wall_s: float = 0.0


# ---------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------
def feature_path(out_dir: str, stream: str, folder: str, vid: str) -> str:
    return os.path.join(out_dir, STREAM_DIRS[stream], folder, f"{vid}.npz")


def find_videos(video_dir: str, extensions=VIDEO_EXTENSIONS) -> list:
    """Sorted ``(path, vid, folder)``; the second file of a same-stem pair in one folder is
    dropped (both would write one output) and stems repeated across folders are counted, since
    ``collect_video_feature_paths.py`` keys by stem (pitfall 24). Both are logged once."""
    if not os.path.isdir(video_dir):
        raise FileNotFoundError(f"--video_dir not found: {video_dir}")
    top = os.path.basename(os.path.normpath(video_dir))
    found, seen, n_files = [], set(), 0
    for dirpath, dirs, files in os.walk(video_dir):
        dirs.sort()
        rel = os.path.relpath(dirpath, video_dir)
        folder = top if rel == "." else rel
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in extensions:
                continue
            n_files += 1
            if (folder, stem) not in seen:
                seen.add((folder, stem))
                found.append((os.path.join(dirpath, name), stem, folder))
    if n_files > len(found):
        LOGGER.warning("%d videos dropped: same stem as another video of their folder",
                       n_files - len(found))
    n_stems = len({vid for _, vid, _ in found})
    if n_stems < len(found):
        LOGGER.warning("%d videos share a stem with a video of another folder; "
                       "collect_video_feature_paths.py keeps only one of each",
                       len(found) - n_stems)
    return found


def plan_jobs(videos: list, out_dir: str, streams) -> tuple:
    """``(jobs, n_skipped)``: each job lists the streams whose file is not written yet."""
    jobs, skipped = [], 0
    for path, vid, folder in videos:
        todo = tuple(s for s in streams if not os.path.isfile(feature_path(out_dir, s, folder,
                                                                           vid)))
        if todo:
            jobs.append(VideoJob(path, vid, folder, todo))
        else:
            skipped += 1
    if skipped:
        LOGGER.info("%d videos already extracted (resume): skipped", skipped)
    return jobs, skipped


# ---------------------------------------------------------------------------------------------
# decoding workers
# ---------------------------------------------------------------------------------------------
class ChunkDataset(IterableDataset):
    """Yields ``{"job": index, ...chunk}`` or ``{"job": index, "error": reason}`` per video."""

    def __init__(self, jobs: list, interval: float, rows_per_chunk: int, size: int):
        self.jobs, self.interval = jobs, interval
        self.rows_per_chunk, self.size = rows_per_chunk, size

    def __iter__(self):
        info = get_worker_info()
        first, step = (info.id, info.num_workers) if info else (0, 1)
        for index in range(first, len(self.jobs), step):
            job = self.jobs[index]
            try:
                for chunk in iter_chunks(job.path, self.interval, job.streams,
                                         self.rows_per_chunk, self.size):
                    yield dict(chunk, job=index)
            except Exception as exc:  # noqa: BLE001 - any decoding failure skips the video
                yield {"job": index, "error": f"{type(exc).__name__}: {exc}"}


# ---------------------------------------------------------------------------------------------
# networks and outputs
# ---------------------------------------------------------------------------------------------
def save_features(path: str, feats: np.ndarray) -> None:
    """Write ``{features: float16}`` atomically (temporary name in the same folder, rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **{FEATURE_KEY: feats.astype(FEATURE_DTYPE)})
    os.replace(tmp, path)


class Extractor:
    """Runs the stream networks on row batches and writes each video when it is complete."""

    def __init__(self, jobs: list, out_dir: str, streams: dict, cfg: ExtractConfig):
        self.jobs, self.out_dir, self.cfg = jobs, out_dir, cfg
        self.device = torch.device(cfg.device)
        self.streams = {name: m.to(self.device).eval() for name, m in streams.items()}
        self.batch, self.batch_rows = [], 0
        self.feats = defaultdict(lambda: defaultdict(list))   # job -> stream -> [tensors]
        self.finished, self.failed = {}, set()                 # job -> duration
        self.summary = Summary()

    def add(self, item: dict) -> list:
        """Take one worker item; return the job indices finished (written or failed) by it."""
        job = item["job"]
        if "error" in item:
            return [self.fail(job, item["error"])]
        self.summary.decode_s += item["decode_s"]
        self.batch.append(item)
        self.batch_rows += item["rows"]
        if item["last"]:
            self.finished[job] = item["duration"]
        return self.flush() if self.batch_rows >= self.cfg.batch_size else []

    def fail(self, job: int, reason: str) -> int:
        LOGGER.warning("cannot extract %s: %s (skipped)", self.jobs[job].path, reason)
        self.summary.failures.append((self.jobs[job].path, reason))
        self.failed.add(job)
        self.feats.pop(job, None)
        return job

    def _forward(self, name: str, items: list) -> None:
        x = torch.cat([it[name].to(self.device, non_blocking=True) for it in items])
        if len(x) == 0:
            return
        bf16 = self.cfg.precision == "bf16"
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=bf16):
            out = self.streams[name](x).float().cpu()
        for it, part in zip(items, out.split([it["rows"] for it in items])):
            self.feats[it["job"]][name].append(part)

    def flush(self) -> list:
        """Run the networks on the gathered rows; write the videos whose last chunk is in."""
        items = [it for it in self.batch if it["job"] not in self.failed]
        start = time.perf_counter()
        for name in self.streams:
            with_stream = [it for it in items if it.get(name) is not None]
            if with_stream:
                self._forward(name, with_stream)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.summary.network_s += time.perf_counter() - start
        done = [job for job in dict.fromkeys(it["job"] for it in items)
                if job in self.finished]
        self.batch, self.batch_rows = [], 0
        return [self.write(job) for job in done]

    def write(self, job: int) -> int:
        spec, duration = self.jobs[job], self.finished.pop(job)
        feats = self.feats.pop(job, {})
        n_rows = sum(len(t) for t in feats.get(spec.streams[0], []))
        if n_rows == 0:
            return self.fail(job, f"no feature row (duration {duration:.3f} s)")
        for name in spec.streams:
            rows = torch.cat(feats[name])
            if name in self.cfg.l2_normalize:
                rows = F.normalize(rows, dim=1)
            save_features(feature_path(self.out_dir, name, spec.folder, spec.vid), rows.numpy())
        self.summary.done += 1
        self.summary.rows += n_rows
        self.summary.video_s += duration
        return job


def extract(jobs: list, out_dir: str, streams: dict, cfg: ExtractConfig,
            skipped: int = 0) -> Summary:
    """Extract every job (``skipped``: videos resumed as done, for the summary only)."""
    start = time.perf_counter()
    extractor = Extractor(jobs, out_dir, streams, cfg)
    extractor.summary.skipped = skipped
    loader = DataLoader(ChunkDataset(jobs, cfg.interval, cfg.batch_size, cfg.frame_size),
                        batch_size=None, num_workers=min(cfg.num_workers, len(jobs)),
                        pin_memory=extractor.device.type == "cuda")
    with tqdm(total=len(jobs), unit="video", desc="extracting features") as bar:
        for item in loader:
            bar.update(len(extractor.add(item)))
            bar.set_postfix(rows=extractor.summary.rows, failed=len(extractor.failed))
        bar.update(len(extractor.flush()))
    extractor.summary.wall_s = time.perf_counter() - start
    _report(extractor.summary, out_dir)
    return extractor.summary


def _report(summary: Summary, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, FAILURES_FILE), "w", encoding="utf-8") as f:
        json.dump([{"path": p, "reason": r} for p, r in summary.failures], f, indent=1)
    LOGGER.info("extracted %d videos (%d rows, %.1f s of video) in %.1f s; %d skipped as done",
                summary.done, summary.rows, summary.video_s, summary.wall_s, summary.skipped)
    if summary.failures:
        LOGGER.warning("%d videos failed (listed in %s):\n%s", len(summary.failures),
                       os.path.join(out_dir, FAILURES_FILE),
                       "\n".join(f"  {p}: {r}" for p, r in summary.failures))


# ---------------------------------------------------------------------------------------------
# --check_against
# ---------------------------------------------------------------------------------------------
def _npz_files(root: str) -> dict:
    """``{relative path: path}`` of the ``.npz`` files under ``root``."""
    found = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".npz"):
                path = os.path.join(dirpath, name)
                found[os.path.relpath(path, root)] = path
    return found


def _load(path: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as npz:
        return npz[FEATURE_KEY].astype(np.float32)


def compare_stream(ours: dict, refs: dict) -> dict:
    """Row-wise cosine similarity of our files with the reference files of the same clip.

    A clip is matched by relative path, else by file stem (reference folders may be named
    differently). Rows are compared up to the shorter file; clips whose row counts differ
    are counted. Mean row norms show the normalisation convention of each side.
    """
    by_stem = {os.path.splitext(os.path.basename(r))[0]: p for r, p in refs.items()}
    cos, norms, ref_norms, missing, mismatch = [], [], [], 0, 0
    for rel, path in sorted(ours.items()):
        ref = refs.get(rel) or by_stem.get(os.path.splitext(os.path.basename(rel))[0])
        if ref is None:
            missing += 1
            continue
        a, b = _load(path), _load(ref)
        n = min(len(a), len(b))
        mismatch += len(a) != len(b)
        a, b = a[:n], b[:n]
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        cos.append((a * b).sum(1) / np.maximum(na * nb, 1e-12))
        norms.append(na)
        ref_norms.append(nb)
    cos = np.concatenate(cos) if cos else np.zeros(0)
    return {"clips": len(ours) - missing, "rows": int(cos.size),
            "cosine_mean": _stat(np.mean, [cos]), "cosine_min": _stat(np.min, [cos]),
            "missing_reference": missing, "row_count_mismatch": int(mismatch),
            "mean_norm": _stat(np.mean, norms), "reference_mean_norm": _stat(np.mean, ref_norms)}


def _stat(fn, arrays: list) -> float:
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return float(fn(values)) if values.size else float("nan")


def check_against(out_dir: str, ref_dir: str) -> dict:
    """``{stream: compare_stream(...)}`` for each stream present in both folders."""
    if not any(os.path.isdir(os.path.join(ref_dir, d)) for d in STREAM_DIRS.values()):
        raise FileNotFoundError(f"--check_against {ref_dir}: holds neither "
                                f"{' nor '.join(STREAM_DIRS.values())}/")
    report = {}
    for stream, sub in STREAM_DIRS.items():
        ours = _npz_files(os.path.join(out_dir, sub))
        if ours:
            report[stream] = compare_stream(ours, _npz_files(os.path.join(ref_dir, sub)))
            if report[stream]["missing_reference"]:
                LOGGER.warning("%s: %d clips have no reference file in %s", stream,
                               report[stream]["missing_reference"], ref_dir)
            if report[stream]["row_count_mismatch"]:
                LOGGER.warning("%s: %d clips have a different row count than the reference "
                               "(compared up to the shorter)", stream,
                               report[stream]["row_count_mismatch"])
    return report
