"""Write a complete toy corpus folder (see ``scripts/make_toy_corpus.py`` for the layout).

Every dataset draws from its own random stream of the seed, so the corpus is a pure function
of (seed, size); the only bytes that differ between two runs are the zip timestamps inside the
npz files.  Videos are split by name into train/val/test (TV: 70/15/15 %, others 60/20/20 %).
"""
from __future__ import annotations

import csv
import itertools
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from scripts.toy import annotations as ann
from scripts.toy import originals
from scripts.toy.features import make_prototypes, write_features
from scripts.toy.tokenizer import build_tokenizer
from scripts.toy.videos import didemo_video, msrvtt_video, tv_name, tv_video, violin_video
from scripts.toy.world import Video, stream_rng

SIZES = {"tiny": {"tv": 12, "violin": 8, "didemo": 8, "msrvtt": 8},
         "demo": {"tv": 200, "violin": 300, "didemo": 80, "msrvtt": 80}}
TV_SPLITS = ("train", "val", "test_public")
SPLITS = ("train", "val", "test")


def write_json(path: Path, obj, indent=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent), encoding="utf-8")


def write_jsonl(path: Path, lines: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")


def split_videos(rng, videos: list[Video], names, eval_frac: float) -> dict[str, list[Video]]:
    """Shuffle, then val and test take ``eval_frac`` each (at least one video)."""
    order = [videos[int(i)] for i in rng.permutation(len(videos))]
    n_eval = max(1, round(eval_frac * len(videos)))
    parts = (order[2 * n_eval:], order[:n_eval], order[n_eval:2 * n_eval])
    return {name: sorted(part, key=lambda v: v.name) for name, part in zip(names, parts)}


def write_tv(out: Path, rng, n: int) -> dict[str, list[Video]]:
    videos = [tv_video(rng, tv_name(i)) for i in range(n)]
    splits = split_videos(rng, videos, TV_SPLITS, 0.15)
    ids = {k: itertools.count(1) for k in ("tvr", "tvqa", "clip", "cap")}
    for split, vids in splits.items():
        write_jsonl(out / f"tvr_{split}_release.jsonl", ann.tvr_lines(rng, vids, split, ids["tvr"]))
        write_jsonl(out / f"tvqa_{split}.jsonl", ann.tvqa_lines(rng, vids, split, ids["tvqa"]))
        write_jsonl(out / f"tvc_{split}_release.jsonl",
                    ann.tvc_lines(vids, split, ids["clip"], ids["cap"]))
    write_jsonl(out / "tvqa_preprocessed_subtitles.jsonl", ann.subtitle_lines(videos))
    write_json(out / "tv_vid2nframe.json", {v.name: v.n_frames for v in videos})
    write_json(out / "tvr_video2dur_idx.json", ann.dur_idx(splits))
    write_json(out / "pretrain_splits" / "tv_train.json", [v.name for v in splits["train"]])
    write_json(out / "pretrain_splits" / "tv_val.json", [v.name for v in splits["val"]])
    return splits


def write_violin(out: Path, rng, n: int) -> dict[str, list[Video]]:
    videos = [violin_video(rng, f"toy_violin_s01e{i // 4 + 1:02d}_clip_{i % 4:02d}")
              for i in range(n)]
    splits = split_videos(rng, videos, SPLITS, 0.2)
    write_json(out / "violin" / "violin_annotation.json",
               originals.violin_annotation(rng, splits))
    return splits


def write_didemo(out: Path, rng, n: int) -> dict[str, list[Video]]:
    videos = [didemo_video(rng, f"toy_didemo_{i:04d}") for i in range(n)]
    splits = split_videos(rng, videos, SPLITS, 0.2)
    ids = itertools.count(1)
    for split, vids in splits.items():
        write_json(out / "didemo" / f"{split}_data.json", originals.didemo_data(rng, vids, ids))
    write_jsonl(out / "didemo" / "didemo_asr.jsonl", ann.subtitle_lines(videos))
    return splits


def write_msrvtt(out: Path, rng, n: int) -> dict[str, list[Video]]:
    videos = [msrvtt_video(rng, f"video{i}") for i in range(n)]
    splits = split_videos(rng, videos, SPLITS, 0.2)
    info = originals.msrvtt_info(rng, splits)
    write_json(out / "msrvtt" / "videodatainfo.json", info)
    with open(out / "msrvtt" / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "vid_key", "video_id", "sentence"])
        writer.writerows(originals.msrvtt_1ka_rows(info))
    write_jsonl(out / "msrvtt" / "msrvtt_asr.jsonl", ann.subtitle_lines(videos))
    return splits


WRITERS = {"tv": write_tv, "violin": write_violin, "didemo": write_didemo,
           "msrvtt": write_msrvtt}


def make_corpus(out_dir, seed: int, size: str = "tiny") -> Path:
    """Generate the whole raw corpus into ``out_dir`` (must be absent or empty).

    The corpus is built in a temporary sibling folder and renamed at the end, so an
    interrupted run leaves nothing half-written behind and can simply be re-run.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} is not empty; give a new folder")
    if size not in SIZES:
        raise ValueError(f"--size {size!r}: choose one of {sorted(SIZES)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write_corpus(tmp, seed, size)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_corpus(out: Path, seed: int, size: str) -> None:
    build_tokenizer(out / "tokenizer")
    protos = make_prototypes(stream_rng(seed, 0))
    world = {}
    for k, (dataset, writer) in enumerate(WRITERS.items()):
        splits = writer(out, stream_rng(seed, 1 + k), SIZES[size][dataset])
        feat_rng = stream_rng(seed, 100 + k)
        videos = sorted((v for vids in splits.values() for v in vids), key=lambda v: v.name)
        for v in tqdm(videos, desc=f"{dataset} features", leave=False):
            write_features(out / "features", dataset, v, protos, feat_rng)
        world[dataset] = {v.name: {"split": s, "fi": v.fi, "n_frames": v.n_frames,
                                   "scenes": [asdict(sc) for sc in v.scenes]}
                          for s, vids in splits.items() for v in vids}
    write_json(out / "world.json", {"seed": seed, "size": size, "videos": world}, indent=1)
