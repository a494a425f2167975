"""Convert per-video ResNet + SlowFast ``.npz`` features into a video LMDB (data.md §4, §5.6).

Usage (from the repository root)::

    python scripts/convert_videodb.py --vfeat_info_file video_db/tv/video_feat_info.pkl \
        --output video_db --dataset tv --frame_length 1.5 [--compress] [--clip_interval 60]

Each video becomes a float32 ``(frame_len, 4352)`` array, ResNet (2048) columns first, stored
as msgpack-numpy (or npz with ``--compress``) in
``{output}/{dataset}/{feat_version}_{frame_length}[_compressed]`` (an existing LMDB folder is
refused). Videos with ``frame_len == 0`` or unreadable files are skipped and listed in
``corrupted.json``; a width other than 4352 is stored as is (upstream does not check it) and
counted in one warning. ``id2nframe.json``: when it already exists, each
of its keys takes ``min(old, new)`` (a key the new run did not produce raises, as upstream;
new keys absent from it are not added and are counted in the log); otherwise the new counts.
A multiprocessing pool is used only when ``--nproc > 1``.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import pickle
import sys

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.db import VideoLmdbWriter, read_json, write_json  # noqa: E402

LOGGER = logging.getLogger(__name__)
VFEAT_DIM = 4352


def _load_features(path: str, n: int) -> np.ndarray:
    with np.load(path, allow_pickle=False) as npz:
        return npz["features"][:n].astype(np.float32)


def load_video(item):
    """``(vid, info) -> (vid, features or None, reason)``; runs in pool workers."""
    vid, (frame_len, slowfast_path, resnet_path, _folder) = item
    if frame_len == 0:
        return vid, None, "frame_len is 0"
    try:
        feats = np.concatenate([_load_features(resnet_path, frame_len),
                                _load_features(slowfast_path, frame_len)], axis=1)
    except Exception as exc:  # noqa: BLE001 - any unreadable file marks the video corrupted
        return vid, None, f"cannot load: {exc}"
    return vid, feats, ""


def split_clips(vid: str, feats: np.ndarray, clip_interval: float, frame_length: float):
    """Keys ``vid`` or ``vid.k`` for consecutive chunks of ``int(interval / fl)`` frames."""
    if clip_interval <= 0:
        return [(vid, feats)]
    size = int(clip_interval / frame_length)
    return [(f"{vid}.{k}", feats[start:start + size])
            for k, start in enumerate(range(0, len(feats), size))]


def _loaded(items: list, nproc: int):
    if nproc > 1:
        with mp.Pool(nproc) as pool:
            yield from pool.imap_unordered(load_video, items, chunksize=4)
    else:
        yield from map(load_video, items)


def merge_id2nframe(path: str, new: dict) -> dict:
    """Min-merge with an existing ``id2nframe.json`` (upstream rule, see module docstring)."""
    if not os.path.isfile(path):
        return new
    merged = {}
    for name, old in read_json(path).items():
        if name not in new:
            raise KeyError(f"{path} lists {name!r}, which this conversion did not produce")
        if old != new[name]:
            print(f"{name}: id2nframe {old} != converted {new[name]}, keeping the minimum")
        merged[name] = min(old, new[name])
        if merged[name] <= 0:
            raise ValueError(f"{path}: {name!r} would have {merged[name]} frames")
    extra = len(set(new) - set(merged))
    if extra:
        LOGGER.warning("%d converted names are not in the existing %s and were not added",
                       extra, path)
    return merged


def lmdb_dir(opts) -> str:
    suffix = "_compressed" if opts.compress else ""
    return os.path.join(opts.output, opts.dataset,
                        f"{opts.feat_version}_{opts.frame_length}{suffix}")


def convert_videodb(opts) -> dict:
    with open(opts.vfeat_info_file, "rb") as f:
        info = pickle.load(f)
    out_db = lmdb_dir(opts)
    if os.path.exists(out_db):
        raise FileExistsError(f"output LMDB already exists, refusing to overwrite: {out_db}")
    os.makedirs(out_db)
    id2nframe, corrupted, odd_width = {}, [], 0
    with VideoLmdbWriter(out_db, compress=opts.compress) as db:
        for vid, feats, reason in tqdm(_loaded(sorted(info.items()), opts.nproc),
                                       total=len(info), desc="converting videos"):
            if feats is None:
                LOGGER.debug("%s skipped: %s", vid, reason)
                corrupted.append(vid)
                continue
            odd_width += feats.shape[1] != VFEAT_DIM
            for name, chunk in split_clips(vid, feats, opts.clip_interval, opts.frame_length):
                db[name] = chunk
                id2nframe[name] = len(chunk)
    if corrupted:
        LOGGER.warning("%d videos skipped as corrupted (see corrupted.json)", len(corrupted))
    if odd_width:
        LOGGER.warning("%d videos stored with a feature width other than %d", odd_width,
                       VFEAT_DIM)
    out_dir = os.path.join(opts.output, opts.dataset)
    id2nframe_path = os.path.join(out_dir, "id2nframe.json")
    id2nframe = merge_id2nframe(id2nframe_path, id2nframe)
    write_json(id2nframe_path, id2nframe)
    write_json(os.path.join(out_dir, "corrupted.json"), sorted(corrupted))
    return id2nframe


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vfeat_info_file", required=True, help="video_feat_info.pkl")
    parser.add_argument("--output", required=True, help="video_db root")
    parser.add_argument("--dataset", required=True, help="dataset name (sub-folder of output)")
    parser.add_argument("--frame_length", type=float, default=2, help="seconds per feature")
    parser.add_argument("--feat_version", default="resnet_slowfast")
    parser.add_argument("--nproc", type=int, default=4, help="worker processes (1 = none)")
    parser.add_argument("--compress", action="store_true", help="store npz (deflate) values")
    parser.add_argument("--clip_interval", type=float, default=-1,
                        help="split videos into chunks of this many seconds (-1 = off)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO)
    convert_videodb(parse_args(argv))


if __name__ == "__main__":
    main()
