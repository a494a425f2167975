"""VCMR datasets and collates: TVR, DiDeMo (data.md §9.1; training.md §5.1).

Items follow upstream: ``(video_tuple, vid, ((ids, mask, vid, target), ...))`` where
``video_tuple`` is the 7-tuple of :mod:`data.data`, ids = ``[CLS] + tokens`` and target the
inclusive frame span ``[st, ed]``. The same classes serve video+subtitle
(:class:`~data.data.VideoFeatSubTokDataset`) and video-only
(:class:`~data.data.VideoFeatDataset`) corpora; the ``*VideoOnly*`` names only add a type check.
"""
from __future__ import annotations

import json
import logging
import os
import random

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from utils.distributed import shard

from .data import (
    TXT_PAD,
    VideoFeatDataset,
    VideoFeatSubTokDataset,
    inclusive_span,
    video_collate,
)
from .video_db import require_videos

LOGGER = logging.getLogger(__name__)
NO_TARGET = (-1, -1)


def get_video_ids(query_txt_db):
    """Videos of a query DB folder: distinct ``query2video.json`` values, else ``video_ids.json``.

    Upstream iterates a ``set`` (arbitrary order); first-appearance order is used here, which
    changes nothing since every index is taken from sorted names. Fix of pitfall 27: an empty
    ``query2video.json`` (TVR test_public) falls back to ``video_ids.json``, and with neither
    file an empty list is returned (logged) instead of raising KeyError.
    """
    q2v_path = os.path.join(query_txt_db, "query2video.json")
    if os.path.isfile(q2v_path):
        with open(q2v_path) as f:
            query2video = json.load(f)
        if query2video:
            return list(dict.fromkeys(query2video.values()))
    ids_path = os.path.join(query_txt_db, "video_ids.json")
    if os.path.isfile(ids_path):
        with open(ids_path) as f:
            return json.load(f)
    LOGGER.warning("%s has no query2video.json entries and no video_ids.json: no video ids",
                   query_txt_db)
    return []


def split_video2idx(vid2idx, split):
    """The split's ``{vid: global_idx}`` if ``vid2idx`` is keyed by split (TV), else all of it."""
    entry = vid2idx.get(split)
    return entry if isinstance(entry, dict) else vid2idx


def video_index(video_ids, video_db, use_sub_index=True):
    """``(vid2dur, vid2idx)`` of a corpus.

    With a subtitle DB carrying ``vid2dur_idx.json`` (TV) both come from it (``vid2idx`` keyed by
    split). Otherwise ``vid2dur = name2nframe`` and the global index is the position in the
    sorted ``id2nframe.json`` names, restricted to ``video_ids``.
    """
    if use_sub_index and isinstance(video_db, VideoFeatSubTokDataset) and video_db.vid2dur:
        return video_db.vid2dur, video_db.vid2idx
    name2nframe = video_db.img_db.name2nframe
    global_idx = {vid: i for i, vid in enumerate(sorted(name2nframe))}
    return name2nframe, {vid: global_idx[vid] for vid in video_ids if vid in global_idx}


def check_query_videos(qids, query_db, video_db, show=5):
    """Raise listing the query ids whose video is absent from the video or subtitle DB."""
    missing = {qid: query_db.query2video[qid] for qid in qids
               if qid in query_db.query2video and query_db.query2video[qid] not in video_db}
    if not missing:
        return
    examples = list(missing.items())[:show]
    source = f"{query_db.db_dir}/query2video.json ({len(missing)} queries, e.g. {examples})"
    require_videos(list(dict.fromkeys(missing.values())), video_db.img_db, source)
    raise KeyError(f"videos of {source} are absent from the subtitle DB "
                   f"{video_db.txt_db.db_dir}")


class VcmrDataset(Dataset):
    """Training/loss-validation VCMR set; one query per item by default (``sampled_by_q``).

    With ``sampled_by_q=False`` (unused by the configs) items are videos, each with its first
    ``max_num_query`` queries topped up by a ``random.sample`` (no replacement) of its own
    queries. Decision: where such a sample is impossible (fewer own queries than the gap;
    upstream raises there) the gap is filled by draws with replacement.
    """

    def __init__(self, video_ids, video_db, query_db, max_num_query=5, sampled_by_q=True):
        self.video_db = video_db
        self.query_db = query_db
        self.video_ids = list(video_ids)
        self.max_num_query = max_num_query
        self.sampled_by_q = sampled_by_q
        self.max_clip_len = video_db.max_clip_len
        self.frame_interval = video_db.frame_interval
        self.vid2dur, self.vid2idx = self._video_index()
        check_query_videos(list(query_db.id2len), query_db, video_db)
        if sampled_by_q:
            self.qids = shard(query_db.id2len.keys())
            self.vids = None
        else:
            self.vids = shard(self.video_ids)
            self.qids = None

    def _video_index(self):
        return video_index(self.video_ids, self.video_db)

    def __len__(self):
        return len(self.qids) if self.sampled_by_q else len(self.vids)

    def getids(self, i):
        """``(vid, qids)`` of item ``i``."""
        if self.sampled_by_q:
            qid = self.qids[i]
            return self.query_db.query2video[qid], [qid]
        vid = self.vids[i]
        own = self.query_db.video2query[vid]
        qids = list(own[:self.max_num_query])
        gap = self.max_num_query - len(qids)
        if 0 < gap <= len(own):
            qids += random.sample(own, gap)
        elif gap > 0:
            qids += random.choices(own, k=gap)
        return vid, qids

    def __getitem__(self, i):
        vid, qids = self.getids(i)
        video_inputs = self.video_db[vid]
        num_frames = video_inputs[3].size(0)
        return video_inputs, vid, tuple(self.get_query(qid, vid, num_frames) for qid in qids)

    def get_query(self, qid, vid, num_frames):
        """``(ids, mask, vid, target)`` of one query: ``[CLS] + tokens`` (never truncated)."""
        example = self.query_db[qid]
        ids = torch.tensor([self.query_db.cls_] + list(example["input_ids"]), dtype=torch.long)
        mask = torch.ones(len(ids), dtype=torch.long)
        target = torch.tensor(self.get_target(qid, example, num_frames), dtype=torch.long)
        return ids, mask, vid, target

    def get_target(self, qid, example, num_frames):
        """Inclusive frame span of the record's ``target`` (``[st, ed]`` seconds), or -1s
        when it is None or the video is unknown (``num_frames`` None)."""
        ts = example.get("target")
        if ts is None or num_frames is None:
            return NO_TARGET
        if len(ts) != 2 or not all(isinstance(x, (int, float)) for x in ts):
            raise ValueError(f"query {qid} of {self.query_db.db_dir}: target {ts!r} is not "
                             "[st, ed] in seconds")
        return inclusive_span(ts[0], ts[1], self.frame_interval, num_frames)


class VcmrEvalDataset(VcmrDataset):
    """Loss-validation variant: item = ``(qids, training item)``."""

    def __getitem__(self, i):
        _, qids = self.getids(i)
        return qids, super().__getitem__(i)


def vcmr_collate(inputs):
    """:func:`~data.data.video_collate` over the items' videos plus the query batch.

    A video drawn twice gives two copies; ``q_vidx`` is built from a dict and so points to the
    **last** copy (pitfall 13, reproduced).
    """
    video_inputs, vids, queries = map(list, zip(*inputs))
    batch = video_collate(video_inputs)
    batch.update(_query_batch([q for qs in queries for q in qs]))
    vid2bidx = {vid: i for i, vid in enumerate(vids)}
    batch["q_vidx"] = torch.tensor([vid2bidx[v] for v in batch.pop("query_vids")],
                                   dtype=torch.long)
    batch["vids"] = vids
    return batch


def _query_batch(queries):
    """Query keys shared by the VCMR/VR collates; positions are **not** clamped."""
    ids, masks, vids, targets = map(list, zip(*queries))
    input_ids = pad_sequence(ids, batch_first=True, padding_value=TXT_PAD)
    return {
        "query_input_ids": input_ids,
        "query_pos_ids": torch.arange(input_ids.size(1), dtype=torch.long).unsqueeze(0),
        "query_attn_masks": pad_sequence(masks, batch_first=True, padding_value=0),
        "targets": pad_sequence(targets, batch_first=True, padding_value=-1),
        "query_vids": vids,
    }


def vcmr_eval_collate(inputs):
    qids, items = map(list, zip(*inputs))
    batch = vcmr_collate(items)
    batch["qids"] = [qid for item_qids in qids for qid in item_qids]
    return batch


class VcmrFullEvalDataset(VcmrDataset):
    """Queries of a full-corpus evaluation: every query id, sharded only if ``distributed``.

    Item = ``(qid, [(ids, mask, vid, target)])``. Queries without a ``query2video`` entry (test
    splits) get ``vid = -1`` and target ``[-1, -1]``; an empty or missing mapping is handled
    (pitfall 27). Videos are encoded separately with :class:`VideoCorpusDataset`.
    """

    def __init__(self, video_ids, video_db, query_db, max_num_query=5, distributed=False):
        super().__init__(video_ids, video_db, query_db, max_num_query, sampled_by_q=True)
        qids = list(query_db.id2len)
        self.qids = shard(qids) if distributed else qids
        self.distributed = distributed
        n_no_video = sum(qid not in query_db.query2video for qid in qids)
        if n_no_video:
            LOGGER.info("%d of %d queries in %s have no video in query2video.json: "
                        "vid -1, target [-1, -1]", n_no_video, len(qids), query_db.db_dir)

    def __getitem__(self, i):
        qid = self.qids[i]
        vid = self.query_db.query2video.get(qid, -1)
        num_frames = None if vid == -1 else self.video_db.num_frames(vid)
        return qid, [self.get_query(qid, vid, num_frames)]


def vcmr_full_eval_collate(inputs):
    """Query-only batch: ids, positions, masks, targets, ``vids`` (one per query), ``qids``."""
    qids, queries = map(list, zip(*inputs))
    batch = _query_batch([q for qs in queries for q in qs])
    batch["vids"] = batch.pop("query_vids")
    batch["qids"] = qids
    return batch


class VideoCorpusDataset(Dataset):
    """The corpus of a full evaluation in sorted-name order, never sharded (every rank encodes
    all videos, training.md P17). Item = ``(vid, video_tuple)``.
    """

    def __init__(self, video_ids, video_db):
        self.video_db = video_db
        self.vids = sorted(video_ids)

    def __len__(self):
        return len(self.vids)

    def __getitem__(self, i):
        vid = self.vids[i]
        return vid, self.video_db[vid]


def video_corpus_collate(inputs):
    """:func:`~data.data.video_collate` of the corpus batch plus ``vids`` in batch order."""
    vids, video_inputs = map(list, zip(*inputs))
    batch = video_collate(video_inputs)
    batch["vids"] = vids
    return batch


def require_video_only(video_db, name):
    if not isinstance(video_db, VideoFeatDataset):
        raise TypeError(f"{name} needs a VideoFeatDataset (load_video_only_dataset), "
                        f"got {type(video_db).__name__}")


class VcmrVideoOnlyDataset(VcmrDataset):
    """DiDeMo video-only training set (same behaviour over a :class:`VideoFeatDataset`)."""

    def __init__(self, video_ids, video_db, *args, **kwargs):
        require_video_only(video_db, type(self).__name__)
        super().__init__(video_ids, video_db, *args, **kwargs)


class VcmrVideoOnlyEvalDataset(VcmrEvalDataset):
    """DiDeMo video-only loss-validation set."""

    def __init__(self, video_ids, video_db, *args, **kwargs):
        require_video_only(video_db, type(self).__name__)
        super().__init__(video_ids, video_db, *args, **kwargs)


class VcmrVideoOnlyFullEvalDataset(VcmrFullEvalDataset):
    """DiDeMo video-only full-evaluation queries."""

    def __init__(self, video_ids, video_db, *args, **kwargs):
        require_video_only(video_db, type(self).__name__)
        super().__init__(video_ids, video_db, *args, **kwargs)
