"""Masked frame modelling, shared by ``mfm-nce`` and ``mffr`` (data.md §10.2).

One item is a video (the full §7 tuple) plus a clip-level frame mask; each segment's mask is the
clip mask read at the segment's (unfiltered) frame indices. The collate zeroes masked frames at
both levels and returns their original clip features as ``feat_targets``.
"""
from __future__ import annotations

import random

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from data.data import video_collate
from utils.distributed import shard

MFM_PROB = 0.15


def clip_frame_mask(num_frames: int, mask_prob: float = MFM_PROB) -> list:
    """Each frame masked with ``mask_prob``; if none, one uniformly chosen frame is masked."""
    mask = [random.random() < mask_prob for _ in range(num_frames)]
    if num_frames and not any(mask):
        mask[random.choice(range(num_frames))] = True
    return mask


def segment_frame_masks(clip_mask, pairs, vid="") -> list:
    """Per segment: the clip mask at its frames, or ``[False]`` for its dummy frame."""
    masks = []
    for sub_idx, frames in pairs:
        if any(f >= len(clip_mask) for f in frames):
            raise IndexError(f"MFM: video {vid!r} subtitle {sub_idx} has frames {list(frames)} "
                             f"beyond its {len(clip_mask)} clip frames (data.md pitfall 10)")
        masks.append(torch.tensor([clip_mask[f] for f in frames] if frames else [False]))
    return masks


class MfmDataset(Dataset):
    """MFM items ``(video_tuple, segment_masks, clip_mask)`` over sharded ``video_ids``."""

    def __init__(self, video_ids, vid_sub_db, mask_prob=MFM_PROB):
        self.ids = shard(video_ids)
        self.vid_sub_db = vid_sub_db
        self.mask_prob = mask_prob

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        vid = self.ids[i]
        video = self.vid_sub_db[vid]
        clip_mask = clip_frame_mask(video[3].size(0), self.mask_prob)
        seg_masks = segment_frame_masks(clip_mask, video[6], vid)
        return video, seg_masks, torch.tensor(clip_mask, dtype=torch.bool)


def mfm_collate(inputs):
    """``video_collate`` plus ``f_v_masks``, ``c_v_masks`` and ``feat_targets`` (data.md §10.2).

    ``feat_targets`` are taken before zeroing, in (video, frame) row-major order, which is the
    order the model selects its predictions with ``c_v_masks``.
    """
    videos, seg_masks, clip_masks = map(list, zip(*inputs))
    batch = video_collate(videos)
    f_v_masks = pad_sequence([m for video in seg_masks for m in video], batch_first=True,
                             padding_value=False)
    c_v_masks = pad_sequence(clip_masks, batch_first=True, padding_value=False)
    _check_width(f_v_masks, batch["f_v_feats"], "f_v_masks", "f_v_feats")
    _check_width(c_v_masks, batch["c_v_feats"], "c_v_masks", "c_v_feats")
    batch["feat_targets"] = batch["c_v_feats"][c_v_masks].clone()
    batch["f_v_feats"] = batch["f_v_feats"].masked_fill(f_v_masks.unsqueeze(-1), 0)
    batch["c_v_feats"] = batch["c_v_feats"].masked_fill(c_v_masks.unsqueeze(-1), 0)
    batch["f_v_masks"] = f_v_masks
    batch["c_v_masks"] = c_v_masks
    return batch


def _check_width(masks, feats, mask_key: str, feat_key: str) -> None:
    if masks.shape != feats.shape[:2]:
        raise ValueError(f"mfm_collate: {mask_key} {tuple(masks.shape)} does not match "
                         f"{feat_key} {tuple(feats.shape[:2])}")
