"""Masked language modelling over subtitle rows (data.md §10.1).

One item is a *video*; it yields one row per kept subtitle: ``[CLS] + masked tokens`` (CLS, not
SEP, pitfall 1) next to the frames assigned to that subtitle. The collate flattens all rows of
the batch. Python ``random`` drives the masking, as upstream (data.md §11.5).

Decision (pitfall 14): upstream crashes on a row with no token (ASR pseudo-subtitles). We raise
a ``ValueError`` naming the video and subtitle index instead, so the researcher can drop that
video from the split file; silently skipping would change the row/frame alignment.
"""
from __future__ import annotations

import random

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from data.data import TXT_PAD, get_gather_index, pad_tensors
from utils.distributed import shard

MLM_PROB = 0.15


def random_word(tokens, vocab_range, mask, mask_prob: float = MLM_PROB):
    """BERT masking of ``tokens`` (a list, modified in place); returns ``(tokens, labels)``.

    Per token: with probability ``mask_prob`` its label is the original id and it becomes MASK
    (80%), a uniform random id in ``[vocab_range[0], vocab_range[1])`` (10%) or stays (10%);
    otherwise its label is -1. If nothing was selected the first token is forced to MASK.
    ``random.randrange`` replaces upstream's ``random.choice(list(range(...)))``: both consume
    the same random state and return the same id.
    """
    if not tokens:
        raise ValueError("random_word: cannot mask an empty token list")
    labels = []
    for i, token in enumerate(tokens):
        prob = random.random()
        if prob < mask_prob:
            prob /= mask_prob
            if prob < 0.8:
                tokens[i] = mask
            elif prob < 0.9:
                tokens[i] = random.randrange(*vocab_range)
            labels.append(token)
        else:
            labels.append(-1)
    if all(label == -1 for label in labels):
        labels[0] = tokens[0]
        tokens[0] = mask
    return tokens, labels


def mlm_row(text, frame_feats, cls_id: int, v_range, mask_id: int, mask_prob: float = MLM_PROB):
    """One MLM row ``(input_ids, v_feat, attn_mask, txt_mask_tgt, txt_labels)``.

    ``frame_feats`` is ``(f, D)``; with ``f == 0`` a zero dummy row is used and masked out.
    """
    tokens, labels = random_word(list(text), v_range, mask_id, mask_prob)
    input_ids = torch.tensor([cls_id] + tokens, dtype=torch.long)
    txt_labels = torch.tensor([-1] + labels, dtype=torch.long)
    num_frames = frame_feats.size(0)
    if num_frames == 0:
        frame_feats = frame_feats.new_zeros(1, frame_feats.size(1))
    attn_mask = torch.ones(frame_feats.size(0) + len(input_ids), dtype=torch.long)
    if num_frames == 0:
        attn_mask[0] = 0
    txt_mask_tgt = torch.cat([torch.zeros(frame_feats.size(0), dtype=torch.bool),
                              txt_labels != -1])
    return input_ids, frame_feats, attn_mask, txt_mask_tgt, txt_labels


def context_text(sub_ids, sub_idx: int, sub_ctx_len: int, max_txt_len: int, drop=()):
    """Tokens of subtitles ``sub_idx - sub_ctx_len .. sub_idx``, each cut to ``max_txt_len``.

    Subtitles whose index is in ``drop`` contribute nothing (VSM removes its query sentences).
    """
    start = max(0, sub_idx - sub_ctx_len)
    return [tok for j in range(start, sub_idx + 1) if j not in drop
            for tok in sub_ids[j][:max_txt_len]]


class VideoMlmDataset(Dataset):
    """MLM items over the videos ``video_ids`` (sharded by rank) of ``vid_sub_db``.

    ``sub_ctx_len`` defaults to the video dataset's own value (0 in the released config);
    ``mask_prob`` is the token selection probability (0.15 in every released config).
    Frames are **not** filtered against the clip length here (upstream does not either;
    ``load_video_sub_dataset`` already rejects videos where that would matter, pitfall 10).
    """

    def __init__(self, video_ids, vid_sub_db, mask_prob=MLM_PROB, sub_ctx_len=None):
        self.ids = shard(video_ids)
        self.vid_sub_db = vid_sub_db
        self.txt_db = vid_sub_db.txt_db
        self.img_db = vid_sub_db.img_db
        self.mask_prob = mask_prob
        self.sub_ctx_len = vid_sub_db.sub_ctx_len if sub_ctx_len is None else sub_ctx_len
        self.max_txt_len = vid_sub_db.max_txt_len

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        vid = self.ids[i]
        clip_feats = self.img_db[vid]
        sub_ids = self.txt_db[vid]["input_ids"]
        rows = []
        for sub_idx, frames in self.vid_sub_db.vid_sub2frame[vid]:
            text = context_text(sub_ids, sub_idx, self.sub_ctx_len, self.max_txt_len)
            if not text:
                raise ValueError(f"MLM: video {vid!r} subtitle {sub_idx} has no token to mask "
                                 "(pseudo-subtitle?); remove the video from the split file")
            rows.append(mlm_row(text, clip_feats[list(frames)], self.txt_db.cls_,
                                self.txt_db.v_range, self.txt_db.mask, self.mask_prob))
        return rows


def mlm_collate(inputs):
    """Flatten the rows of all videos into the MLM batch (data.md §10.1).

    ``txt_labels`` keeps only labels != -1, row-major, i.e. in the order the model selects the
    hidden states with ``txt_mask_tgt``. Text positions are not clamped (pitfall 3).
    """
    rows = [row for video in inputs for row in video]
    if not rows:
        raise ValueError("mlm_collate: the batch has no subtitle row")
    input_ids, v_feats, attn_masks, txt_mask_tgt, txt_labels = map(list, zip(*rows))
    num_frames = [f.size(0) for f in v_feats]
    max_frames = max(num_frames)
    attn_masks = pad_sequence(attn_masks, batch_first=True, padding_value=0)
    labels = torch.cat(txt_labels)
    return {
        "input_ids": pad_sequence(input_ids, batch_first=True, padding_value=TXT_PAD),
        "position_ids": torch.arange(max(len(t) for t in input_ids),
                                     dtype=torch.long).unsqueeze(0),
        "v_feat": pad_tensors(v_feats, max_frames) if max_frames > 0 else None,
        "attn_masks": attn_masks,
        "gather_index": get_gather_index([len(t) for t in input_ids], num_frames, max_frames,
                                         attn_masks.size(1)),
        "txt_mask_tgt": pad_sequence(txt_mask_tgt, batch_first=True, padding_value=False),
        "txt_labels": labels[labels != -1],
    }
