"""Build a subtitle text DB with the subtitle <-> frame matching of data.md §3.6 and §5.3.

Usage (from the repository root)::

    python scripts/prepro_sub.py --annotation tv_subtitles.jsonl \
        --vid2nframe tv_vid2nframe.json --frame_length 1.5 \
        --output txt_db/tv_subtitles.db --toker roberta-base --task tv

Matching (reproduced exactly, quirks included): subtitle times are float32 and frame-unit
bounds ``a = s / fl``, ``b = e / fl`` are computed in float32; candidate frames are
``floor(a) .. ceil(b) - 1``; a subtitle starting at or after ``fl * N`` gets no frames; a last
subtitle lasting > 16 s keeps its first 11 candidates; each frame goes to the candidate with the
largest IoU of ``[t, t+1]`` vs ``[a, b]`` (strict ``>``, so ties keep the lower index, and an
all-zero IoU assigns the frame to subtitle 0). Videos without subtitles get pseudo-subtitles
(empty token lists) covering blocks of 5 frames.

Fixed upstream bugs: ``np.int`` (gone from numpy >= 1.24) is plain ``int``; the stats test
``previous_sub_idx > 0`` is ``>= 0``; the repository root replaces ``/src`` on ``sys.path``;
``--toker`` is a model name or a folder (utils/tokenizer.py). ``sub_info.json`` holds
per-video statistics only (it is never read back; its exact upstream layout is not specified).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.db import (  # noqa: E402
    TxtLmdbWriter,
    make_output_dir,
    read_json,
    read_jsonl,
    write_json,
    write_meta,
)
from utils.errors import run_main  # noqa: E402
from utils.tokenizer import (  # noqa: E402
    TOKER_HELP,
    build_meta,
    load_toker,
    roberta_tokenize,
)

EXTRA_LONG_SEC = 16
EXTRA_LONG_KEEP = 11
PSEUDO_BLOCK = 5


def candidate_frames(starts, ends, fl: float, n_frames: int) -> dict:
    """Step B: ``{sub_idx: [frames]}``; subtitles starting after the video get no entry."""
    a = starts / np.float32(fl)
    b = ends / np.float32(fl)
    video_end = fl * n_frames
    sub2frames = {}
    for i in range(len(starts)):
        if starts[i] >= video_end:
            continue
        frames = list(range(math.floor(a[i]), math.ceil(b[i])))
        duration = min(float(ends[i]), video_end) - float(starts[i])
        if i == len(starts) - 1 and duration > EXTRA_LONG_SEC:
            frames = frames[:EXTRA_LONG_KEEP]
        sub2frames[i] = frames
    return sub2frames


def temporal_iou(t: int, a: float, b: float) -> float:
    overlap = min(t + 1, b) - max(t, a)
    if overlap <= 0:
        return 0.0
    return overlap / (max(t + 1, b) - min(t, a))


def assign_frames(sub2frames: dict, a, b, n_subs: int, n_frames: int):
    """Step C/D: ``unique_sub2frames`` (every subtitle, maybe empty) and unmatched frames."""
    frame2subs = {}
    for i, frames in sub2frames.items():
        for t in frames:
            frame2subs.setdefault(t, []).append(i)
    unique = {i: [] for i in range(n_subs)}
    unmatched = []
    for t in range(n_frames):
        if t not in frame2subs:
            unmatched.append(t)
            continue
        best_iou, best = 0.0, 0
        for i in frame2subs[t]:
            iou = temporal_iou(t, float(a[i]), float(b[i]))
            if iou > best_iou:
                best_iou, best = iou, i
        unique[best].append(t)
    return [[i, unique[i]] for i in range(n_subs)], unmatched


def match_subtitles(subs: list, fl: float, n_frames: int) -> dict:
    """Steps B-D for a video with >= 1 subtitle and ``n_frames > 0``."""
    starts = np.array([s["start"] for s in subs], dtype=np.float32)
    ends = np.array([s["end"] for s in subs], dtype=np.float32)
    sub2frames = candidate_frames(starts, ends, fl, n_frames)
    a = starts / np.float32(fl)
    b = ends / np.float32(fl)
    unique, unmatched = assign_frames(sub2frames, a, b, len(subs), n_frames)
    return {"unique_sub2frames": unique,
            "sub2frames": [[i, sub2frames.get(i, [])] for i in range(len(subs))],
            "unmatched_frames": unmatched}


def pseudo_subtitles(n_frames: int) -> dict:
    """Subtitle-less video: one empty pseudo-subtitle per block of 5 frames."""
    blocks = [[j, list(range(start, min(start + PSEUDO_BLOCK, n_frames)))]
              for j, start in enumerate(range(0, n_frames, PSEUDO_BLOCK))]
    return {"unique_sub2frames": blocks, "sub2frames": [[j, list(f)] for j, f in blocks],
            "unmatched_frames": [], "input_ids": [[] for _ in blocks]}


def n_frames_of(vid: str, subs: list, vid2nframe: dict, path: str, fl: float) -> int:
    """Step A: frame count from vid2nframe, or from the last subtitle end when it is 0."""
    if vid not in vid2nframe:
        raise KeyError(f"video {vid!r} is missing from --vid2nframe {path}")
    n = vid2nframe[vid]
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"{path}[{vid!r}] = {n!r} is not an int frame count")
    if n == 0 and subs:
        n = int(int(subs[-1]["end"]) / fl)
    return n


def sub_stats(subs: list, match: dict, n_frames: int) -> dict:
    """Per-video statistics for ``sub_info.json`` (informative only)."""
    gaps = [subs[i]["start"] - subs[i - 1]["end"] for i in range(1, len(subs))]
    runs, prev = [], None
    for t in match["unmatched_frames"]:
        if prev is not None and t == prev + 1:
            runs[-1] += 1
        else:
            runs.append(1)
        prev = t
    return {
        "n_subs": len(subs),
        "max_sub_length": max((len(s["text"].split()) for s in subs), default=0),
        "max_sub_duration": max((s["end"] - s["start"] for s in subs), default=0),
        "max_gap_time": max([g for g in gaps if g > 0], default=0),
        "max_overlap_time": max([-g for g in gaps if g < 0], default=0),
        "n_overlapping_subs": sum(g < 0 for g in gaps),
        "max_matched_frame_len": max((len(f) for _, f in match["unique_sub2frames"]),
                                     default=0),
        "max_unmatched_group_len": max(runs, default=0) if subs else n_frames,
        "extra_long_subs": int(bool(subs) and subs[-1]["end"] - subs[-1]["start"]
                               > EXTRA_LONG_SEC),
    }


def check_sorted(vid: str, subs: list, path: str) -> None:
    starts = [s["start"] for s in subs]
    if starts != sorted(starts):
        raise ValueError(f"{path}: subtitles of {vid!r} are not sorted by start time")


def make_record(line: dict, vid2nframe: dict, opts, toker):
    """Step E: the LMDB record of one video line, plus its statistics."""
    vid, subs = line["vid_name"], line.get("sub") or []
    check_sorted(vid, subs, opts.annotation)
    n = n_frames_of(vid, subs, vid2nframe, opts.vid2nframe, opts.frame_length)
    if subs and n > 0:
        match = match_subtitles(subs, opts.frame_length, n)
        match["input_ids"] = [roberta_tokenize(toker, s["text"], unescape=True) for s in subs]
    else:
        match = pseudo_subtitles(n)
    rec = dict(line)
    rec.update(match)
    frame_lens = {i: len(f) for i, f in match["sub2frames"]}
    rec["v_id"] = vid
    rec["duration"] = n
    rec["max_mtached_sub_len"] = max(
        (len(ids) + frame_lens.get(i, 0) for i, ids in enumerate(match["input_ids"])), default=0)
    return rec, sub_stats(subs, match, n)


def prepro_sub(opts) -> None:
    lines = read_jsonl(opts.annotation)
    vid2nframe = read_json(opts.vid2nframe, "--vid2nframe")
    toker = load_toker(opts.toker)
    meta = build_meta(opts, toker)
    make_output_dir(opts.output)
    write_meta(opts.output, meta)
    vid2len, vid2max_len, sub_info = {}, {}, {}
    with TxtLmdbWriter(opts.output) as db:
        for line in tqdm(lines, desc="prepro subtitles"):
            rec, stats = make_record(line, vid2nframe, opts, toker)
            db[rec["v_id"]] = rec
            vid2len[rec["v_id"]] = rec["duration"]
            vid2max_len[rec["v_id"]] = rec["max_mtached_sub_len"]
            sub_info[rec["v_id"]] = stats
    write_json(os.path.join(opts.output, "vid2len.json"), vid2len)
    write_json(os.path.join(opts.output, "vid2max_frame_sub_len.json"), vid2max_len)
    write_json(os.path.join(opts.output, "sub_info.json"), sub_info)
    print_summary(sub_info)


def print_summary(sub_info: dict) -> None:
    keys = ("max_sub_length", "max_sub_duration", "max_gap_time", "max_overlap_time",
            "max_matched_frame_len", "max_unmatched_group_len")
    for key in keys:
        print(f"{key}: {max((s[key] for s in sub_info.values()), default=0)}")
    print(f"extra_long_subs: {sum(s['extra_long_subs'] for s in sub_info.values())}")
    print(f"overlapping subs: {sum(s['n_overlapping_subs'] for s in sub_info.values())}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotation", required=True, help="subtitle jsonl")
    parser.add_argument("--vid2nframe", required=True, help="JSON {vid: n_frames}")
    parser.add_argument("--frame_length", type=float, default=1.5, help="seconds per frame")
    parser.add_argument("--output", required=True, help="output DB folder (must not exist)")
    parser.add_argument("--toker", default="roberta-base", help=TOKER_HELP)
    parser.add_argument("--task", default="tv", help="dataset name (stored in meta.json)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    prepro_sub(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
