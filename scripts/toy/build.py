"""Write a complete toy corpus folder (see ``scripts/make_toy_corpus.py`` for the layout).

Every dataset draws from its own random stream of the seed, so the corpus is a pure function
of (seed, size); the only bytes that differ between two runs are the zip timestamps inside the
npz files.  Videos are split into train/val/test (:class:`Size`: the val and test share, and
how many train videos carry labels; TV's other train videos are unlabelled, for pre-training).
"""
from __future__ import annotations

import csv
import itertools
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from scripts.toy import annotations as ann
from scripts.toy import originals
from scripts.toy.features import make_prototypes, write_features
from scripts.toy.tokenizer import build_tokenizer
from scripts.toy.videos import didemo_video, msrvtt_video, tv_name, tv_video, violin_video
from scripts.toy.world import Video, stream_rng


class Size(NamedTuple):
    """Videos of a dataset, the share of them in val and in test each, and how many train
    videos carry task labels (None: all). TV's other train videos stay unlabelled: subtitles and
    frames only, for pre-training; other datasets' are not generated."""

    videos: int
    eval_frac: float
    labelled: int | None = None

    @property
    def n_eval(self) -> int:
        """Videos in val, and again in test (at least one each)."""
        return max(1, round(self.eval_frac * self.videos))


SIZES = {"tiny": {"tv": Size(12, 0.15), "violin": Size(8, 0.2), "didemo": Size(8, 0.2),
                  "msrvtt": Size(8, 0.2)},
         "demo": {"tv": Size(1000, 0.1, 16), "violin": Size(400, 0.2, 16),
                  "didemo": Size(200, 0.2, 16), "msrvtt": Size(200, 0.2, 16)}}
TV_SPLITS = ("train", "val", "test_public")
SPLITS = ("train", "val", "test")


def write_json(path: Path, obj, indent=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent), encoding="utf-8")


def write_jsonl(path: Path, lines: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")


def split_videos(rng, videos: list[Video], names, size: Size) -> dict[str, list[Video]]:
    """Shuffle, then val and test take ``eval_frac`` each (at least one video), train the
    first ``labelled`` of the rest and ``unlabelled`` the others."""
    order = [videos[int(i)] for i in rng.permutation(len(videos))]
    n_eval = size.n_eval
    train = order[2 * n_eval:]
    n_lab = len(train) if size.labelled is None else size.labelled
    parts = (train[:n_lab], order[:n_eval], order[n_eval:2 * n_eval], train[n_lab:])
    splits = {name: sorted(part, key=lambda v: v.name)
              for name, part in zip((*names, "unlabelled"), parts)}
    if not splits["unlabelled"]:
        del splits["unlabelled"]
    return splits


def labelled_only(splits: dict[str, list[Video]]) -> dict[str, list[Video]]:
    """Only TV has a use for unlabelled videos (pre-training); elsewhere they are dropped."""
    splits.pop("unlabelled", None)
    return splits


def kept(splits: dict[str, list[Video]]) -> list[Video]:
    return sorted((v for vids in splits.values() for v in vids), key=lambda v: v.name)


def write_tv(out: Path, rng, size: Size) -> dict[str, list[Video]]:
    videos = [tv_video(rng, tv_name(i)) for i in range(size.videos)]
    splits = split_videos(rng, videos, TV_SPLITS, size)
    labelled = {s: splits[s] for s in TV_SPLITS}
    ids = {k: itertools.count(1) for k in ("tvr", "tvqa", "clip", "cap")}
    for split, vids in labelled.items():
        write_jsonl(out / f"tvr_{split}_release.jsonl", ann.tvr_lines(rng, vids, split, ids["tvr"]))
        write_jsonl(out / f"tvqa_{split}.jsonl", ann.tvqa_lines(rng, vids, split, ids["tvqa"]))
        write_jsonl(out / f"tvc_{split}_release.jsonl",
                    ann.tvc_lines(vids, split, ids["clip"], ids["cap"]))
    write_jsonl(out / "tvqa_preprocessed_subtitles.jsonl", ann.subtitle_lines(kept(splits)))
    write_json(out / "tv_vid2nframe.json", {v.name: v.n_frames for v in videos})
    write_json(out / "tvr_video2dur_idx.json", ann.dur_idx(labelled))
    pretrain = sorted(v.name for v in splits["train"] + splits.get("unlabelled", []))
    write_json(out / "pretrain_splits" / "tv_train.json", pretrain)
    write_json(out / "pretrain_splits" / "tv_val.json", [v.name for v in splits["val"]])
    return splits


def write_violin(out: Path, rng, size: Size) -> dict[str, list[Video]]:
    videos = [violin_video(rng, f"toy_violin_s01e{i // 4 + 1:02d}_clip_{i % 4:02d}")
              for i in range(size.videos)]
    splits = labelled_only(split_videos(rng, videos, SPLITS, size))
    write_json(out / "violin" / "violin_annotation.json",
               originals.violin_annotation(rng, splits))
    return splits


def write_didemo(out: Path, rng, size: Size) -> dict[str, list[Video]]:
    videos = [didemo_video(rng, f"toy_didemo_{i:04d}") for i in range(size.videos)]
    splits = labelled_only(split_videos(rng, videos, SPLITS, size))
    ids = itertools.count(1)
    for split, vids in splits.items():
        write_json(out / "didemo" / f"{split}_data.json", originals.didemo_data(rng, vids, ids))
    write_jsonl(out / "didemo" / "didemo_asr.jsonl", ann.subtitle_lines(kept(splits)))
    return splits


def write_msrvtt(out: Path, rng, size: Size) -> dict[str, list[Video]]:
    videos = [msrvtt_video(rng, f"video{i}") for i in range(size.videos)]
    splits = labelled_only(split_videos(rng, videos, SPLITS, size))
    info = originals.msrvtt_info(rng, splits)
    write_json(out / "msrvtt" / "videodatainfo.json", info)
    with open(out / "msrvtt" / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "vid_key", "video_id", "sentence"])
        writer.writerows(originals.msrvtt_1ka_rows(info))
    write_jsonl(out / "msrvtt" / "msrvtt_asr.jsonl", ann.subtitle_lines(kept(splits)))
    return splits


WRITERS = {"tv": write_tv, "violin": write_violin, "didemo": write_didemo,
           "msrvtt": write_msrvtt}


def make_corpus(out_dir, seed: int, size: str = "tiny", labelled: int | None = None) -> Path:
    """Generate the whole raw corpus into ``out_dir`` (must be absent or empty).

    ``labelled`` overrides how many training videos of each dataset carry task labels (a label
    curve). The videos, the splits and so TV's pre-training set stay those of ``size``: labels
    move from unlabelled videos to labelled ones, so a checkpoint pre-trained on the ``size``
    corpus of the same seed fits every label count.

    The corpus is built in a temporary sibling folder and renamed at the end, so an
    interrupted run leaves nothing half-written behind and can simply be re-run.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} is not empty; give a new folder")
    size_of = sizes(size, labelled)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write_corpus(tmp, seed, size_of, {"seed": seed, "size": size}
                     | ({} if labelled is None else {"labelled": labelled}))
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def sizes(size: str, labelled: int | None = None) -> dict[str, Size]:
    """``SIZES[size]``, with ``labelled`` training videos per dataset when given (a dataset
    with fewer training videos labels all of them, and says so)."""
    if size not in SIZES:
        raise ValueError(f"--size {size!r}: choose one of {sorted(SIZES)}")
    if labelled is None:
        return SIZES[size]
    if labelled < 1:
        raise ValueError(f"--labelled {labelled}: give at least 1 labelled video")
    out = {}
    for dataset, s in SIZES[size].items():
        n_train = s.videos - 2 * s.n_eval
        if labelled > n_train:
            print(f"--labelled {labelled}: the {size!r} {dataset} corpus has {n_train} "
                  f"training videos; all {n_train} are labelled")
        out[dataset] = s._replace(labelled=min(labelled, n_train))
    return out


def write_corpus(out: Path, seed: int, size_of: dict[str, Size], meta: dict) -> None:
    """Every dataset of ``size_of`` into ``out``; ``meta`` heads ``world.json``."""
    build_tokenizer(out / "tokenizer")
    protos = make_prototypes(stream_rng(seed, 0))
    world = {}
    for k, (dataset, writer) in enumerate(WRITERS.items()):
        splits = writer(out, stream_rng(seed, 1 + k), size_of[dataset])
        feat_rng = stream_rng(seed, 100 + k)
        videos = kept(splits)
        for v in tqdm(videos, desc=f"{dataset} features", leave=False):
            write_features(out / "features", dataset, v, protos, feat_rng)
        world[dataset] = {v.name: {"split": s, "fi": v.fi, "n_frames": v.n_frames,
                                   "scenes": [asdict(sc) for sc in v.scenes]}
                          for s, vids in splits.items() for v in vids}
    write_json(out / "world.json", {**meta, "videos": world}, indent=1)
