"""Video item assembly, the shared video batch and the span-target conventions (data.md §7, §8).

One *video item* is the 7-tuple every task builds on::

    (seg_text_ids, seg_feats, seg_masks, clip_feats, clip_mask, num_subs, pairs)

``seg_*`` are per-segment lists (one segment per kept subtitle, text ``[SEP] + tokens``, frames
first then text in the mask), ``clip_*`` cover all ``n`` frames, ``num_subs`` = K and ``pairs``
= the **unfiltered** ``(sub_idx, frames)`` list of the subtitle DB (pitfall 10).
:func:`video_collate` turns B such tuples into the shared batch dict of §8.
"""
from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from data.txt_db import SubTokLmdb, VrSubTokLmdb
from data.video_db import VideoFeatLmdb, check_frame_counts

TXT_PAD = 1  # pad id hard-coded by upstream's collates (pitfall 2), not read from meta.json
MAX_TXT_POS = 511  # text positions above this are clamped in video_collate / txt_input_collate
SUB_MAX_TXT_LEN = 60  # VideoFeatSubTokDataset.max_txt_len: the loader never passes the config value


# ---------------------------------------------------------------------------------------------
# span targets (pitfall 5: three conventions)
# ---------------------------------------------------------------------------------------------
def inclusive_span(st_sec: float, ed_sec: float, frame_interval: float, num_frames: int):
    """VCMR/TVQA target ``(st, ed)``, ``ed`` the inclusive last frame, both capped at ``n-1``.

    A one-frame moment is widened to two frames (``ed >= st + 1``) unless the cap forbids it.
    """
    st = min(math.floor(st_sec / frame_interval), num_frames - 1)
    ed = min(max(math.ceil(ed_sec / frame_interval) - 1, st + 1), num_frames - 1)
    return st, ed


def exclusive_span(st_sec: float, ed_sec: float, frame_interval: float, num_frames: int):
    """TVC clip range ``[st, ed)``: Python ``round`` on the end, both capped at ``n``.

    A clip starting after ``n * fi`` gets ``st == ed == n`` (empty range), as upstream.
    """
    st = min(math.floor(st_sec / frame_interval), num_frames)
    ed = min(max(round(ed_sec / frame_interval), st + 1), num_frames)
    return st, ed


def vsm_span(frames, num_frames: int):
    """VSM local target ``(first frame, max(first+1, last frame))`` capped at ``n-1``."""
    st = frames[0]
    ed = min(max(frames[0] + 1, frames[-1]), num_frames - 1)
    if not 0 <= st <= ed < num_frames:
        raise ValueError(f"VSM span ({st}, {ed}) outside a video of {num_frames} frames "
                         f"(frames {list(frames)})")
    return st, ed


def ts_string_span(ts, frame_interval: float, num_frames: int):
    """TVQA ``ts`` string ``"s-e"`` (seconds) to an inclusive span; ``(-1, -1)`` on any failure.

    Failures are None, ``"NaN-NaN"`` and malformed strings, as upstream's bare ``except``.
    """
    try:
        st_sec, ed_sec = (float(x) for x in ts.split("-"))
        return inclusive_span(st_sec, ed_sec, frame_interval, num_frames)
    except (AttributeError, TypeError, ValueError, OverflowError):
        return -1, -1


# ---------------------------------------------------------------------------------------------
# collation
# ---------------------------------------------------------------------------------------------
def pad_tensors(tensors, max_len: int | None = None, pad: float = 0):
    """Stack ``(n_i, D)`` tensors into ``(B, max_len, D)``, padding rows with ``pad``."""
    max_len = max(t.size(0) for t in tensors) if max_len is None else max_len
    out = tensors[0].new_full((len(tensors), max_len, *tensors[0].shape[1:]), pad)
    for i, t in enumerate(tensors):
        out[i, :t.size(0)] = t
    return out


def get_gather_index(txt_lens, num_frames, max_frames: int, out_size: int):
    """Index that turns ``cat([frames (Lv), text (Ls)])`` into ``[frames, text, junk]`` rows.

    Row s starts as ``0..out_size-1``; positions ``nf_s .. nf_s+tl_s-1`` point to
    ``Lv .. Lv+tl_s-1``, i.e. into the text part of the concatenation.
    """
    gather_index = torch.arange(out_size, dtype=torch.long).unsqueeze(0).repeat(len(txt_lens), 1)
    for i, (tl, nf) in enumerate(zip(txt_lens, num_frames)):
        gather_index[i, nf:nf + tl] = torch.arange(max_frames, max_frames + tl, dtype=torch.long)
    return gather_index


def txt_input_collate(input_ids, attn_masks):
    """Pad 1-D id tensors with 1 and masks with 0; positions ``(1, L)`` clamped at 511."""
    input_ids = pad_sequence(list(input_ids), batch_first=True, padding_value=TXT_PAD)
    pos_ids = torch.arange(input_ids.size(1), dtype=torch.long).clamp_(max=MAX_TXT_POS)
    attn_masks = pad_sequence(list(attn_masks), batch_first=True, padding_value=0)
    return input_ids, pos_ids.unsqueeze(0), attn_masks


def video_collate(inputs):
    """Batch B video 7-tuples into the shared video dict (data.md §8).

    Segments of all videos are concatenated in video order (S rows); frame and text parts are
    padded separately and ``f_gather_index`` tells the model how to compact them.
    """
    (seg_ids, seg_feats, seg_masks, clip_feats, clip_masks,
     num_subs, sub_idx2frame_idx) = map(list, zip(*inputs))
    txt_ids = [t for video in seg_ids for t in video]
    frame_feats = [f for video in seg_feats for f in video]
    attn_masks = [m for video in seg_masks for m in video]
    if not txt_ids:
        raise ValueError("video_collate: the batch has no segment (every video has 0 subtitles "
                         "kept); check the subtitle DB's unique_sub2frames")
    batch = _segment_batch(txt_ids, frame_feats, attn_masks)
    batch.update(_clip_batch(clip_feats, clip_masks))
    batch["num_subs"] = num_subs
    batch["sub_idx2frame_idx"] = sub_idx2frame_idx
    return batch


def _segment_batch(txt_ids, frame_feats, attn_masks):
    """Frame-level (cross-modal) part of :func:`video_collate`."""
    f_sub_input_ids, f_sub_pos_ids, f_sub_input_attn_masks = txt_input_collate(
        txt_ids, [torch.ones(len(t), dtype=torch.long) for t in txt_ids])
    txt_lens = [len(t) for t in txt_ids]
    num_frames = [f.size(0) for f in frame_feats]
    max_frames = max(num_frames)
    f_attn_masks = pad_sequence(attn_masks, batch_first=True, padding_value=0)
    return {
        "f_sub_input_ids": f_sub_input_ids,
        "f_sub_pos_ids": f_sub_pos_ids,
        "f_v_feats": pad_tensors(frame_feats, max_frames),
        "f_v_pos_ids": torch.arange(max_frames, dtype=torch.long).unsqueeze(0),
        "f_attn_masks": f_attn_masks,
        "f_gather_index": get_gather_index(txt_lens, num_frames, max_frames,
                                           f_attn_masks.size(1)),
        "f_sub_input_attn_masks": f_sub_input_attn_masks,
    }


def _clip_batch(clip_feats, clip_masks):
    """Clip-level (temporal) part of :func:`video_collate`."""
    max_len = max(c.size(0) for c in clip_feats)
    c_pos_ids = torch.arange(max_len, dtype=torch.long).unsqueeze(0).repeat(len(clip_feats), 1)
    return {
        "c_v_feats": pad_tensors(clip_feats, max_len),
        "c_pos_ids": c_pos_ids,
        "c_attn_masks": pad_sequence(clip_masks, batch_first=True, padding_value=0),
    }


# ---------------------------------------------------------------------------------------------
# video datasets
# ---------------------------------------------------------------------------------------------
class VideoFeatSubTokDataset(Dataset):
    """Video + subtitle items (data.md §7), indexed by video name.

    ``max_txt_len`` is stored for MLM/VSM (always 60: upstream's loader never passes the config
    value); the segments built here are never truncated.
    """

    def __init__(self, sub_txt_db, img_db, max_txt_len=SUB_MAX_TXT_LEN, sub_ctx_len=0):
        if sub_txt_db.max_clip_len != img_db.max_clip_len:
            raise ValueError(f"max_clip_len differs: subtitle DB {sub_txt_db.max_clip_len} vs "
                             f"video DB {img_db.max_clip_len} ({img_db.img_dir})")
        self.txt_db = sub_txt_db
        self.img_db = img_db
        self.max_txt_len = max_txt_len
        self.sub_ctx_len = sub_ctx_len
        self.max_clip_len = img_db.max_clip_len
        self.frame_interval = img_db.frame_interval
        self.vid_sub2frame = sub_txt_db.vid_sub2frame
        self.vid2dur = sub_txt_db.vid2dur
        self.vid2idx = sub_txt_db.vid2idx
        self.vids = list(sub_txt_db.id2len)

    def __len__(self):
        return len(self.vids)

    def __contains__(self, vid):
        return vid in self.vid_sub2frame and vid in self.img_db.name2nframe

    def num_frames(self, vid) -> int:
        """Clip length ``n`` the reader yields for ``vid``, without loading the features."""
        return clip_num_frames(self.img_db, vid)

    def __getitem__(self, vid):
        clip_feats = self.img_db[vid]
        num_frames = clip_feats.size(0)
        pairs = self.vid_sub2frame[vid]
        sub_ids = self.txt_db[vid]["input_ids"]
        texts = [self._segment_text(sub_ids, sub_idx) for sub_idx, _ in pairs]
        seg_feats, seg_masks = segment_frames(clip_feats, [f for _, f in pairs],
                                              [len(t) for t in texts])
        seg_ids = [torch.tensor(t, dtype=torch.long) for t in texts]
        clip_mask = torch.ones(num_frames, dtype=torch.long)
        return seg_ids, seg_feats, seg_masks, clip_feats, clip_mask, len(pairs), pairs

    def _segment_text(self, sub_ids, sub_idx: int) -> list:
        """``[SEP]`` + subtitle ``sub_idx`` after its ``sub_ctx_len`` predecessors, untruncated."""
        ctx = sub_ids[max(0, sub_idx - self.sub_ctx_len):sub_idx + 1]
        return [self.txt_db.sep] + [tok for sub in ctx for tok in sub]


def segment_frames(clip_feats, frame_lists, txt_lens):
    """Features and frames-then-text masks of all K segments of one video.

    Segment k keeps the frames of ``frame_lists[k]`` below ``n = clip_feats.size(0)``; one with
    none gets a single zero row whose mask entry is 0. Built with one gather and two splits
    instead of K small indexing ops, whose per-call overhead dominated item assembly.
    """
    if not frame_lists:
        return [], []
    num_frames = clip_feats.size(0)
    counts = np.fromiter(map(len, frame_lists), dtype=np.int64, count=len(frame_lists))
    flat = np.fromiter(itertools.chain.from_iterable(frame_lists), dtype=np.int64,
                       count=int(counts.sum()))
    seg = np.repeat(np.arange(len(frame_lists)), counts)
    keep = flat < num_frames
    flat, seg = flat[keep], seg[keep]
    kept = np.bincount(seg, minlength=len(frame_lists))
    empty = kept == 0
    sizes = kept + empty  # an empty segment takes one (zero) row
    starts = np.cumsum(sizes) - sizes
    index = np.zeros(int(sizes.sum()), dtype=np.int64)
    index[starts[seg] + np.arange(flat.size) - (np.cumsum(kept) - kept)[seg]] = flat
    source = clip_feats if num_frames else clip_feats.new_zeros(1, clip_feats.size(1))
    feats = source.index_select(0, torch.from_numpy(index))
    feats.index_fill_(0, torch.from_numpy(starts[empty]), 0)
    mask_lens = sizes + np.asarray(txt_lens, dtype=np.int64)
    masks = np.ones(int(mask_lens.sum()), dtype=np.int64)
    masks[(np.cumsum(mask_lens) - mask_lens)[empty]] = 0
    return (list(feats.split(sizes.tolist())),
            list(torch.from_numpy(masks).split(mask_lens.tolist())))


def clip_num_frames(img_db, vid) -> int:
    """``n`` as the video reader computes it: ``name2nframe`` capped at ``max_clip_len``."""
    nframe = img_db.name2nframe[vid]
    return nframe if nframe < img_db.max_clip_len else img_db.max_clip_len


class VideoFeatDataset(Dataset):
    """Video-only items (DiDeMo/MSR-VTT without subtitles): one ``[CLS]`` segment of all frames.

    ``meta`` is the query DB's ``meta.json`` (a dict, the file, or the DB folder holding it);
    only ``CLS`` and ``SEP`` are read.
    """

    def __init__(self, meta, img_db):
        meta = _load_meta(meta)
        self.cls_ = meta["CLS"]
        self.sep = meta["SEP"]
        self.img_db = img_db
        self.txt_db = None
        self.max_clip_len = img_db.max_clip_len
        self.frame_interval = img_db.frame_interval
        self.vid2dur = img_db.name2nframe
        self.vids = sorted(img_db.name2nframe)
        self.vid2idx = {vid: i for i, vid in enumerate(self.vids)}

    def __len__(self):
        return len(self.vids)

    def __contains__(self, vid):
        return vid in self.img_db.name2nframe

    def num_frames(self, vid) -> int:
        """Clip length ``n`` the reader yields for ``vid``, without loading the features."""
        return clip_num_frames(self.img_db, vid)

    def __getitem__(self, vid):
        clip_feats = self.img_db[vid]
        num_frames = clip_feats.size(0)
        text = torch.tensor([self.cls_], dtype=torch.long)
        mask = torch.ones(num_frames + 1, dtype=torch.long)
        clip_mask = torch.ones(num_frames, dtype=torch.long)
        pairs = [(0, list(range(num_frames)))]
        return [text], [clip_feats], [mask], clip_feats, clip_mask, 1, pairs


def _load_meta(meta):
    if isinstance(meta, dict):
        return meta
    path = os.path.join(meta, "meta.json") if os.path.isdir(meta) else meta
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text DB meta.json not found: {path}")
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------
VFEAT_DIM = 4352  # ResNet-152 (2048) + SlowFast (2304), data.md §1.2


def _video_reader(vfeat_path, vfeat_interval, opts):
    """Reader for the task pipelines; records must be ``opts.vfeat_dim`` (4352) wide, so a
    mis-built video DB fails on read with the DB and key named instead of inside the model."""
    return VideoFeatLmdb(vfeat_path, getattr(opts, "vfeat_version", "resnet_slowfast"),
                         vfeat_interval, getattr(opts, "compressed_db", False),
                         opts.max_clip_len, expected_dim=getattr(opts, "vfeat_dim", VFEAT_DIM))


def load_video_sub_dataset(vfeat_path, sub_txt_db, vfeat_interval, opts):
    """Video reader + subtitle DB (``VrSubTokLmdb`` when ``opts.task`` contains ``msrvtt``).

    ``sub_txt_db`` may be a path or an already opened subtitle wrapper. Pitfall 10 is checked
    here: a video whose kept subtitle frames (``vid2len.json`` grid) reach beyond
    ``min(id2nframe, max_clip_len)`` raises, since the model would scatter out of range.
    """
    img_db = _video_reader(vfeat_path, vfeat_interval, opts)
    if isinstance(sub_txt_db, (str, os.PathLike)):
        wrapper = VrSubTokLmdb if "msrvtt" in getattr(opts, "task", "") else SubTokLmdb
        sub_txt_db = wrapper(sub_txt_db, opts.max_clip_len)
    check_frame_counts(img_db, sub_txt_db.vid_sub2frame, f"subtitle DB {sub_txt_db.db_dir}")
    return VideoFeatSubTokDataset(sub_txt_db, img_db, sub_ctx_len=opts.sub_ctx_len)


def load_video_only_dataset(vfeat_path, txt_meta, vfeat_interval, opts):
    """Video reader + the query DB's ``meta.json`` (dict, file or DB folder)."""
    return VideoFeatDataset(txt_meta, _video_reader(vfeat_path, vfeat_interval, opts))
