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

Each bucket's Q, K and V are gathered straight into the head-major ``(rows, H, width, d)``
layout attention multiplies in (gathering 64-float head rows costs what gathering tokens
does), so no transpose or ``contiguous`` copy of heads is left in forward or backward, and the
outputs are selected back from that layout at once. The backward of the gather is a gather
too (:class:`_SlotGather`, :class:`_SlotSelect`) instead of autograd's scatter: on this CPU the
backward of ``index_select`` (a ``scatter_add`` over an expanded index) took ~17x as long as
that of advanced indexing (an accumulating ``index_put_``) for a 600 x 768 gather, and both
are scatters (issue 17, item 4).

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
            self._buckets = _make_buckets(self.lengths, self.q_lengths, num_heads, q.device)
        (q_chunks, q_inverse, kv_chunks, kv_inverse), buckets = self._buckets
        if not buckets:                                   # no token is read: nothing to attend
            return q.new_zeros(0, q.size(-1))
        d = q.size(-1) // num_heads
        impl = _bucket_impl(impl, dropout_p, q.device)
        q_all = _SlotGather.apply(q, d, q_inverse, *q_chunks)
        k_all, v_all = (_SlotGather.apply(x, d, kv_inverse, *kv_chunks) for x in (k, v))
        outs = []
        for qh, kh, vh, key_mask in zip(q_all, k_all, v_all, buckets):
            outs.append(attention(qh, kh, vh, key_mask.to(q.dtype), dropout_p, impl))
        return _SlotSelect.apply(q_inverse, *outs).view(q.size(0), -1)


def _bucket_impl(impl: str, dropout_p: float, device: torch.device) -> str:
    """``"math"`` where SDPA would run its unfused math kernel anyway (off CUDA with dropout:
    the CPU flash kernel takes no dropout). That kernel scales Q and K (rows x d each, forward
    and backward) and checks for fully masked rows; the reference scales the (rows x rows)
    scores once, fewer passes for the same softmax (issue 17, item 4)."""
    return "math" if impl == "sdpa" and dropout_p > 0 and device.type != "cuda" else impl


class _SlotGather(torch.autograd.Function):
    """Tokens (T, H·d) -> one contiguous (rows, H, width, d) tensor per bucket, so attention
    needs no transpose of heads (issue 17, item 4). ``chunks`` (rows, H, width) hold the
    source (token·H + head) rows; pad slots repeat row 0.

    Backward reads each (token, head) gradient from its one slot (``inverse``, T·H; the
    extra last row = zero for tokens in no bucket), dropping what reached pad slots. That is
    exact: pad keys/values have softmax probability exactly 0 and pad queries are never
    selected, so their gradients are 0. A gather instead of autograd's scatter-add.
    """

    @staticmethod
    def forward(ctx, x, head_dim, inverse, *chunks):
        ctx.save_for_backward(inverse)
        ctx.token_shape = x.shape
        rows = x.reshape(-1, head_dim)
        return tuple(rows.index_select(0, c.view(-1)).view(*c.shape, head_dim) for c in chunks)

    @staticmethod
    def backward(ctx, *grads):
        (inverse,) = ctx.saved_tensors
        d = grads[0].size(-1)
        flat = grads[0].new_empty(sum(g.numel() for g in grads) // d + 1, d)
        for part, g in zip(flat.split([g.numel() // d for g in grads] + [1]), grads):
            part.view(g.shape).copy_(g)
        flat[-1].zero_()
        grad = flat.index_select(0, inverse).view(ctx.token_shape)
        return (grad, None, None) + (None,) * len(grads)


class _SlotSelect(torch.autograd.Function):
    """Head-major bucket outputs -> (T_q·H, d) rows by an injective ``index`` (the query
    tokens' slots); backward scatters into zeros and splits back per bucket."""

    @staticmethod
    def forward(ctx, index, *outs):
        ctx.save_for_backward(index)
        ctx.shapes = [o.shape for o in outs]
        d = outs[0].size(-1)
        return torch.cat([o.reshape(-1, d) for o in outs]).index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        sizes = [s.numel() // grad.size(1) for s in ctx.shapes]
        full = grad.new_zeros(sum(sizes), grad.size(1)).index_copy_(0, index, grad)
        return (None,) + tuple(p.view(s) for p, s in zip(full.split(sizes), ctx.shapes))


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


def _head_major(gather, inverse, spans, num_heads, device):
    """Token slots -> (token·H + head) rows in head-major bucket order: (per-bucket source
    rows (rows, H, width), each (token, head)'s row in the concatenated buckets; tokens
    without a slot -> the row after the last). ``spans``: (first slot, slots, width) each.
    Built on the CPU from Python lists, then moved to ``device`` once."""
    heads = torch.arange(num_heads, device="cpu")
    src = torch.tensor(gather, dtype=torch.long, device="cpu")[:, None] * num_heads + heads
    where = torch.empty(len(gather), num_heads, dtype=torch.long, device="cpu")
    for s0, count, width in spans:
        local = torch.arange(count, device="cpu")
        base = s0 * num_heads + local // width * num_heads * width + local % width
        where[s0:s0 + count] = base[:, None] + heads * width
    order = torch.empty(src.numel(), dtype=torch.long, device="cpu")
    order[where.reshape(-1)] = src.reshape(-1)
    slots = torch.tensor([len(gather) if i is None else i for i in inverse], dtype=torch.long,
                         device="cpu")
    past_end = torch.full((1, num_heads), src.numel(), device="cpu")
    rows = torch.cat([where, past_end])[slots].reshape(-1)
    chunks = order.split([count * num_heads for _, count, _ in spans])
    return ([c.view(count // width, num_heads, width).to(device)
             for c, (_, count, width) in zip(chunks, spans)], rows.to(device))


def _make_buckets(lengths, q_lengths, num_heads, device):
    """Slot layouts of all buckets: ((q source rows per bucket, q inverse, kv source rows per
    bucket, kv inverse), key mask per bucket); see :func:`_head_major`."""
    starts, q_starts = [0], [0]
    for n, nq in zip(lengths, q_lengths):
        starts.append(starts[-1] + n)
        q_starts.append(q_starts[-1] + nq)
    q_gather, kv_gather, buckets, q_spans, kv_spans = [], [], [], [], []
    q_inverse, kv_inverse = [None] * q_starts[-1], [None] * starts[-1]
    for group in _bucket_rows(lengths, q_lengths):
        width, width_q = lengths[group[0]], max(q_lengths[r] for r in group)
        q0, k0 = len(q_gather), len(kv_gather)
        _padded_gather(group, starts, lengths, width, kv_gather, kv_inverse)
        _padded_gather(group, q_starts, q_lengths, width_q, q_gather, q_inverse)
        q_spans.append((q0, len(q_gather) - q0, width_q))
        kv_spans.append((k0, len(kv_gather) - k0, width))
        key_mask = torch.full((len(kv_gather) - k0,), ATTN_MASK_VALUE, device=device)
        valid = [kv_inverse[starts[r] + j] - k0 for r in group for j in range(lengths[r])]
        key_mask[torch.tensor(valid, dtype=torch.long, device=device)] = 0.0
        buckets.append(key_mask.view(len(group), 1, 1, width))
    q_chunks, q_rows = _head_major(q_gather, q_inverse, q_spans, num_heads, device)
    kv_chunks, kv_rows = _head_major(kv_gather, kv_inverse, kv_spans, num_heads, device)
    return (q_chunks, q_rows, kv_chunks, kv_rows), buckets
