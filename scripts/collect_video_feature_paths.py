"""Pair each video's SlowFast and ResNet ``.npz`` feature files (data.md §5.5).

Usage (from the repository root)::

    python scripts/collect_video_feature_paths.py --feature_dir FEATS \
        --output video_db --dataset tv

``FEATS`` holds ``slowfast_features/`` and ``resnet_features/`` with mirrored sub-folders.
Writes ``{output}/{dataset}/video_feat_info.pkl`` =
``{vid: (frame_len, slowfast_path, resnet_path, folder_name)}``, where ``frame_len`` is the
shorter of the two arrays, or 0 (and the failing path "") when a file is missing or unreadable;
plus ``failed_slowfast_files.pkl`` / ``failed_resnet_files.pkl`` (``folder/vid`` lists) when
non-empty. Stems repeated across folders overwrite each other as upstream (last one wins); the
number overwritten is logged. A pool is used only when ``--nproc > 1``.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import pickle
from functools import partial

import numpy as np
from tqdm import tqdm

LOGGER = logging.getLogger(__name__)
SLOWFAST_DIR = "slowfast_features"
RESNET_DIR = "resnet_features"


def find_slowfast_files(feature_dir: str) -> list:
    root = os.path.join(feature_dir, SLOWFAST_DIR)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--feature_dir must contain {SLOWFAST_DIR}/: {root}")
    found = []
    for dirpath, _, files in os.walk(root):
        found.extend(os.path.join(dirpath, f) for f in sorted(files) if f.endswith(".npz"))
    return sorted(found)


def _n_rows(path: str) -> int:
    with np.load(path, allow_pickle=False) as npz:
        return len(npz["features"])


def probe(slowfast_path: str, feature_dir: str):
    """Return ``(vid, frame_len, slowfast_path, resnet_path, folder_name)`` for one video."""
    vid = os.path.splitext(os.path.basename(slowfast_path))[0]
    folder = os.path.basename(os.path.dirname(slowfast_path))
    rel = os.path.relpath(slowfast_path, os.path.join(feature_dir, SLOWFAST_DIR))
    resnet_path = os.path.join(feature_dir, RESNET_DIR, rel)
    lens = []
    for kind, path in (("slowfast", slowfast_path), ("resnet", resnet_path)):
        try:
            lens.append(_n_rows(path))
        except Exception:  # noqa: BLE001 - any unreadable file marks the video as failed
            lens.append(0)
            if kind == "slowfast":
                slowfast_path = ""
            else:
                resnet_path = ""
    return vid, min(lens), slowfast_path, resnet_path, folder


def collect(files: list, feature_dir: str, nproc: int) -> list:
    job = partial(probe, feature_dir=feature_dir)
    if nproc > 1:
        with mp.Pool(nproc) as pool:
            return list(tqdm(pool.imap(job, files, chunksize=16), total=len(files),
                             desc="probing features"))
    return [job(f) for f in tqdm(files, desc="probing features")]


def collect_video_feature_paths(opts) -> dict:
    results = collect(find_slowfast_files(opts.feature_dir), opts.feature_dir, opts.nproc)
    info, failed_sf, failed_rn = {}, [], []
    for vid, frame_len, sf_path, rn_path, folder in results:
        info[vid] = (frame_len, sf_path, rn_path, folder)
        if not sf_path:
            failed_sf.append(f"{folder}/{vid}")
        if not rn_path:
            failed_rn.append(f"{folder}/{vid}")
    if len(info) < len(results):
        LOGGER.warning("%d feature files share a stem with another folder's; the last one "
                       "was kept", len(results) - len(info))
    out_dir = os.path.join(opts.output, opts.dataset)
    os.makedirs(out_dir, exist_ok=True)
    _dump(os.path.join(out_dir, "video_feat_info.pkl"), info)
    for name, failed in (("failed_slowfast_files.pkl", failed_sf),
                         ("failed_resnet_files.pkl", failed_rn)):
        if failed:
            LOGGER.warning("%d videos failed: see %s", len(failed), name)
            _dump(os.path.join(out_dir, name), failed)
    return info


def _dump(path: str, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--feature_dir", required=True,
                        help="folder with slowfast_features/ and resnet_features/")
    parser.add_argument("--output", required=True, help="video_db root")
    parser.add_argument("--dataset", required=True, help="dataset name (sub-folder of output)")
    parser.add_argument("--nproc", type=int, default=10, help="worker processes (1 = none)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO)
    collect_video_feature_paths(parse_args(argv))


if __name__ == "__main__":
    main()
