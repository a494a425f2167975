"""Split a ``video_feat_info.pkl`` by feature sub-folder (one dataset each).

``collect_video_feature_paths.py`` walks every sub-folder of ``slowfast_features/``; the toy
corpus keeps its four datasets side by side there (``features/slowfast_features/<dataset>/``),
so the build collects once and gives each dataset's converter only its own videos, keyed by the
``folder_name`` the collector records.  Paths still point at the original npz files.

Usage: ``python -m scripts.toy.featinfo --info ALL.pkl --folder tv --output tv/video_feat_info.pkl``
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle

LOGGER = logging.getLogger(__name__)


def split_feat_info(info: dict, folder: str) -> dict:
    return {vid: entry for vid, entry in info.items() if entry[3] == folder}


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--info", required=True, help="video_feat_info.pkl of all folders")
    parser.add_argument("--folder", required=True, help="feature sub-folder (dataset) to keep")
    parser.add_argument("--output", required=True, help="pickle to write")
    opts = parser.parse_args(argv)
    with open(opts.info, "rb") as f:
        info = pickle.load(f)
    kept = split_feat_info(info, opts.folder)
    if not kept:
        raise ValueError(f"{opts.info}: no video in feature folder {opts.folder!r}")
    LOGGER.info("%s: %d of %d videos", opts.folder, len(kept), len(info))
    os.makedirs(os.path.dirname(os.path.abspath(opts.output)), exist_ok=True)
    with open(opts.output, "wb") as f:
        pickle.dump(kept, f)


if __name__ == "__main__":
    main()
