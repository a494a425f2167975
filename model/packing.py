"""Padding-free rows for the F-TRM (issue 17): pack the valid tokens, attend row by row.

The F-TRM (model.md §6) runs one row per subtitle segment, padded to the longest row of the
batch; in TVR-like batches 70-75% of the slots are padding. Every part of a post-LN BERT layer
(model.md §4.1-§4.3) except attention acts on each token alone, so the linears, GELU, LayerNorm
and dropout can run on the valid tokens only, concatenated into one ``(T, D)`` matrix. Attention
must stay inside a row; two equivalent ways are kept:

- ``"bucket"`` (default off CUDA): rows sorted by length and cut into buckets whose shortest row
  is at least ``BUCKET_RATIO`` of the longest, each bucket padded to its own width and masked
  with the same additive −10000 key mask as the padded reference (§4.4), so each row sees
  exactly its own keys. Few large batched matmuls, little padding.
- ``"jagged"`` (default on CUDA): a nested jagged tensor over the packed tokens, which
  ``scaled_dot_product_attention`` maps onto the fused variable-length (flash / memory-
  efficient) kernels: no padding at all.

All buckets' slots are gathered from the packed tokens at once (one gather each for Q, K and
V per layer, buckets are then contiguous views) and the outputs selected back at once. Their
backward is a gather too (:class:`_SlotGather`, :class:`_SlotSelect`) instead of autograd's
scatter: on this CPU the backward of ``index_select`` (a ``scatter_add`` over an expanded index)
took ~17x as long as that of advanced indexing (an accumulating ``index_put_``) for a
600 x 768 gather, and both are scatters (issue 17, item 4).

Masked keys get probability exactly 0 in fp32 softmax (exp(−10000 + s) underflows), so both are
the padded computation minus the padding slots: outputs agree to rounding (tests compare them).

Several padded inputs (the subtitle rows and the query rows of a VCMR step, issue 17 item 3) can
share one packing, hence one encoder call. :meth:`Packing.reading` restricts the queries of a
layer to the tokens a task reads (item 2): the last F-TRM layer then computes frame positions
only, with every token still a key.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.layers import ATTN_MASK_VALUE, attention

BUCKET_RATIO = 0.75  # a bucket's shortest row is >= this share of its widest: <= 25% padding
PACKED_ATTN = ("bucket", "jagged")


class Packing:
    """Where the valid tokens of 0/1 masks (one ``(R, L)`` mask or a list) live once packed.

    ``index`` maps packed token t to its flat slot in the concatenation of the flattened
    masks; ``lengths`` / ``offsets`` (``cu_seqlens``) are the jagged row boundaries over all
    rows of all parts; ``query_index`` (``None`` = every token) lists the packed tokens whose
    outputs a layer computes (see :meth:`reading`).
    """

    def __init__(self, masks, attn: str = "bucket"):
        if attn not in PACKED_ATTN:
            raise ValueError(f"unknown packed attention {attn!r}; expected one of {PACKED_ATTN}")
        masks = [masks] if torch.is_tensor(masks) else list(masks)
        self.shapes = [tuple(m.shape) for m in masks]
        self.attn = attn
        flat = torch.cat([m.bool().reshape(-1) for m in masks])
        self.index = flat.nonzero().squeeze(1)
        lengths = torch.cat([m.bool().sum(1) for m in masks])
        self.lengths = lengths.tolist()
        self.offsets = F.pad(lengths.cumsum(0), (1, 0))
        self.num_tokens = int(self.index.numel())
        self.query_index, self.q_lengths, self.q_offsets = None, self.lengths, self.offsets
        self._buckets = None

    @property
    def padding_share(self) -> float:
        """Share of padded slots that packing removes (0 for inputs without padding)."""
        slots = sum(r * w for r, w in self.shapes)
        return 1.0 - self.num_tokens / slots if slots else 0.0

    def pack(self, *padded: torch.Tensor) -> torch.Tensor:
        """One (R_i, L_i, D) tensor per mask -> (T, D): the valid slots, row-major."""
        flat = torch.cat([x.reshape(-1, x.size(-1)) for x in padded])
        return flat[self.index]

    def unpack(self, packed: torch.Tensor, index=None) -> list:
        """(T, D) -> one (R_i, L_i, D) tensor per mask, zeros at the slots not in ``index``
        (default: every valid slot); padding slots are read by no task (model.md §6)."""
        index = self.index if index is None else index
        slots = sum(r * w for r, w in self.shapes)
        out = packed.new_zeros(slots, packed.size(-1)).index_copy(0, index, packed)
        parts = out.split([r * w for r, w in self.shapes])
        return [p.view(r, w, -1) for p, (r, w) in zip(parts, self.shapes)]

    def reading(self, read_masks):
        """A copy whose queries are only the valid slots set in ``read_masks`` (one per mask).

        Returns ``(packing, slots)``: ``slots`` (T_q,) are the flat slots of those queries, for
        :meth:`unpack` of the layer's (T_q, D) output.
        """
        read_masks = [read_masks] if torch.is_tensor(read_masks) else list(read_masks)
        flat = torch.cat([m.bool().reshape(-1) for m in read_masks])[self.index]
        view = object.__new__(Packing)
        view.__dict__.update(self.__dict__)
        view.query_index = flat.nonzero().squeeze(1)
        dev = flat.device
        rows = torch.repeat_interleave(torch.arange(len(self.lengths), device=dev),
                                       torch.tensor(self.lengths, device=dev))
        q_lengths = torch.bincount(rows[flat], minlength=len(self.lengths))
        view.q_lengths = q_lengths.tolist()
        view.q_offsets = F.pad(q_lengths.cumsum(0), (1, 0))
        view._buckets = None
        return view, self.index[view.query_index]

    def attend(self, q, k, v, num_heads: int, dropout_p: float, impl: str):
        """Row-wise attention: q (T_q, D) for the query tokens, k/v (T, D) -> merged (T_q, D)."""
        if self.attn == "jagged" and impl == "sdpa":
            return self._attend_jagged(q, k, v, num_heads, dropout_p)
        return self._attend_buckets(q, k, v, num_heads, dropout_p, impl)

    def _attend_jagged(self, q, k, v, num_heads, dropout_p):
        def heads(x, offsets):
            return torch.nested.nested_tensor_from_jagged(
                x.reshape(x.size(0), num_heads, -1), offsets.to(x.device)).transpose(1, 2)
        scale = 1.0 / math.sqrt(q.size(-1) // num_heads)
        out = F.scaled_dot_product_attention(heads(q, self.q_offsets), heads(k, self.offsets),
                                             heads(v, self.offsets), dropout_p=dropout_p,
                                             scale=scale)
        return out.transpose(1, 2).values().reshape(q.size(0), -1)

    def _attend_buckets(self, q, k, v, num_heads, dropout_p, impl):
        if self._buckets is None:
            self._buckets = _make_buckets(self.lengths, self.q_lengths, q.device)
        (q_gather, q_inverse, kv_gather, kv_inverse), buckets = self._buckets
        d = q.size(-1) // num_heads
        q_all = _SlotGather.apply(q, q_gather, q_inverse)
        k_all, v_all = (_SlotGather.apply(x, kv_gather, kv_inverse) for x in (k, v))
        outs = []
        for (q0, q1, width_q), (k0, k1, width), key_mask in buckets:
            qh = q_all[q0:q1].view(-1, width_q, num_heads, d).transpose(1, 2)
            kh, vh = (x[k0:k1].view(-1, width, num_heads, d).transpose(1, 2)
                      for x in (k_all, v_all))
            out = attention(qh, kh, vh, key_mask.to(q.dtype), dropout_p, impl)
            outs.append(out.transpose(1, 2).reshape(-1, q.size(-1)))
        return _SlotSelect.apply(torch.cat(outs), q_inverse)


class _SlotGather(torch.autograd.Function):
    """Tokens (T, D) -> bucket slots (S, D) by ``index``; pad slots repeat token 0.

    Backward reads each token's gradient from its one valid slot ``inverse`` (T,) (S = none:
    a zero row), dropping what reached pad slots. That is exact: pad keys/values have softmax
    probability exactly 0 and pad queries are never selected, so their gradients are 0. It
    replaces an ``index_put_`` with accumulation by a plain gather (issue 17, item 4).
    """

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad = torch.cat([grad, grad.new_zeros(1, grad.size(1))])
        return grad.index_select(0, inverse), None, None


class _SlotSelect(torch.autograd.Function):
    """Slots (S, D) -> tokens by an injective ``index``; backward scatters into zeros."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.num_slots = x.size(0)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.num_slots, grad.size(1))
        return out.index_copy(0, index, grad), None


def _bucket_rows(lengths, q_lengths):
    """Rows with queries sorted by length (longest first), cut where a row is shorter than
    BUCKET_RATIO of the bucket's widest."""
    rows = sorted((r for r, n in enumerate(q_lengths) if n), key=lambda r: -lengths[r])
    groups, current = [], []
    for r in rows:
        if current and lengths[r] < BUCKET_RATIO * lengths[current[0]]:
            groups.append(current)
            current = []
        current.append(r)
    if current:
        groups.append(current)
    return groups


def _padded_gather(group, starts, lengths, width, gather, inverse):
    """Append ``group``'s rows padded to ``width`` (pads -> token 0) to ``gather`` and record
    each token's slot in ``inverse``."""
    for r in group:
        for j in range(lengths[r]):
            inverse[starts[r] + j] = len(gather) + j
        gather += list(range(starts[r], starts[r] + lengths[r])) + [0] * (width - lengths[r])


def _make_buckets(lengths, q_lengths, device):
    """Slot layouts of all buckets, concatenated: ((q gather, q inverse, kv gather, kv
    inverse), per bucket ((q slot range, q width), (kv slot range, kv width), key mask))."""
    starts, q_starts = [0], [0]
    for n, nq in zip(lengths, q_lengths):
        starts.append(starts[-1] + n)
        q_starts.append(q_starts[-1] + nq)
    q_gather, kv_gather, buckets = [], [], []
    q_inverse, kv_inverse = [None] * q_starts[-1], [None] * starts[-1]
    for group in _bucket_rows(lengths, q_lengths):
        width, width_q = lengths[group[0]], max(q_lengths[r] for r in group)
        q0, k0 = len(q_gather), len(kv_gather)
        _padded_gather(group, starts, lengths, width, kv_gather, kv_inverse)
        _padded_gather(group, q_starts, q_lengths, width_q, q_gather, q_inverse)
        key_mask = torch.full((len(kv_gather) - k0,), ATTN_MASK_VALUE, device=device)
        valid = [kv_inverse[starts[r] + j] - k0 for r in group for j in range(lengths[r])]
        key_mask[torch.tensor(valid, dtype=torch.long, device=device)] = 0.0
        buckets.append(((q0, len(q_gather), width_q), (k0, len(kv_gather), width),
                        key_mask.view(len(group), 1, 1, width)))
    kv_inverse = [len(kv_gather) if i is None else i for i in kv_inverse]
    index = [torch.tensor(x, dtype=torch.long, device=device)
             for x in (q_gather, q_inverse, kv_gather, kv_inverse)]
    return index, buckets
