"""Runtime reader of the video feature LMDBs (data.md §4, §6.3).

Layout: ``{img_dir}/id2nframe.json`` plus one LMDB folder ``{feat_version}_{interval}``
(``_compressed`` appended for the npz variant). Values are decoded by ``data.codec``; float16
records come back as float32.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from data.codec import decode_video
from data.db import VIDEO_MAX_READERS, LazyLmdb, read_json, require_dir

VFEAT_DIM = 4352


def _interval_spellings(frame_interval) -> list:
    """``2`` and ``2.0`` both name an integral interval: configs write 2, the converter 2.0."""
    names = [str(frame_interval)]
    value = float(frame_interval)
    if value.is_integer():
        for alt in (str(int(value)), str(value)):
            if alt not in names:
                names.append(alt)
    return names


def video_lmdb_dir(img_dir, feat_version="resnet_slowfast", frame_interval=1.5,
                   compress=False) -> str:
    """Resolve the LMDB folder, accepting ``resnet_slowfast_2`` and ``resnet_slowfast_2.0``."""
    suffix = "_compressed" if compress else ""
    tried = [os.path.join(img_dir, f"{feat_version}_{name}{suffix}")
             for name in _interval_spellings(frame_interval)]
    for path in tried:
        if os.path.isdir(path):
            return path
    raise FileNotFoundError(f"video LMDB folder not found; tried {tried} "
                            f"(check vfeat_interval / compressed_db / vfeat_version)")


class VideoFeatLmdb:
    """``reader[vid]`` -> float32 tensor ``(n, 4352)``, ``n = min(id2nframe[vid], max_clip_len)``.

    Quirk kept from upstream: with ``max_clip_len == -1`` the slice is ``[:-1]`` and drops the
    last frame. A record that is not 2-D raises on read; so does one whose width differs from
    ``expected_dim`` when that is given (default None: any width, as upstream reads).
    """

    def __init__(self, img_dir, feat_version="resnet_slowfast", frame_interval=1.5,
                 compress=True, max_clip_len=-1, expected_dim=None):
        self.img_dir = require_dir(img_dir, "video DB")
        self.feat_version = feat_version
        self.frame_interval = frame_interval
        self.compress = compress
        self.max_clip_len = max_clip_len
        self.expected_dim = expected_dim
        self.id2nframe_path = os.path.join(img_dir, "id2nframe.json")
        self.name2nframe = read_json(self.id2nframe_path, "id2nframe.json")
        self.db_dir = video_lmdb_dir(img_dir, feat_version, frame_interval, compress)
        self.db = LazyLmdb(self.db_dir, VIDEO_MAX_READERS)

    def _nframe(self, vid) -> int:
        try:
            nframe = self.name2nframe[vid]
        except KeyError:
            raise KeyError(f"video {vid!r} is not in {self.id2nframe_path}") from None
        return nframe if nframe < self.max_clip_len else self.max_clip_len

    def __getitem__(self, vid) -> torch.Tensor:
        n = self._nframe(vid)
        where = f"{self.db_dir}[{vid!r}]"
        feats = decode_video(self.db.get(vid), compress=self.compress, where=where)
        if feats.ndim != 2 or (self.expected_dim and feats.shape[1] != self.expected_dim):
            raise ValueError(f"video record {where} has shape {feats.shape}, "
                             f"expected (n_frames, {self.expected_dim or 'dim'})")
        return torch.from_numpy(np.array(feats[:n], dtype=np.float32))

    def __contains__(self, vid) -> bool:
        return vid in self.name2nframe


def require_videos(vids, video_db: VideoFeatLmdb, source: str, show: int = 5) -> None:
    """Fail early, listing the first ``show`` ids from ``source`` absent from id2nframe.json."""
    missing = [v for v in vids if v not in video_db.name2nframe]
    if missing:
        raise KeyError(f"{len(missing)} video id(s) from {source} are absent from "
                       f"{video_db.id2nframe_path}, e.g. {missing[:show]}")


def check_frame_counts(video_db: VideoFeatLmdb, vid_sub2frame: dict, source: str,
                       show: int = 5) -> None:
    """Pitfall 10: subtitle frames beyond the video's frame count would crash the model.

    Compares every kept subtitle frame (from ``SubTokLmdb.vid_sub2frame``, i.e. vid2len.json's
    grid) with ``min(id2nframe, max_clip_len)``; only videos where a frame would actually fall
    outside the clip are reported.
    """
    bad = []
    for vid, pairs in vid_sub2frame.items():
        if vid not in video_db.name2nframe:
            continue
        n = video_db._nframe(vid)
        n = n if n >= 0 else video_db.name2nframe[vid] + n
        last = max((f for _, frames in pairs for f in frames), default=-1)
        if last >= n:
            bad.append(f"{vid} (frame {last} >= {n})")
    if bad:
        raise ValueError(f"{len(bad)} video(s) of {source} have subtitle frames beyond the "
                         f"frame count of {video_db.id2nframe_path} (vid2len.json > "
                         f"id2nframe.json), e.g. {bad[:show]}")
