"""Frame order modelling (data.md §10.3, model.md §7.3).

Per video a random subset of positions is shuffled among itself: the frame at ``p_k`` moves to
slot ``order[p_k]`` and the label at that slot is ``p_k``. Upstream quirks kept: no minimum
selection (a video, even a whole batch, may have every target -1 — the loss is then NaN), a
selected frame that stays in place still gets a label, and ``reordered_frame_idx`` /
``binary_targets`` are built although the model ignores them (pitfall 15).
"""
from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

from data.data import video_collate
from utils.distributed import shard

FOM_PROB = 0.15


def random_reorder(num_frames: int, reorder_p: float = FOM_PROB):
    """``(order, target)`` lists of length ``num_frames`` (data.md §10.3).

    Positions ``P`` are selected with ``random.random() < reorder_p`` in order; a copy of ``P``
    is ``random.shuffle``d into ``Pi``; ``order[P_k] = Pi_k`` and ``target[Pi_k] = P_k``.
    """
    selected = [t for t in range(num_frames) if random.random() < reorder_p]
    shuffled = list(selected)
    random.shuffle(shuffled)
    order = list(range(num_frames))
    target = [-1] * num_frames
    for pos, new_pos in zip(selected, shuffled):
        order[pos] = new_pos
        target[new_pos] = pos
    return order, target


def pairwise_order_targets(targets, max_len: int):
    """``reordered_frame_idx`` (2P,) and ``binary_targets`` (P,) over labelled positions.

    For labelled positions ``i < j`` of video ``b``: ``(b*L+i, b*L+j)`` labelled 0 if
    ``target_i > target_j`` else 1, then ``(b*L+j, b*L+i)`` with the converse label.
    """
    frame_idx, binary = [], []
    for b, row in enumerate(targets):
        labelled = [t for t, tgt in enumerate(row) if tgt != -1]
        for a, i in enumerate(labelled):
            for j in labelled[a + 1:]:
                label = 0 if row[i] > row[j] else 1
                frame_idx += [b * max_len + i, b * max_len + j, b * max_len + j, b * max_len + i]
                binary += [label, 1 - label]
    return torch.tensor(frame_idx, dtype=torch.long), torch.tensor(binary, dtype=torch.long)


class FomDataset(Dataset):
    """FOM items ``(video_tuple, order, target)`` over sharded ``video_ids``."""

    def __init__(self, video_ids, vid_sub_db, random_reorder_p=FOM_PROB):
        self.ids = shard(video_ids)
        self.vid_sub_db = vid_sub_db
        self.random_reorder_p = random_reorder_p

    def __len__(self):
        return len(self.ids)

    def _item(self, vid):
        video = self.vid_sub_db[vid]
        order, target = random_reorder(video[3].size(0), self.random_reorder_p)
        return video, order, target

    def __getitem__(self, i):
        return self._item(self.ids[i])


def fom_collate(inputs):
    """``video_collate`` plus ``shuffled_orders``, ``targets`` (B, Lc) and the pair tensors.

    Padding slots get the identity order and target -1, so each row is a permutation of
    ``0..Lc-1`` for the model's scatter.
    """
    videos, orders, targets = map(list, zip(*inputs))
    batch = video_collate(videos)
    max_len = batch["c_v_feats"].size(1)
    batch["shuffled_orders"] = torch.tensor(
        [order + list(range(len(order), max_len)) for order in orders], dtype=torch.long)
    batch["targets"] = torch.tensor([tgt + [-1] * (max_len - len(tgt)) for tgt in targets],
                                    dtype=torch.long)
    batch["reordered_frame_idx"], batch["binary_targets"] = pairwise_order_targets(targets,
                                                                                   max_len)
    return batch


class FomEvalDataset(FomDataset):
    """FOM validation items ``(vid, video_tuple, order, target)``; same random reordering."""

    def __getitem__(self, i):
        vid = self.ids[i]
        return (vid, *self._item(vid))


def fom_eval_collate(inputs):
    """:func:`fom_collate` plus ``vids`` (list, batch order)."""
    vids = [item[0] for item in inputs]
    batch = fom_collate([item[1:] for item in inputs])
    batch["vids"] = vids
    return batch
