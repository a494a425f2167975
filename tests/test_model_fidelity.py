"""Every task model against the independent functional reference ``ref_hero`` (model.md).

All parameters (LayerNorm affine, mask-embedding row 0, conv kernels, pos tables …) are
randomised first, so a swapped module, a wrong eps or a missing term cannot hide behind the
identity init. Both attention paths (sdpa, math) are checked, eval mode, fp32, 1e-5.
"""
from __future__ import annotations

import pytest
import torch
from helpers_model import (
    PADDED_VIDEOS,
    add_fom_keys,
    add_mfm_keys,
    make_mlm_batch,
    make_txt_batch,
    make_video_batch,
    small_config,
)
from ref_hero import Ref

from model import (
    HeroForPretraining,
    HeroForTvc,
    HeroForVcmr,
    HeroForVideoQA,
    HeroForViolin,
    HeroForVr,
)
from model.layers import set_attn_impl, set_dropout

DV, VOCAB, HEADS = 12, 64, 4
TOL = dict(rtol=1e-5, atol=1e-5)
IMPLS = ("sdpa", "math")


def build(cls, impl, seed=0, **kwargs):
    torch.manual_seed(seed)
    cfg = small_config(hidden=32, heads=HEADS, f_layers=2, c_layers=2, vocab=VOCAB,
                       d_layers=2 if cls is HeroForTvc else 0)
    model = cls(cfg, vfeat_dim=DV, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "LayerNorm" in name else 0.1))
    return set_attn_impl(model.eval(), impl), Ref(model, HEADS)


def video_batch(seed=0):
    return make_video_batch(PADDED_VIDEOS, vfeat_dim=DV, vocab_size=VOCAB, seed=seed)


def with_queries(batch, k, seed=1):
    n = len(batch["num_subs"]) * k
    q = make_txt_batch([3, 5, 4, 2, 6, 3, 4, 5, 2, 3][:n], vocab_size=VOCAB, seed=seed)
    spans = torch.tensor([[0, 1], [2, 4], [1, 3], [4, 5], [3, 5], [0, 3], [1, 2], [2, 3],
                          [0, 1], [1, 3]][:n])
    batch.update(query_input_ids=q["input_ids"], query_pos_ids=q["pos_ids"],
                 query_attn_masks=q["attn_masks"], targets=spans, q_vidx=torch.arange(n) // k)
    return batch


@torch.no_grad()
@pytest.mark.parametrize("impl", IMPLS)
def test_trunk_repr_mlm_mfm_fom(impl):
    model, ref = build(HeroForPretraining, impl)
    b = video_batch()
    torch.testing.assert_close(model.v_encoder(b, "repr"), ref.repr(b), **TOL)
    mlm = make_mlm_batch(PADDED_VIDEOS, vfeat_dim=DV, vocab_size=VOCAB, n_masked=2)
    torch.testing.assert_close(model(mlm, "mlm", compute_loss=False), ref.mlm_logits(mlm), **TOL)
    mfm = add_mfm_keys(video_batch(), {0: [1, 5], 1: [3]})
    preds, nce, mse = ref.mfm(mfm)
    torch.testing.assert_close(model(mfm, "mffr", compute_loss=False), preds, **TOL)
    torch.testing.assert_close(model(mfm, "mffr"), mse, **TOL)
    torch.testing.assert_close(model(mfm, "mfm-nce"), nce, **TOL)
    fom = add_fom_keys(video_batch(), {0: {1: 3, 3: 1}, 1: {0: 2, 2: 0}})
    logits = ref.fom_logits(fom)
    torch.testing.assert_close(model(fom, "fom", compute_loss=False), logits, **TOL)
    expected = torch.nn.functional.cross_entropy(logits, fom["targets"].flatten(),
                                                 ignore_index=-1)
    torch.testing.assert_close(model(fom, "fom"), expected, **TOL)


@torch.no_grad()
@pytest.mark.parametrize("impl", IMPLS)
def test_vcmr_inference_and_vr_scores(impl):
    model, ref = build(HeroForVcmr, impl, lw_neg_ctx=1.0)
    b = with_queries(video_batch(), 1)
    frames = ref.repr(b)
    q = ref.query(b["query_input_ids"], b["query_pos_ids"], b["query_attn_masks"])
    scores, st, ed = model.get_pred_from_raw_query(
        frames, b["c_attn_masks"], b["query_input_ids"], b["query_pos_ids"],
        b["query_attn_masks"], cross=True)
    ref_st, ref_ed = ref.st_ed(q, frames, b["c_attn_masks"], cross=True)
    torch.testing.assert_close(st, ref_st, **TOL)
    torch.testing.assert_close(ed, ref_ed, **TOL)
    torch.testing.assert_close(scores, ref.scores(q, frames, b["c_attn_masks"]), **TOL)
    _, st, ed = model(b, "tvr", compute_loss=False)           # N_q == N_v: non-cross
    ref_st, ref_ed = ref.st_ed(q, frames, b["c_attn_masks"], cross=False)
    torch.testing.assert_close(st, ref_st, **TOL)
    torch.testing.assert_close(ed, ref_ed, **TOL)
    vr, _ = build(HeroForVr, impl, lw_neg_ctx=1.0)
    vr.load_state_dict(model.state_dict())
    torch.testing.assert_close(vr(b, "msrvtt_video_sub", compute_loss=False),
                               ref.scores(q, frames, b["c_attn_masks"]), **TOL)


@pytest.mark.parametrize("k,task,training", [(5, "vsm", True), (5, "vsm", False),
                                             (1, "tvr", True), (1, "tvr", False)])
def test_vsm_losses_train_mean_eval_sum_and_hard_negatives(k, task, training):
    cls = HeroForPretraining if task == "vsm" else HeroForVcmr
    model, ref = build(cls, "math", lw_neg_ctx=2.0, lw_neg_q=3.0, lw_st_ed=0.5)
    model.set_hard_negative(True, 1, 10.0)
    set_dropout(model, 0.0).train(training)
    b = with_queries(video_batch(), k)
    with torch.no_grad():
        st_ed, ctx, qq = model(b, task)
    frames = ref.repr(b)
    q = ref.query(b["query_input_ids"], b["query_pos_ids"], b["query_attn_masks"])
    st, ed = ref.st_ed(q, frames, b["c_attn_masks"], cross=k > 1)
    if k > 1:
        st, ed = st[torch.arange(len(q)), b["q_vidx"]], ed[torch.arange(len(q)), b["q_vidx"]]
    red = "mean" if training else "sum"
    ce = torch.nn.functional.cross_entropy
    span = ce(st, b["targets"][:, 0], reduction=red) + ce(ed, b["targets"][:, 1], reduction=red)
    ref_ctx, ref_q = ref.ranking(ref.scores(q, frames, b["c_attn_masks"]), hard=(1, 10.0),
                                 training=training)
    torch.testing.assert_close(st_ed.reshape(()), 0.5 * span, **TOL)
    torch.testing.assert_close(ctx, 2.0 * ref_ctx, **TOL)
    torch.testing.assert_close(qq, 3.0 * ref_q, **TOL)


QA_VIDEOS = ([(6, [(0, [0, 1], 3), (1, [2, 3, 4], 4), (2, [], 3)])] * 5
             + [(4, [(0, [0, 1], 3), (1, [2, 3], 2)])] * 5)


def text(lengths, seed=3):
    t = make_txt_batch(lengths, vocab_size=VOCAB, seed=seed, first_id=2)
    return t["input_ids"], t["pos_ids"], t["attn_masks"]


@torch.no_grad()
@pytest.mark.parametrize("impl", IMPLS)
def test_video_qa_and_violin(impl):
    model, ref = build(HeroForVideoQA, impl)
    b = make_video_batch(QA_VIDEOS, vfeat_dim=DV, vocab_size=VOCAB)
    ids, pos, mask = text((5, 7, 4, 6, 5, 3, 8, 4, 4, 6))
    b.update(qa_input_ids=ids, qa_pos_ids=pos, qa_attn_masks=mask,
             targets=torch.tensor([[3], [1]]), ts_targets=torch.tensor([[1, 4], [0, 2]]))
    logits, st, ed = ref.qa(b)
    torch.testing.assert_close(model(b, "tvqa", compute_loss=False), logits, **TOL)
    qa_loss, temporal = model(b, "tvqa")
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(qa_loss, ce(logits, torch.tensor([3, 1])), **TOL)
    ts = b["ts_targets"]
    torch.testing.assert_close(temporal, (ce(st, ts[:, 0]) + ce(ed, ts[:, 1])) / 2, **TOL)

    model, ref = build(HeroForViolin, impl)
    b = make_video_batch([QA_VIDEOS[0], QA_VIDEOS[5], QA_VIDEOS[0]], vfeat_dim=DV,
                         vocab_size=VOCAB)
    ids, pos, mask = text((4, 6, 3))
    b.update(q_input_ids=ids, q_pos_ids=pos, q_attn_masks=mask,
             targets=torch.tensor([[1], [0], [1]]))
    logit = ref.violin(b)
    torch.testing.assert_close(model(b, "violin", compute_loss=False), logit, **TOL)
    bce = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logit), b["targets"].float())
    torch.testing.assert_close(model(b, "violin"), bce, **TOL)


CLIP_RANGES = (((0, 3), (2, 6)), ((1, 2),))
CAPTIONS = ([5, 9, 13, 7], [21, 4], [30, 31, 32, 33, 34, 35])


def tvc_batch():
    b = video_batch()
    width = max(len(c) for c in CAPTIONS) + 1
    ids = torch.full((len(CAPTIONS), width), 1)
    tgt = torch.full((len(CAPTIONS), width), -1)
    for i, cap in enumerate(CAPTIONS):
        ids[i, :len(cap) + 1] = torch.tensor([0] + cap)
        tgt[i, :len(cap) + 1] = torch.tensor(cap + [2])
    lens = [ed - st for clips in CLIP_RANGES for st, ed in clips]
    cap_mask = (torch.arange(max(lens))[None] < torch.tensor(lens)[:, None]).long()
    b.update(cap_input_ids=ids, cap_pos_ids=torch.arange(width)[None], cap_tgt_ids=tgt,
             cap_attn_mask=cap_mask, clip_ranges=CLIP_RANGES)
    return b


@torch.no_grad()
@pytest.mark.parametrize("impl", IMPLS)
def test_tvc_logits_loss_and_greedy(impl):
    model, ref = build(HeroForTvc, impl)
    b = tvc_batch()
    mem = ref.tvc_memory(b)
    logits = ref.tvc_logits(mem, b["cap_attn_mask"], b["cap_input_ids"])
    torch.testing.assert_close(model(b, compute_loss=False), logits, **TOL)
    expected = ref.smoothed_loss(logits, b["cap_tgt_ids"])
    torch.testing.assert_close(model(b), expected, **TOL)
    greedy = ref.greedy(mem, b["cap_attn_mask"], steps=6)
    assert torch.equal(model.greedy_ids(b, 6, use_cache=False), greedy)
    assert torch.equal(model.greedy_ids(b, 6, use_cache=True), greedy)


def qa_and_violin_batches():
    qa = make_video_batch(QA_VIDEOS, vfeat_dim=DV, vocab_size=VOCAB)
    ids, pos, mask = text((5, 7, 4, 6, 5, 3, 8, 4, 4, 6))
    qa.update(qa_input_ids=ids, qa_pos_ids=pos, qa_attn_masks=mask,
              targets=torch.tensor([[3], [1]]), ts_targets=torch.tensor([[1, 4], [0, 2]]))
    vi = make_video_batch([QA_VIDEOS[0], QA_VIDEOS[5]], vfeat_dim=DV, vocab_size=VOCAB)
    ids, pos, mask = text((4, 6))
    vi.update(q_input_ids=ids, q_pos_ids=pos, q_attn_masks=mask, targets=torch.tensor([[1], [0]]))
    return qa, vi


@torch.no_grad()
def test_qa_and_violin_losses_are_fp32_under_autocast():
    """CUDA autocast rejects BCE on probabilities; the losses must leave autocast in fp32."""
    qa_batch, violin_batch = qa_and_violin_batches()
    qa, _ = build(HeroForVideoQA, "sdpa")
    violin, _ = build(HeroForViolin, "sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [*qa(qa_batch, "tvqa"), violin(violin_batch, "violin")]
        logit = violin(violin_batch, "violin", compute_loss=False)
    assert [loss.dtype for loss in losses] == [torch.float32] * 3
    assert logit.dtype == torch.bfloat16                      # the model itself did autocast
    bce = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logit.float()),
                                                   violin_batch["targets"].float())
    torch.testing.assert_close(losses[2], bce)


@torch.no_grad()
def test_vr_get_pred_accepts_the_vcmr_signature():
    vr, ref = build(HeroForVr, "math", lw_neg_ctx=1.0)
    b = with_queries(video_batch(), 1)
    frames = ref.repr(b)
    q = ref.query(b["query_input_ids"], b["query_pos_ids"], b["query_attn_masks"])
    args = (frames, b["c_attn_masks"], b["query_input_ids"], b["query_pos_ids"],
            b["query_attn_masks"])
    expected = ref.scores(q, frames, b["c_attn_masks"])
    torch.testing.assert_close(vr.get_pred_from_raw_query(*args, True, False), expected, **TOL)
    torch.testing.assert_close(vr.get_pred_from_raw_query(*args, val_gather_gpus=False),
                               expected, **TOL)


def layer_norm_eps_expected(name: str) -> float:
    """1e-12 inside transformer layers (config default), 1e-5 everywhere else (model.md §1)."""
    inside = (".layer." in name and (name.endswith("output.LayerNorm")
                                     or ".add_norm_" in name)) \
        or name == "q_feat_attn.query_self_attention.output.LayerNorm"
    return 1e-12 if inside else 1e-5


@pytest.mark.parametrize("cls", [HeroForPretraining, HeroForVideoQA, HeroForViolin, HeroForTvc])
def test_every_layer_norm_eps(cls):
    model, _ = build(cls, "sdpa")
    eps = {n: m.eps for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps and all(v == layer_norm_eps_expected(n) for n, v in eps.items()), eps
    inside = sum(v == 1e-12 for v in eps.values())
    expected_inside = (2 + 2) * 2 + {HeroForPretraining: 1, HeroForTvc: 2 * 3}.get(cls, 0)
    assert inside == expected_inside
