"""Packed F-TRM rows (issue 17, ``model/packing.py``) against the padded reference layout.

Every task head is run twice on the same weights and batch, ``row_layout="packed"`` (with
bucketed and jagged attention, sdpa and math) and ``"padded"`` (upstream's computation), in
train mode with dropout 0 (so the packed last layer, the shared query pass and the embedding
pass are all exercised). Losses, outputs and every parameter gradient must agree: fp32 relative
error (‖a − b‖ / ‖b‖ per tensor) ≤ 1e-5; under CPU autocast ≤ 2e-2 (bf16, 8-bit mantissa) and
≤ 2e-3 (fp16): the two layouts run GEMMs of other shapes, so low-precision roundings differ.
Gradients that are exactly 0 in exact arithmetic (attention key biases and the QA heads' biases
before a softmax: shift-invariant) hold only rounding noise on both sides; a gradient whose
reference norm is below tol/10 of the norm of the whole gradient is therefore compared in
absolute terms, its difference below that same bound.
"""
from __future__ import annotations

import pytest
import torch
from test_model_fidelity import (
    DV,
    PADDED_VIDEOS,
    VOCAB,
    add_fom_keys,
    add_mfm_keys,
    build,
    make_mlm_batch,
    qa_and_violin_batches,
    tvc_batch,
    video_batch,
    with_queries,
)

from model import (
    HeroForPretraining,
    HeroForTvc,
    HeroForVcmr,
    HeroForVideoQA,
    HeroForViolin,
    HeroForVr,
)
from model.encoder import set_row_layout
from model.layers import set_dropout
from model.packing import BUCKET_RATIO, Packing

FP32_REL = 1e-5
AUTOCAST_REL = {torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _vsm(cls, k, task, **kw):
    return cls, dict(lw_neg_ctx=2.0, lw_neg_q=3.0, lw_st_ed=0.5, **kw), \
        lambda: with_queries(video_batch(), k), lambda m, b: m(b, task)


def _v_task(task, batch_fn):
    return HeroForPretraining, {}, batch_fn, lambda m, b: m(b, task)


CASES = {
    "vcmr": _vsm(HeroForVcmr, 1, "tvr"),
    "vsm": _vsm(HeroForPretraining, 5, "vsm"),
    "vr": (HeroForVr, dict(lw_neg_ctx=1.0, lw_neg_q=1.0), lambda: with_queries(video_batch(), 1),
           lambda m, b: m(b, "msrvtt_video_sub")),
    "repr": (HeroForPretraining, {}, video_batch, lambda m, b: m.v_encoder(b, "repr")),
    "mlm": _v_task("mlm", lambda: make_mlm_batch(PADDED_VIDEOS, vfeat_dim=DV,
                                                 vocab_size=VOCAB, n_masked=2)),
    "mffr": _v_task("mffr", lambda: add_mfm_keys(video_batch(), {0: [1, 5], 1: [3]})),
    "mfm-nce": _v_task("mfm-nce", lambda: add_mfm_keys(video_batch(), {0: [1, 5], 1: [3]})),
    "fom": _v_task("fom", lambda: add_fom_keys(video_batch(), {0: {1: 3, 3: 1},
                                                               1: {0: 2, 2: 0}})),
    "qa": (HeroForVideoQA, {}, lambda: qa_and_violin_batches()[0], lambda m, b: m(b, "tvqa")),
    "violin": (HeroForViolin, {}, lambda: qa_and_violin_batches()[1],
               lambda m, b: m(b, "violin")),
    "tvc": (HeroForTvc, {}, tvc_batch, lambda m, b: m(b)),
}


def _as_list(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if t is not None]


def run(model, batch, fn, layout, packed_attn=None, dtype=None):
    """Outputs and parameter gradients of one training step (loss = sum of the outputs)."""
    set_row_layout(model, layout, packed_attn)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        outs = _as_list(fn(model, batch))
        loss = sum(o.float().sum() for o in outs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach().float() for o in outs], grads


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_same(packed, padded, tol):
    (outs_a, grads_a), (outs_b, grads_b) = packed, padded
    assert len(outs_a) == len(outs_b) and grads_a.keys() == grads_b.keys()
    for a, b in zip(outs_a, outs_b):
        assert rel_err(a, b) <= tol, (rel_err(a, b), tol)
    floor = tol / 10 * float(torch.stack([g.norm() for g in grads_b.values()]).norm())
    for name, b in grads_b.items():
        diff = float((grads_a[name] - b).norm())
        if float(b.norm()) <= floor:
            assert diff <= floor, (name, diff, floor)
        else:
            assert diff <= tol * float(b.norm()), (name, diff / float(b.norm()), tol)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("impl,packed_attn", [("sdpa", "bucket"), ("math", "bucket"),
                                              ("sdpa", "jagged")])
def test_packed_rows_equal_padded_reference_fp32(case, impl, packed_attn):
    cls, kwargs, batch_fn, fn = CASES[case]
    model, _ = build(cls, impl, **kwargs)
    set_dropout(model, 0.0).train()
    batch = batch_fn()
    assert_same(run(model, batch, fn, "packed", packed_attn), run(model, batch, fn, "padded"),
                FP32_REL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["vcmr", "mlm", "qa", "tvc"])
def test_packed_rows_equal_padded_reference_under_autocast(case, dtype):
    cls, kwargs, batch_fn, fn = CASES[case]
    model, _ = build(cls, "sdpa", **kwargs)
    set_dropout(model, 0.0).train()
    batch = batch_fn()
    assert_same(run(model, batch, fn, "packed", dtype=dtype),
                run(model, batch, fn, "padded", dtype=dtype), AUTOCAST_REL[dtype])


def test_packing_round_trip_buckets_and_reading():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    query = torch.tensor([[1, 1, 0], [1, 1, 1]])
    packing = Packing([mask, query])
    assert packing.lengths == [3, 4, 0, 2, 2, 3] and packing.num_tokens == 14
    assert packing.padding_share == pytest.approx(1 - 14 / 26)
    x, y = torch.randn(4, 5, 3), torch.randn(2, 3, 3)
    out_x, out_y = packing.unpack(packing.pack(x, y))
    torch.testing.assert_close(out_x, x * mask[..., None], rtol=0, atol=0)
    torch.testing.assert_close(out_y, y * query[..., None], rtol=0, atol=0)
    read = torch.zeros_like(mask, dtype=torch.bool)
    read[1, 1] = read[3, 0] = True
    view, slots = packing.reading([read, query])
    assert view.q_lengths == [0, 1, 0, 1, 2, 3] and slots.numel() == 7
    assert view.query_index.tolist() == [3, 7] + list(range(9, 14))
    lengths = [10, 9, 8, 7, 3, 2, 0]
    from model.packing import _bucket_rows
    for group in _bucket_rows(lengths, lengths):
        assert min(lengths[r] for r in group) >= BUCKET_RATIO * lengths[group[0]]


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_bucket_attention_matches_rows_one_by_one(impl):
    """Head-major bucket gathers (forward and backward) against attention row by row, on a
    reading view where row 2 has no query: its keys and values get exactly zero gradient."""
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 1, 1, 0]])
    read = torch.zeros_like(mask, dtype=torch.bool)
    read[0, :2] = read[1, 3] = read[3, :5] = True
    packing = Packing(mask)
    view, _ = packing.reading(read)
    heads, dim = 2, 8
    q = torch.randn(view.query_index.numel(), dim, requires_grad=True)
    k, v = (torch.randn(packing.num_tokens, dim, requires_grad=True) for _ in range(2))
    out = view.attend(q, k, v, heads, 0.0, impl)

    def split(x):
        return x.view(x.size(0), heads, dim // heads).transpose(0, 1)
    ref, kv_at, q_at = [], packing.offsets.tolist(), view.q_offsets.tolist()
    for r in range(mask.size(0)):
        qs, ks, vs = q[q_at[r]:q_at[r + 1]], k[kv_at[r]:kv_at[r + 1]], v[kv_at[r]:kv_at[r + 1]]
        probs = torch.softmax(split(qs) @ split(ks).transpose(1, 2) / (dim // heads) ** 0.5, -1)
        ref.append((probs @ split(vs)).transpose(0, 1).reshape(-1, dim))
    ref = torch.cat(ref)
    torch.testing.assert_close(out, ref)
    weight = torch.randn_like(ref)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad((ref * weight).sum(), (q, k, v))):
        torch.testing.assert_close(got, want)
    assert not grads[1][kv_at[2]:kv_at[3]].any() and not grads[2][kv_at[2]:kv_at[3]].any()
