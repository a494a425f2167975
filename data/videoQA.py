"""TVQA (and How2QA) datasets and collates (data.md §9.3).

One item is one question. Each of its 5 answers becomes its own copy of the video, whose every
subtitle segment gets ``[SEP] q [SEP] a_k`` appended; the collate therefore sees 5·B videos,
grouped per question in answer order, which the model reshapes to (B, 5, ...).

Decisions on quirks (reproduced from upstream):
* ``ts`` is parsed by splitting the string on ``-``; any failure (None, ``"NaN-NaN"``, a bad
  format) gives the span target ``[-1, -1]`` (ignored by the loss).
* a missing ``answer_idx`` (test split) gives target ``[-1]``; an index outside the answers is an
  error naming the question id and the database.
"""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from .data import ts_string_span, txt_input_collate, video_collate
from .query_items import QueryItemDataset, db_name, extend_video_text, video_of

NUM_ANSWERS = 5


def qa_target(example, qid: str, query_db) -> torch.Tensor:
    """``[answer_idx]`` or ``[-1]`` when the split has no labels."""
    target = example.get("target")
    if target is None:
        return torch.tensor([-1], dtype=torch.long)
    num_answers = len(example["input_ids"]) - 1
    if not isinstance(target, int) or not 0 <= target < num_answers:
        raise ValueError(f"question {qid} in {db_name(query_db)}: answer index {target!r} is "
                         f"outside the {num_answers} answers")
    return torch.tensor([target], dtype=torch.long)


def build_qa_inputs(example, qid: str, query_db):
    """The 5 texts ``[SEP] q [SEP] a_k`` of one question, in answer order."""
    ids = example["input_ids"]
    if len(ids) != NUM_ANSWERS + 1:
        raise ValueError(f"question {qid} in {db_name(query_db)}: expected input_ids "
                         f"[q, a0..a4] (6 lists), got {len(ids)}")
    sep = [query_db.sep]
    q = ids[0]
    return [torch.tensor(sep + q + sep + a, dtype=torch.long) for a in ids[1:]]


class VideoQaDataset(QueryItemDataset):
    """Training/validation TVQA questions, sharded by rank (``ids[rank::world_size]``).

    Items are the question ids of ``query_db`` in id2len order, after its q+longest-answer
    length filter. ``video_ids``, ``max_num_query`` and ``sampled_by_q`` are upstream's
    arguments, kept for API compatibility; only the one-question-per-item mode exists.
    """

    item_name = "question"

    def __getitem__(self, i):
        qid = self.qids[i]
        example = self.query_db[qid]
        vid = video_of(self.query_db, qid)
        video_inputs = self.video_db[vid]
        num_frames = len(video_inputs[3])
        target = qa_target(example, qid, self.query_db)
        ts_target = torch.tensor(ts_string_span(example.get("ts"), self.frame_interval,
                                                 num_frames), dtype=torch.long)
        qa_ids = build_qa_inputs(example, qid, self.query_db)
        videos = [extend_video_text(video_inputs, qa) for qa in qa_ids]
        qa_masks = [torch.ones(len(qa), dtype=torch.long) for qa in qa_ids]
        return videos, qa_ids, qa_masks, [vid], [target], [ts_target]


def video_qa_collate(inputs):
    """B questions -> ``video_collate`` over 5·B videos (question-major, answer order) + QA keys."""
    videos, qa_ids, qa_masks, targets, ts_targets = [], [], [], [], []
    for item_videos, item_qa, item_masks, _vids, item_tgt, item_ts in inputs:
        videos.extend(item_videos)
        qa_ids.extend(item_qa)
        qa_masks.extend(item_masks)
        targets.extend(item_tgt)
        ts_targets.extend(item_ts)
    batch = video_collate(videos)
    qa_input_ids, qa_pos_ids, qa_attn_masks = txt_input_collate(qa_ids, qa_masks)
    batch.update({
        "targets": torch.stack(targets),
        "ts_targets": pad_sequence(ts_targets, batch_first=True, padding_value=-1),
        "qa_input_ids": qa_input_ids,
        "qa_pos_ids": qa_pos_ids,
        "qa_attn_masks": qa_attn_masks,
    })
    return batch


class VideoQaEvalDataset(VideoQaDataset):
    """Same items as :class:`VideoQaDataset`, prefixed with the question id."""

    def __getitem__(self, i):
        return self.qids[i], super().__getitem__(i)


def video_qa_eval_collate(inputs):
    qids, items = zip(*inputs)
    batch = video_qa_collate(items)
    batch["qids"] = list(qids)
    return batch
