"""TVC captioning datasets and collates (data.md §3.5, §6.1, §9.5).

Items are **videos** (``list(vid2caps)``, sharded by rank), so every clip of a video stays on one
rank (TVC scoring needs exactly one prediction per clip). Each caption/clip is located in the
video by an exclusive frame range ``[st, ed)`` with ``st = min(floor(s/fi), n)`` and
``ed = min(max(round(e/fi), st+1), n)`` (Python ``round``); ``cap_attn_mask`` is a mask over
those **clip frames**, not over caption tokens.

Quirks reproduced: clips starting after ``n·fi`` (150 s for ``max_clip_len`` 100) get the empty
range ``st = ed = n``; caption input ``[BOS]+tokens`` and target ``tokens+[EOS]`` are truncated
independently by the caption reader, so long targets lose their EOS; text pad is hard-coded 1,
target pad −1; an empty caption is a valid item (input ``[BOS]``, target ``[EOS]``), as
upstream. Errors: a video missing from the video/subtitle DBs stops with the id and the file
at fault.
"""
from __future__ import annotations

import json
import random

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from utils.distributed import shard

from .data import TXT_PAD, exclusive_span, video_collate
from .query_items import check_videos, db_name


def clip_range_mask(ts, frame_interval: float, num_frames: int):
    """``(st, ed)`` exclusive clip range and a ones mask over its ``ed - st`` frames."""
    st, ed = exclusive_span(ts[0], ts[1], frame_interval, num_frames)
    return (st, ed), torch.ones(ed - st, dtype=torch.long)


def pad_clip_masks(masks):
    """(C, max(ed - st)) mask, pad 0; width 0 when every range is empty."""
    return pad_sequence(list(masks), batch_first=True, padding_value=0)


class TvcTrainDataset(Dataset):
    """One item = one video with its captions (all, or ``max_cap_per_vid`` sampled at random)."""

    def __init__(self, video_db, caption_db, max_cap_per_vid=-1):
        self.video_db = video_db
        self.caption_db = caption_db
        self.max_cap_per_vid = max_cap_per_vid
        self.frame_interval = video_db.frame_interval
        self.vid2caps = caption_db.vid2caps
        self.vids = shard(list(self.vid2caps))
        check_videos(self.vids, video_db, f"{db_name(caption_db)}/cap.db/vid2caps.json")

    def __len__(self):
        return len(self.vids)

    def _caption_ids(self, vid):
        cap_ids = self.vid2caps[vid]
        if 0 < self.max_cap_per_vid < len(cap_ids):
            cap_ids = random.sample(cap_ids, self.max_cap_per_vid)
        return cap_ids

    def __getitem__(self, i):
        vid = self.vids[i]
        video_inputs = self.video_db[vid]
        num_frames = len(video_inputs[3])
        input_ids, tgt_ids, attn_masks, clip_ranges = [], [], [], []
        for cap_id in self._caption_ids(vid):
            example = self.caption_db[cap_id]
            clip_range, mask = clip_range_mask(example["ts"], self.frame_interval, num_frames)
            input_ids.append(example["input_ids"])
            tgt_ids.append(example["tgt_ids"])
            attn_masks.append(mask)
            clip_ranges.append(clip_range)
        return video_inputs, input_ids, tgt_ids, attn_masks, clip_ranges

    @staticmethod
    def collate(inputs):
        """Video keys for B videos + caption keys for their C captions, video by video."""
        video_inputs, input_ids, tgt_ids, attn_masks, clip_ranges = zip(*inputs)
        batch = video_collate(list(video_inputs))
        cap_input_ids = pad_sequence([c for v in input_ids for c in v], batch_first=True,
                                     padding_value=TXT_PAD)
        batch.update({
            "cap_input_ids": cap_input_ids,
            "cap_pos_ids": torch.arange(cap_input_ids.size(1), dtype=torch.long).unsqueeze(0),
            "cap_tgt_ids": pad_sequence([t for v in tgt_ids for t in v], batch_first=True,
                                        padding_value=-1),
            "cap_attn_mask": pad_clip_masks(m for v in attn_masks for m in v),
            "clip_ranges": tuple(tuple(r) for r in clip_ranges),
        })
        return batch


class TvcValDataset(TvcTrainDataset):
    """One item = one video with every clip of ``clip.db/vid2clips.json``, for decoding.

    The ground truth kept per clip is the text of its **first** caption.
    """

    def __init__(self, video_db, caption_db, max_cap_per_vid=-1):
        super().__init__(video_db, caption_db, max_cap_per_vid)
        self.vid2clips = caption_db.vid2clips
        missing = [vid for vid in self.vids if vid not in self.vid2clips]
        if missing:
            raise KeyError(f"{len(missing)} videos of {db_name(caption_db)}/cap.db/vid2caps.json "
                           f"have no entry in clip.db/vid2clips.json, e.g. {missing[:5]}")

    def _clips(self, vid):
        """``(clip_id, ts, first caption text)`` of every clip of ``vid``."""
        clips = []
        for clip_id in self.vid2clips[vid]:
            clip = self.caption_db.get_clip(clip_id)
            if not clip["captions"]:
                raise ValueError(f"clip {clip_id} in {db_name(self.caption_db)}/clip.db has no "
                                 "caption to use as ground truth")
            clips.append((clip_id, clip["ts"], clip["captions"][0]["text"]))
        return clips

    def __getitem__(self, i):
        vid = self.vids[i]
        return clip_item(self.video_db, vid, self._clips(vid), self.frame_interval)

    @staticmethod
    def collate(inputs):
        """Video keys + ``cap_attn_mask``, ``vid_names``, ``clip_ids``, ``all_ts`` and ``gts``.

        Every per-clip list is flat over the batch, video by video (one entry per clip).
        """
        return clip_collate(inputs)


def clip_item(video_db, vid, clips, frame_interval):
    """Video tuple and per-clip (mask, range, ts, gt, vid, int clip id) for decoding."""
    video_inputs = video_db[vid]
    num_frames = len(video_inputs[3])
    masks, ranges, all_ts, gts = [], [], [], []
    for _clip_id, ts, gt in clips:
        clip_range, mask = clip_range_mask(ts, frame_interval, num_frames)
        masks.append(mask)
        ranges.append(clip_range)
        all_ts.append(ts)
        gts.append(gt)
    clip_ids = [int(c[0]) for c in clips]
    return video_inputs, masks, ranges, all_ts, gts, [vid] * len(clips), clip_ids


def clip_collate(inputs, with_gts=True):
    """Shared val/eval collate; the clip lists are flattened video by video."""
    video_inputs, masks, ranges, all_ts, gts, vid_names, clip_ids = zip(*inputs)
    batch = video_collate(list(video_inputs))
    batch.update({
        "cap_attn_mask": pad_clip_masks(m for v in masks for m in v),
        "clip_ranges": tuple(tuple(r) for r in ranges),
        "all_ts": [ts for v in all_ts for ts in v],
        "vid_names": [name for v in vid_names for name in v],
        "clip_ids": [c for v in clip_ids for c in v],
    })
    if with_gts:
        batch["gts"] = [gt for v in gts for gt in v]
    return batch


class TvcEvalDataset(Dataset):
    """Clips to caption, read from a raw TVC jsonl (``vid_name``, ``clip_id``, ``ts`` per line).

    Items are the videos in order of first appearance, sharded by rank; no ground truth.
    """

    def __init__(self, video_db, data_jsonl):
        self.video_db = video_db
        self.data_jsonl = str(data_jsonl)
        self.frame_interval = video_db.frame_interval
        self.vid2clips = read_clip_jsonl(self.data_jsonl)
        self.vids = shard(list(self.vid2clips))
        check_videos(self.vids, video_db, self.data_jsonl)

    def __len__(self):
        return len(self.vids)

    def __getitem__(self, i):
        vid = self.vids[i]
        clips = [(clip_id, ts, None) for clip_id, ts in self.vid2clips[vid]]
        return clip_item(self.video_db, vid, clips, self.frame_interval)

    @staticmethod
    def collate(inputs):
        """As :meth:`TvcValDataset.collate` without ``gts``."""
        return clip_collate(inputs, with_gts=False)


def read_clip_jsonl(path: str) -> dict:
    """``{vid_name: [(clip_id, ts), ...]}`` in file order; bad lines name the file and line."""
    vid2clips = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                clip = json.loads(line)
                ts = clip["ts"]
                if len(ts) != 2 or not all(isinstance(t, (int, float)) for t in ts):
                    raise ValueError(f"ts must be [st, ed] in seconds, got {ts!r}")
                vid2clips.setdefault(clip["vid_name"], []).append((clip["clip_id"], ts))
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{lineno}: not a TVC clip line with vid_name, clip_id "
                                 f"and ts ({err!r})") from None
    return vid2clips
