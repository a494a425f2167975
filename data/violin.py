"""VIOLIN datasets and collates (data.md §3.4, §9.4).

A training item is a statement **and its pair**: the id whose last ``-``-separated field ``x``
is replaced by ``1-x`` (``"abc-1"`` <-> ``"abc-0"``). Both statements use the video of the
item's own id, and each gets its own copy of the video with ``[SEP] statement`` appended to
every subtitle segment, so a batch of B items holds 2·B videos. Evaluation uses one statement
per item. The label is ``[1]`` when the record's ``target`` is truthy, else ``[0]``.
A pair id that cannot be derived or is absent from the database is an error naming both.
"""
from __future__ import annotations

import torch

from .data import txt_input_collate, video_collate
from .query_items import QueryItemDataset, db_name, extend_video_text, video_of


def pair_id(qid: str, query_db=None) -> str:
    """Id of the paired statement: last ``-`` field ``x`` replaced by ``1 - x``."""
    head, sep, last = str(qid).rpartition("-")
    if not sep or last not in ("0", "1"):
        raise ValueError(f"VIOLIN statement id {qid!r} in {db_name(query_db)} does not end in "
                         "'-0' or '-1', so its pair id cannot be derived")
    return f"{head}-{1 - int(last)}"


class ViolinDataset(QueryItemDataset):
    """Training/validation statements, sharded by rank (``ids[rank::world_size]``).

    ``video_ids``, ``max_num_query`` and ``sampled_by_q`` are upstream's arguments, kept for API
    compatibility (eval_violin passes ``sampled_by_q``); items are always statement ids.
    """

    item_name = "statement"

    def _statement(self, qid, video_inputs):
        """(video copy with ``[SEP] s`` appended, ``[SEP] s``, its mask, ``[label]``)."""
        example = self._record(qid)
        q_ids = torch.tensor([self.query_db.sep] + list(example["input_ids"]), dtype=torch.long)
        target = torch.tensor([1 if example.get("target") else 0], dtype=torch.long)
        mask = torch.ones(len(q_ids), dtype=torch.long)
        return extend_video_text(video_inputs, q_ids), q_ids, mask, target

    def _record(self, qid):
        if qid not in self.query_db:
            raise KeyError(f"statement {qid} (the pair of a listed statement) is missing from "
                           f"{db_name(self.query_db)}")
        return self.query_db[qid]

    def _statement_ids(self, qid):
        return [qid, pair_id(qid, self.query_db)]

    def __getitem__(self, i):
        qid = self.qids[i]
        video_inputs = self.video_db[video_of(self.query_db, qid)]
        parts = [self._statement(sid, video_inputs) for sid in self._statement_ids(qid)]
        return tuple(list(x) for x in zip(*parts))


def violin_collate(inputs):
    """``video_collate`` over every statement of every item (2·B train, B eval) + statement keys."""
    videos, q_ids, q_masks, targets = [], [], [], []
    for item_videos, item_q, item_masks, item_tgt in inputs:
        videos.extend(item_videos)
        q_ids.extend(item_q)
        q_masks.extend(item_masks)
        targets.extend(item_tgt)
    batch = video_collate(videos)
    q_input_ids, q_pos_ids, q_attn_masks = txt_input_collate(q_ids, q_masks)
    batch.update({
        "targets": torch.stack(targets),
        "q_input_ids": q_input_ids,
        "q_pos_ids": q_pos_ids,
        "q_attn_masks": q_attn_masks,
    })
    return batch


class ViolinEvalDataset(ViolinDataset):
    """One statement per item, prefixed with its id (no pairing)."""

    def _statement_ids(self, qid):
        return [qid]

    def __getitem__(self, i):
        return self.qids[i], super().__getitem__(i)


def violin_eval_collate(inputs):
    qids, items = zip(*inputs)
    batch = violin_collate(items)
    batch["qids"] = list(qids)
    return batch
