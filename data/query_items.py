"""Shared machinery of the datasets whose items are text queries over one video each
(TVQA questions, VIOLIN statements): the query->video lookup, the early check that every video
exists, and the copy of a video tuple with task text appended to every subtitle segment.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from utils.distributed import shard


def db_name(db) -> str:
    """Folder of a reader, for error messages."""
    return str(getattr(db, "db_dir", db))


def extend_video_text(video_inputs, ext_ids: torch.Tensor):
    """Copy of a §7 video tuple with ``ext_ids`` appended to every segment text and mask.

    Frames, features and clip-level parts are shared with the original (they are not modified).
    """
    texts, feats, masks, clip_feats, clip_mask, num_subs, pairs = video_inputs
    ext_mask = torch.ones(len(ext_ids), dtype=torch.long)
    new_texts = [torch.cat([t, ext_ids]) for t in texts]
    new_masks = [torch.cat([m, ext_mask.to(m.dtype)]) for m in masks]
    return new_texts, feats, new_masks, clip_feats, clip_mask, num_subs, pairs


def video_of(query_db, qid: str) -> str:
    """Video of a question/statement, with an error naming the mapping file when absent."""
    try:
        return query_db.query2video[qid]
    except KeyError:
        raise KeyError(f"id {qid} has no video in "
                       f"{db_name(query_db)}/query2video.json") from None


def check_videos(vids, video_db, source: str, show: int = 5) -> None:
    """Fail early, naming ``source``, if a video has no features or subtitles."""
    missing = [vid for vid in vids if vid not in video_db]
    if missing:
        raise KeyError(f"{len(missing)} videos listed in {source} are missing from the video "
                       f"or subtitle DB, e.g. {missing[:show]}")


class QueryItemDataset(Dataset):
    """Items = the query ids of ``query_db`` (id2len order, after its length filter), sharded
    by rank (``ids[rank::world_size]``).

    ``video_ids``, ``max_num_query`` and ``sampled_by_q`` are upstream's constructor
    arguments, kept so upstream code runs unchanged; only the one-query-per-item mode
    (``sampled_by_q=True``, every released config) exists for these tasks.
    """

    item_name = "query"

    def __init__(self, video_ids, video_db, query_db, max_num_query=5, sampled_by_q=True):
        if not sampled_by_q:
            raise ValueError(f"{type(self).__name__}: only sampled_by_q=True (one "
                             f"{self.item_name} per item) is supported, as in every released "
                             "config")
        self.video_db = video_db
        self.query_db = query_db
        self.vids = video_ids
        self.max_num_query = max_num_query
        self.sampled_by_q = sampled_by_q
        self.vid2dur = getattr(video_db, "vid2dur", {})
        self.vid2idx = getattr(video_db, "vid2idx", {})
        self.max_clip_len = video_db.max_clip_len
        self.frame_interval = video_db.frame_interval
        self.qids = shard(query_db.ids)
        check_videos(dict.fromkeys(video_of(query_db, qid) for qid in self.qids), video_db,
                     f"{db_name(query_db)}/query2video.json")

    def __len__(self):
        return len(self.qids)

    def getids(self, i):
        return self.qids[i]
