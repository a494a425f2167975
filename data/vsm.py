"""Video-subtitle matching: subtitle sentences as queries against their video (data.md §10.4).

Per video, up to ``query_per_video`` (5) subtitles that own frames are sampled with
``random.sample``; their tokens are removed from every segment (own and neighbours' context) and
they become ``[CLS]``-started queries whose local target is their frame span. Fewer than 5
queries are topped up with deep copies of the last one, so every video has exactly 5 contiguous
queries, which the model's video-level ranking loss requires.

Decision (pitfall 14): upstream crashes on a video with no subtitle that owns a frame. Such
videos are dropped at construction (the frame lists are already in memory), counted and logged
once, so a pseudo-subtitle or frame-less video cannot stop a pre-training run.
"""
from __future__ import annotations

import copy
import logging
import random

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from data.data import TXT_PAD, segment_frames, video_collate, vsm_span
from data.mlm import context_text
from utils.distributed import shard

LOGGER = logging.getLogger(__name__)
QUERY_PER_VIDEO = 5


def sample_queries(pairs, query_per_video: int = QUERY_PER_VIDEO) -> list:
    """``random.sample`` of the pairs owning frames, returned in subtitle order."""
    candidates = [(i, frames) for i, frames in pairs if len(frames) > 0]
    sampled = random.sample(candidates, min(query_per_video, len(candidates)))
    return sorted(sampled, key=lambda pair: pair[0])


def build_queries(sampled, sub_ids, cls_id: int, num_frames: int, vid, max_txt_len: int,
                  query_per_video: int = QUERY_PER_VIDEO) -> list:
    """``(ids, mask, vid, target)`` per sampled subtitle, padded with copies of the last."""
    queries = []
    for sub_idx, frames in sampled:
        ids = torch.tensor([cls_id] + list(sub_ids[sub_idx][:max_txt_len]), dtype=torch.long)
        target = torch.tensor(vsm_span(frames, num_frames), dtype=torch.long)
        queries.append((ids, torch.ones(len(ids), dtype=torch.long), vid, target))
    if not queries:
        raise ValueError(f"VSM: video {vid!r} has no subtitle with frames to use as a query")
    while len(queries) < query_per_video:
        queries.append(copy.deepcopy(queries[-1]))
    return queries


class VsmDataset(Dataset):
    """VSM items ``(video_tuple, vid, queries)`` over sharded ``video_ids``.

    ``sub_ctx_len`` defaults to the video dataset's value; subtitles are cut to its
    ``max_txt_len`` (60) before concatenation, unlike the plain §7 segments.
    """

    def __init__(self, video_ids, vid_sub_db, query_per_video=QUERY_PER_VIDEO, sub_ctx_len=None):
        self.vid_sub_db = vid_sub_db
        self.txt_db = vid_sub_db.txt_db
        self.img_db = vid_sub_db.img_db
        self.query_per_video = query_per_video
        self.sub_ctx_len = vid_sub_db.sub_ctx_len if sub_ctx_len is None else sub_ctx_len
        self.max_txt_len = vid_sub_db.max_txt_len
        self.ids = self._drop_queryless(shard(video_ids))

    def _drop_queryless(self, vids) -> list:
        sub2frame = self.vid_sub_db.vid_sub2frame
        dropped = [v for v in vids if not any(frames for _, frames in sub2frame[v])]
        if dropped:
            LOGGER.warning("VSM: dropped %d of %d videos with no subtitle owning a frame, e.g. %s",
                           len(dropped), len(vids), dropped[:3])
        dropped = set(dropped)
        return [v for v in vids if v not in dropped]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        vid = self.ids[i]
        clip_feats = self.img_db[vid]
        num_frames = clip_feats.size(0)
        pairs = self.vid_sub_db.vid_sub2frame[vid]
        sub_ids = self.txt_db[vid]["input_ids"]
        sampled = sample_queries(pairs, self.query_per_video)
        drop = {sub_idx for sub_idx, _ in sampled}
        texts = [[self.txt_db.sep] + context_text(sub_ids, sub_idx, self.sub_ctx_len,
                                                  self.max_txt_len, drop) for sub_idx, _ in pairs]
        seg_feats, seg_masks = segment_frames(clip_feats, [f for _, f in pairs],
                                              [len(t) for t in texts])
        seg_ids = [torch.tensor(t, dtype=torch.long) for t in texts]
        clip_mask = torch.ones(num_frames, dtype=torch.long)
        video = (seg_ids, seg_feats, seg_masks, clip_feats, clip_mask, len(pairs), pairs)
        queries = build_queries(sampled, sub_ids, self.txt_db.cls_, num_frames, vid,
                                self.max_txt_len, self.query_per_video)
        return video, vid, queries


def vsm_collate(inputs):
    """``video_collate`` over the B videos plus the 5B queries (data.md §10.4).

    ``q_vidx`` maps each query to its video's batch index through a name->index dict (as VCMR
    does), so a video present twice points to its last copy. Query positions are not clamped.
    """
    videos, vids, queries = map(list, zip(*inputs))
    batch = video_collate(videos)
    flat = [q for video_queries in queries for q in video_queries]
    ids, masks, q_vids, targets = map(list, zip(*flat))
    vid2idx = {vid: i for i, vid in enumerate(vids)}
    query_input_ids = pad_sequence(ids, batch_first=True, padding_value=TXT_PAD)
    batch.update({
        "q_vidx": torch.tensor([vid2idx[v] for v in q_vids], dtype=torch.long),
        "query_input_ids": query_input_ids,
        "query_pos_ids": torch.arange(query_input_ids.size(1), dtype=torch.long).unsqueeze(0),
        "query_attn_masks": pad_sequence(masks, batch_first=True, padding_value=0),
        "targets": torch.stack(targets),
        "vids": vids,
    })
    return batch
