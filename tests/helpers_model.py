"""Synthetic model inputs in the exact batch layouts of data.md §8 and §10, for model tests.

The builders mirror ``video_collate`` (frames-first gather index, dummy masked frame for a
segment without frames, per-video ``num_subs`` and unfiltered ``sub_idx2frame_idx``) so that model
tests do not depend on LMDB files.  A video is described as ``(n_frames, pairs)`` where each pair
is ``(sub_idx, frame_list, text_len)``; the segment text is ``</s>`` followed by ``text_len - 1``
random tokens.  Everything is drawn from a seeded ``torch.Generator``, so a spec plus a seed
always gives the same batch.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

PAD_ID, CLS_ID, SEP_ID, MASK_ID = 1, 0, 2, 50264
TOKEN_RANGE = (4, 50261)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"

# Padded batch: unequal segment frame counts and text lengths, an unmatched frame (video 0,
# frame 5), a frame-less subtitle (video 0, sub 3 -> dummy frame) and videos of different lengths.
PADDED_VIDEOS = [
    (6, [(0, [0], 3), (1, [1, 2], 5), (2, [3, 4], 2), (3, [], 4)]),
    (4, [(0, [0, 1], 4), (1, [2, 3], 3)]),
]
# Unpadded batch: every segment has 2 frames and 3 tokens, every video 4 frames; all masks are 1.
UNPADDED_VIDEOS = [
    (4, [(0, [0, 1], 3), (1, [2, 3], 3)]),
    (4, [(0, [0, 1], 3), (1, [2, 3], 3)]),
]


def small_config(hidden: int = 32, heads: int = 4, f_layers: int = 2, c_layers: int = 2,
                 vocab: int = 64, type_vocab: int = 2, with_q: bool = True,
                 d_layers: int = 0) -> dict:
    """A tiny model-config dict (finetune-style: padded vocab, 2 token types)."""
    def sub(layers, vocab_size, types=type_vocab, max_pos=514):
        return {"attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
                "hidden_dropout_prob": 0.1, "hidden_size": hidden, "initializer_range": 0.02,
                "intermediate_size": 4 * hidden, "max_position_embeddings": max_pos,
                "num_attention_heads": heads, "num_hidden_layers": layers,
                "type_vocab_size": types, "vocab_size": vocab_size}
    cfg = {"f_config": sub(f_layers, vocab), "c_config": sub(c_layers, -1)}
    if with_q:
        cfg["q_config"] = sub(0, vocab, types=1)
    if d_layers:
        cfg["d_config"] = sub(d_layers, vocab, max_pos=1024)
    return cfg


def load_config(name: str) -> dict:
    """Read one of the project's model-config JSONs (e.g. ``"hero_finetune"``)."""
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def _tokens(gen, n, vocab_size):
    hi = min(TOKEN_RANGE[1], vocab_size)
    return torch.randint(TOKEN_RANGE[0], hi, (n,), generator=gen).tolist()


def _pad(seqs, value, dtype=torch.long):
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(s, dtype=dtype)
    return out


def _pad_feats(feats, dim):
    width = max(f.size(0) for f in feats)
    out = torch.zeros(len(feats), width, dim)
    for i, f in enumerate(feats):
        out[i, :f.size(0)] = f
    return out


def gather_index(n_frames, txt_lens, n_frame_slots, width):
    """data.md §8: row s is arange(width) with positions nf..nf+tl-1 -> Lv..Lv+tl-1."""
    idx = torch.arange(width).repeat(len(n_frames), 1)
    for s, (nf, tl) in enumerate(zip(n_frames, txt_lens)):
        idx[s, nf:nf + tl] = torch.arange(n_frame_slots, n_frame_slots + tl)
    return idx


def make_video_batch(videos=None, vfeat_dim: int = 4352, vocab_size: int = 50272,
                     seed: int = 0) -> dict:
    """Build a ``video_collate`` batch (data.md §8) from a list of ``(n, pairs)`` videos.

    Besides the collate keys the dict carries ``_clip_feats`` (list of raw (n, D) features) and
    ``_seg_text`` (list of segment token lists) so tests can compute expected values.
    """
    videos = PADDED_VIDEOS if videos is None else videos
    gen = torch.Generator().manual_seed(seed)
    texts, seg_feats, seg_masks, n_frames, clips, pairs_all = [], [], [], [], [], []
    for n, pairs in videos:
        clip = torch.randn(n, vfeat_dim, generator=gen)
        clips.append(clip)
        pairs_all.append([(s, list(frames)) for s, frames, _ in pairs])
        for _, frames, tl in pairs:
            text = [SEP_ID] + _tokens(gen, tl - 1, vocab_size)
            frames = [f for f in frames if f < n]
            feats = clip[frames] if frames else torch.zeros(1, vfeat_dim)
            mask = [1] * (len(frames) + tl) if frames else [0] + [1] * tl
            texts.append(text)
            seg_feats.append(feats)
            seg_masks.append(mask)
            n_frames.append(feats.size(0))
    f_attn = _pad(seg_masks, 0)
    lv, ls = max(n_frames), max(len(t) for t in texts)
    lc = max(c.size(0) for c in clips)
    return {
        "f_sub_input_ids": _pad(texts, PAD_ID),
        "f_sub_pos_ids": torch.arange(ls).clamp(max=511).unsqueeze(0),
        "f_v_feats": _pad_feats(seg_feats, vfeat_dim),
        "f_v_pos_ids": torch.arange(lv).unsqueeze(0),
        "f_attn_masks": f_attn,
        "f_gather_index": gather_index(n_frames, [len(t) for t in texts], lv, f_attn.size(1)),
        "f_sub_input_attn_masks": _pad([[1] * len(t) for t in texts], 0),
        "c_v_feats": _pad_feats(clips, vfeat_dim),
        "c_pos_ids": torch.arange(lc).repeat(len(clips), 1),
        "c_attn_masks": _pad([[1] * c.size(0) for c in clips], 0),
        "num_subs": [len(p) for _, p in videos],
        "sub_idx2frame_idx": pairs_all,
        "_clip_feats": clips,
        "_seg_text": texts,
    }


def add_mfm_keys(batch: dict, masked: dict) -> dict:
    """Add the MFM keys of data.md §10.2; ``masked`` maps video index -> masked frame list.

    Masked frames are zeroed in ``f_v_feats``/``c_v_feats``; ``feat_targets`` holds their raw
    features in (video, frame) row-major order.
    """
    c_masks = torch.zeros(batch["c_attn_masks"].shape, dtype=torch.bool)
    for b, frames in masked.items():
        c_masks[b, frames] = True
    f_masks = torch.zeros(batch["f_v_feats"].shape[:2], dtype=torch.bool)
    row = 0
    for b, pairs in enumerate(batch["sub_idx2frame_idx"]):
        for _, frames in pairs:
            for j, f in enumerate(frames):
                f_masks[row, j] = bool(c_masks[b, f])
            row += 1
    targets = batch["c_v_feats"][c_masks].clone()
    batch.update(
        f_v_masks=f_masks, c_v_masks=c_masks, feat_targets=targets,
        f_v_feats=batch["f_v_feats"].masked_fill(f_masks.unsqueeze(-1), 0),
        c_v_feats=batch["c_v_feats"].masked_fill(c_masks.unsqueeze(-1), 0))
    return batch


def add_fom_keys(batch: dict, moves: dict) -> dict:
    """Add ``shuffled_orders``/``targets`` (data.md §10.3).

    ``moves`` maps video index -> ``{orig_pos: new_pos}`` (a permutation of the selected
    positions): frame at ``orig_pos`` moves to ``new_pos``, whose label is ``orig_pos``.
    """
    b_size, lc = batch["c_attn_masks"].shape
    orders = torch.arange(lc).repeat(b_size, 1)
    targets = torch.full((b_size, lc), -1, dtype=torch.long)
    for b, mapping in moves.items():
        assert sorted(mapping) == sorted(mapping.values()), "moves must permute the positions"
        for orig, new in mapping.items():
            orders[b, orig] = new
            targets[b, new] = orig
    batch.update(shuffled_orders=orders, targets=targets)
    return batch


def make_mlm_batch(videos=None, vfeat_dim: int = 4352, vocab_size: int = 50272,
                   seed: int = 0, n_masked: int = 1) -> dict:
    """An ``mlm_collate`` batch (data.md §10.1): one row per subtitle, ``<s>`` first.

    The first ``n_masked`` text tokens after ``<s>`` of each row are replaced by ``<mask>``
    and labelled with their original ids.
    """
    videos = PADDED_VIDEOS if videos is None else videos
    gen = torch.Generator().manual_seed(seed)
    mask_id = MASK_ID if vocab_size > MASK_ID else vocab_size - 1
    ids, labels, feats, masks, tgts, n_frames = [], [], [], [], [], []
    for n, pairs in videos:
        clip = torch.randn(n, vfeat_dim, generator=gen)
        for _, frames, tl in pairs:
            toks = _tokens(gen, tl, vocab_size)
            k = min(n_masked, tl)
            lab = toks[:k] + [-1] * (tl - k)
            row = [CLS_ID] + [mask_id] * k + toks[k:]
            f = clip[frames] if frames else torch.zeros(1, vfeat_dim)
            mask = [1] * (len(frames) + len(row)) if frames else [0] + [1] * len(row)
            ids.append(row)
            labels.append([-1] + lab)
            feats.append(f)
            masks.append(mask)
            tgts.append([False] * f.size(0) + [x != -1 for x in [-1] + lab])
            n_frames.append(f.size(0))
    attn = _pad(masks, 0)
    lv = max(n_frames)
    flat = [x for row in labels for x in row if x != -1]
    return {
        "input_ids": _pad(ids, PAD_ID),
        "position_ids": torch.arange(max(len(r) for r in ids)).unsqueeze(0),
        "v_feat": _pad_feats(feats, vfeat_dim),
        "attn_masks": attn,
        "gather_index": gather_index(n_frames, [len(r) for r in ids], lv, attn.size(1)),
        "txt_mask_tgt": _pad(tgts, False, dtype=torch.bool),
        "txt_labels": torch.tensor(flat, dtype=torch.long),
    }


def make_txt_batch(lengths=(4, 6, 3), vocab_size: int = 50272, seed: int = 0,
                   first_id: int = CLS_ID) -> dict:
    """Text-only rows (``<s>`` + tokens, pad 1): ``input_ids``, ``pos_ids``, ``attn_masks``."""
    gen = torch.Generator().manual_seed(seed)
    rows = [[first_id] + _tokens(gen, n - 1, vocab_size) for n in lengths]
    width = max(lengths)
    return {"input_ids": _pad(rows, PAD_ID),
            "pos_ids": torch.arange(width).clamp(max=511).unsqueeze(0),
            "attn_masks": _pad([[1] * n for n in lengths], 0)}
