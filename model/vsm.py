"""Video-subtitle matching heads and losses shared by pretraining VSM, VCMR and VR (model.md §8).

Local alignment scores every frame against ``video_query_linear(q)`` and turns the similarity
curve into start/end logits with two bias-free 1-channel Conv1d (§8.3). Global alignment scores a
(query, video) pair by the max over frames of the cosine between the raw modular query and the
frame (§8.4). Ranking losses on those scores follow §8.5 exactly, including the quirks: owned
pairs are masked with 999 before sorting, hard negatives weight the hardest columns by
``hard_neg_weight`` and **all other columns by 0.1**, and eval mode returns per-query vectors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import mask_logits
from utils.distributed import (
    all_gather_object,
    all_gather_with_grad,
    gather_override,
    is_distributed,
)

NORM_EPS = 1e-5  # F.normalize eps of the video-level cosine scores (model.md §1)
POS_FILL = 999.0  # value written over owned (query, video) pairs before sorting (§8.5)
OUTSIDE_POOL_WEIGHT = 0.1  # weight of negatives ranked beyond hard_pool_size (§8.5, pitfall 14)
RANKING_LOSS_TYPES = ("hinge", "lse")


def span_conv(kernel_size: int = 5, stride: int = 1) -> nn.Conv1d:
    """1-in/1-out Conv1d without bias, zero padding ``kernel_size // 2`` (2 for kernel 5)."""
    return nn.Conv1d(1, 1, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)


def _conv_rows(signal: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """Convolve every row of (..., L) independently as a 1-channel signal."""
    lead = signal.shape[:-1]
    out = conv(signal.reshape(-1, 1, signal.size(-1)))
    return out.reshape(*lead, out.size(-1))


def span_similarity(query: torch.Tensor, frames: torch.Tensor, cross: bool) -> torch.Tensor:
    """⟨q_i, V_{j,t}⟩: (N, L) pairing query i with video i, or (N_q, N_v, L) when ``cross``."""
    if cross:
        return torch.einsum("id,jtd->ijt", query, frames)
    if query.size(0) != frames.size(0):
        raise ValueError(f"non-cross start/end scoring needs as many queries as videos, got "
                         f"{query.size(0)} queries and {frames.size(0)} videos")
    return torch.einsum("nd,ntd->nt", query, frames)


def st_ed_logits(query_proj, frames, c_mask, st_conv, ed_conv, cross=False):
    """Start/end logits of §8.3 from already projected queries (``video_query_linear(q)``).

    Cross mode is used when requested or when the query and video counts differ. Frames are not
    normalized; masked frames get exactly −1e4 after the convolution, so the ±2-frame boundary
    leakage from padded positions is kept as upstream has it.
    """
    cross = cross or query_proj.size(0) != frames.size(0)
    sim = span_similarity(query_proj, frames, cross)
    mask = c_mask.to(sim.dtype)
    if cross:
        mask = mask.unsqueeze(0)
    st = mask_logits(_conv_rows(sim, st_conv), mask)
    ed = mask_logits(_conv_rows(sim, ed_conv), mask)
    return st, ed


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=NORM_EPS)


def video_scores(query_norm: torch.Tensor, frames_norm: torch.Tensor,
                 c_mask: torch.Tensor) -> torch.Tensor:
    """S[i, j] = max_t mask_logits(⟨q̂_i, V̂_{j,t}⟩, c_{j,t}) on normalized inputs -> (N_q, N_v)."""
    sim = torch.einsum("id,jtd->ijt", query_norm, frames_norm)
    return mask_logits(sim, c_mask.to(sim.dtype).unsqueeze(0)).max(dim=-1).values


def gather_for_scoring(query_norm, frames_norm, c_mask):
    """Pad frames/masks to the global max length, then all-gather all three along dim 0.

    Identity with one process. Backward of the gather returns only this rank's gradient slice.
    Under ``--virtual_world_size`` the override of :mod:`utils.virtual_gather` gathers the
    virtual ranks instead, with the same semantics.
    """
    override = gather_override()
    if override is not None:
        return override(query_norm, frames_norm, c_mask)
    if not is_distributed():
        return query_norm, frames_norm, c_mask
    c_mask = c_mask.to(frames_norm.dtype)  # bool/int masks cannot always be padded/gathered
    max_len = max(all_gather_object(frames_norm.size(1)))
    extra = max_len - frames_norm.size(1)
    if extra:
        frames_norm = F.pad(frames_norm, (0, 0, 0, extra))
        c_mask = F.pad(c_mask, (0, extra))
    return (all_gather_with_grad(query_norm), all_gather_with_grad(frames_norm),
            all_gather_with_grad(c_mask))


def span_loss(st, ed, targets, q_vidx=None, training=True) -> torch.Tensor:
    """CE(st, targets[:, 0]) + CE(ed, targets[:, 1]), ignore −1 (unweighted).

    3-D (cross) logits are first reduced to each query's own video with ``q_vidx``. Reduction
    is **mean in train mode and sum in eval mode** (model.md §8.3, pitfall 15).
    """
    if st.dim() == 3:
        if q_vidx is None:
            raise ValueError("cross-mode start/end logits need batch['q_vidx'] to pick each "
                             "query's own video")
        rows = torch.arange(st.size(0), device=st.device)
        st, ed = st[rows, q_vidx], ed[rows, q_vidx]
    reduction = "mean" if training else "sum"
    return (F.cross_entropy(st, targets[:, 0], ignore_index=-1, reduction=reduction)
            + F.cross_entropy(ed, targets[:, 1], ignore_index=-1, reduction=reduction))


def ranking_fn(pos: torch.Tensor, neg: torch.Tensor, loss_type: str = "hinge",
               margin: float = 0.1) -> torch.Tensor:
    """hinge: max(0, margin + neg − pos); lse: log1p(exp(neg − pos)) (written literally)."""
    if loss_type == "hinge":
        return torch.clamp(margin + neg - pos, min=0)
    if loss_type == "lse":
        return torch.log1p(torch.exp(neg - pos))
    raise ValueError(f"unknown ranking_loss_type {loss_type!r}; expected one of "
                     f"{RANKING_LOSS_TYPES}")


def owned_pairs(n_q: int, n_v: int, device=None) -> torch.Tensor:
    """(N_q, N_v) bool: video i owns the contiguous queries [i·k, (i+1)·k), k = N_q / N_v."""
    if n_v == 0 or n_q % n_v:
        raise ValueError(f"ranking losses need a whole number of queries per video, got "
                         f"{n_q} queries for {n_v} videos (queries must be grouped per video)")
    k = n_q // n_v
    q_owner = torch.arange(n_q, device=device) // k
    return q_owner[:, None] == torch.arange(n_v, device=device)[None]


def hard_negative_weights(width: int, pool: int, weight: float, like: torch.Tensor):
    """Column weights for sorted negatives: ``weight`` inside the pool, 0.1 after it."""
    out = torch.full((width,), OUTSIDE_POOL_WEIGHT, dtype=like.dtype, device=like.device)
    out[:pool] = weight
    return out


def _reduce(loss: torch.Tensor, training: bool) -> torch.Tensor:
    """Train: mean over columns then rows (scalar). Eval: per-row mean (vector)."""
    per_row = loss.mean(dim=1)
    return per_row.mean() if training else per_row


def _sample_negative(sorted_scores, skip, pool_size, use_hard_negative):
    """One negative per row drawn uniformly from the sorted positions [skip, max_idx)."""
    width = sorted_scores.size(1)
    max_idx = min(skip + pool_size, width) if use_hard_negative else width
    idx = torch.randint(skip, max_idx, (sorted_scores.size(0), 1), device=sorted_scores.device)
    return sorted_scores.gather(1, idx)


def ranking_losses(scores: torch.Tensor, loss_type="hinge", margin=0.1, use_all_neg=True,
                   use_hard_negative=False, hard_pool_size=20, hard_neg_weight=10.0,
                   training=True):
    """(loss_neg_ctx, loss_neg_q), unweighted, from video scores S (N_q, N_v) (model.md §8.5).

    Queries must be grouped contiguously per video (k = N_q / N_v each, in video order); the
    batch's ``q_vidx`` is not used here, as upstream. With a single video both losses are a
    zero tensor of shape (1). ``use_all_neg=False`` draws with ``torch.randint``, neg_ctx first,
    then neg_q (draw order is our decision; upstream's order is not specified).
    The losses are computed in fp32, also under autocast, like every other loss of the model.
    """
    scores = scores.float()
    n_q, n_v = scores.shape
    if n_v == 1:
        zero = scores.new_zeros(1)
        return zero, zero.clone()
    owned = owned_pairs(n_q, n_v, scores.device)
    k = n_q // n_v
    # row i's own video is column i // k: a gather, not a boolean index (no device sync)
    owner = torch.arange(n_q, device=scores.device) // k
    pos = scores.gather(1, owner[:, None]).squeeze(1)
    masked = scores.masked_fill(owned, POS_FILL)
    sorted_ctx = masked.sort(dim=1, descending=True).values
    sorted_q = masked.t().sort(dim=1, descending=True).values
    if use_all_neg:
        loss_ctx = ranking_fn(pos[:, None], sorted_ctx[:, 1:], loss_type, margin)
        loss_q = ranking_fn(pos.view(n_v, k, 1), sorted_q[:, None, k:], loss_type, margin)
        loss_q = loss_q.reshape(n_q, n_q - k)
        if use_hard_negative:
            loss_ctx = loss_ctx * hard_negative_weights(n_v - 1, hard_pool_size,
                                                        hard_neg_weight, loss_ctx)
            loss_q = loss_q * hard_negative_weights(n_q - k, hard_pool_size,
                                                    hard_neg_weight, loss_q)
    else:
        neg_ctx = _sample_negative(sorted_ctx, 1, hard_pool_size, use_hard_negative)
        neg_q = _sample_negative(sorted_q, k, hard_pool_size, use_hard_negative)
        loss_ctx = ranking_fn(pos[:, None], neg_ctx, loss_type, margin)
        loss_q = ranking_fn(pos.view(n_v, k), neg_q, loss_type, margin).reshape(n_q, 1)
    return _reduce(loss_ctx, training), _reduce(loss_q, training)
