"""VSM / VCMR / VR heads: hand-computed losses, logits and scores, and the task models."""
from __future__ import annotations

import math

import pytest
import torch
from helpers_model import (
    PADDED_VIDEOS,
    add_fom_keys,
    add_mfm_keys,
    load_config,
    make_mlm_batch,
    make_txt_batch,
    make_video_batch,
    small_config,
)

from model.config import BertConfig
from model.layers import set_attn_impl
from model.pretrain import HeroForPretraining
from model.query import QueryFeatEncoder
from model.vcmr import HeroForVcmr
from model.vr import HeroForVr
from model.vsm import (
    normalize,
    ranking_losses,
    span_conv,
    span_loss,
    st_ed_logits,
    video_scores,
)


def hinge(pos, neg, margin=0.1):
    return max(0.0, margin + neg - pos)


# ---------------------------------------------------------------- ranking losses (model.md §8.5)
# k = 1: query i belongs to video i. Positives 0.5, 0.4, 0.3 on the diagonal.
S_K1 = torch.tensor([[0.5, 0.6, 0.2],
                     [0.3, 0.4, 0.45],
                     [0.1, 0.7, 0.3]])
# Per row, sorted negatives (hardest first) and hinge values, worked out by hand:
CTX_K1 = [[hinge(.5, .6), hinge(.5, .2)],    # [0.2, 0]
          [hinge(.4, .45), hinge(.4, .3)],   # [0.15, 0]
          [hinge(.3, .7), hinge(.3, .1)]]    # [0.5, 0]
Q_K1 = [[hinge(.5, .3), hinge(.5, .1)],      # video 0 vs queries 1, 2: [0, 0]
        [hinge(.4, .7), hinge(.4, .6)],      # video 1 vs queries 2, 0: [0.4, 0.3]
        [hinge(.3, .45), hinge(.3, .2)]]     # video 2 vs queries 1, 0: [0.25, 0]


def _row_means(rows, weights=None):
    weights = weights or [1.0] * len(rows[0])
    return torch.tensor([sum(w * v for w, v in zip(weights, r)) / len(r) for r in rows])


def test_hinge_all_negatives_k1_train_and_eval():
    ctx, q = ranking_losses(S_K1, training=True)
    assert ctx.shape == () and q.shape == ()
    torch.testing.assert_close(ctx, _row_means(CTX_K1).mean())
    torch.testing.assert_close(q, _row_means(Q_K1).mean())
    torch.testing.assert_close(ctx, torch.tensor(0.425 / 3))
    ctx_e, q_e = ranking_losses(S_K1, training=False)
    torch.testing.assert_close(ctx_e, torch.tensor([0.1, 0.075, 0.25]))
    torch.testing.assert_close(q_e, torch.tensor([0.0, 0.35, 0.125]))


def test_hinge_hard_negatives_weight_pool_and_tenth_outside():
    ctx, q = ranking_losses(S_K1, use_hard_negative=True, hard_pool_size=1,
                            hard_neg_weight=10.0)
    torch.testing.assert_close(ctx, _row_means(CTX_K1, [10.0, 0.1]).mean())
    torch.testing.assert_close(q, _row_means(Q_K1, [10.0, 0.1]).mean())
    # video 1: (10·0.4 + 0.1·0.3) / 2 — the column beyond the pool is scaled, not dropped
    _, q_e = ranking_losses(S_K1, use_hard_negative=True, hard_pool_size=1,
                            hard_neg_weight=10.0, training=False)
    torch.testing.assert_close(q_e[1], torch.tensor(2.015))


# k = 5, two videos: rows 0-4 own video 0, rows 5-9 own video 1.
A = [0.9, 0.8, 0.7, 0.6, 0.5]      # S[0:5, 0] positives
B = [0.2, 0.75, 0.1, 0.65, 0.3]    # S[0:5, 1] negatives of video 0's queries
C = [0.5] * 5                      # S[5:10, 1] positives
D = [0.0, 0.45, 0.1, 0.2, 0.3]     # S[5:10, 0] negatives of video 1's queries
S_K5 = torch.tensor([[a, b] for a, b in zip(A, B)] + [[d, c] for c, d in zip(C, D)])


def test_hinge_k5_queries_per_video():
    ctx, q = ranking_losses(S_K5)
    ctx_rows = [hinge(a, b) for a, b in zip(A, B)] + [hinge(c, d) for c, d in zip(C, D)]
    torch.testing.assert_close(ctx, torch.tensor(sum(ctx_rows) / 10))
    torch.testing.assert_close(ctx, torch.tensor(0.025))
    d_sorted, b_sorted = sorted(D, reverse=True), sorted(B, reverse=True)
    q_rows = ([[hinge(a, d) for d in d_sorted] for a in A]
              + [[hinge(c, b) for b in b_sorted] for c in C])
    torch.testing.assert_close(q, _row_means(q_rows).mean())
    torch.testing.assert_close(q, torch.tensor(0.061))
    _, q_hard = ranking_losses(S_K5, use_hard_negative=True, hard_pool_size=2,
                               hard_neg_weight=10.0)
    torch.testing.assert_close(q_hard, _row_means(q_rows, [10, 10, .1, .1, .1]).mean())
    torch.testing.assert_close(q_hard, torch.tensor(0.61))
    _, q_eval = ranking_losses(S_K5, training=False)
    assert q_eval.shape == (10,)


def test_lse_ranking():
    s = torch.tensor([[0.3, 0.5], [0.2, 0.4]])
    ctx, q = ranking_losses(s, loss_type="lse", training=False)
    lse = lambda pos, neg: math.log1p(math.exp(neg - pos))
    torch.testing.assert_close(ctx, torch.tensor([lse(.3, .5), lse(.4, .2)]))
    torch.testing.assert_close(q, torch.tensor([lse(.3, .2), lse(.4, .5)]))


def test_single_video_and_bad_grouping():
    ctx, q = ranking_losses(torch.rand(5, 1))
    assert ctx.shape == (1,) and ctx.item() == 0 and q.item() == 0
    with pytest.raises(ValueError, match="queries per video"):
        ranking_losses(torch.rand(5, 2))
    with pytest.raises(ValueError, match="ranking_loss_type"):
        ranking_losses(S_K1, loss_type="softmax")


def test_sampled_negative_from_hard_pool():
    s = torch.tensor([[0.5, 0.6, 0.2, 0.55],
                      [0.3, 0.4, 0.45, 0.1],
                      [0.1, 0.7, 0.3, 0.2],
                      [0.0, 0.2, 0.3, 0.35]])
    ctx, q = ranking_losses(s, use_all_neg=False, use_hard_negative=True, hard_pool_size=1,
                            training=False)
    # pool of 1 -> the sampled negative is always the hardest one
    torch.testing.assert_close(ctx, torch.tensor([hinge(.5, .6), hinge(.4, .45),
                                                  hinge(.3, .7), hinge(.35, .3)]))
    torch.testing.assert_close(q, torch.tensor([hinge(.5, .3), hinge(.4, .7),
                                                hinge(.3, .45), hinge(.35, .55)]))
    ctx_all, _ = ranking_losses(s[:2, :2], training=False)
    ctx_one, _ = ranking_losses(s[:2, :2], use_all_neg=False, training=False)
    torch.testing.assert_close(ctx_one, ctx_all)  # two videos: one possible negative


# ------------------------------------------------------------ span CE and logits (model.md §8.3)
def test_span_ce_train_mean_eval_sum_and_q_vidx():
    st = torch.zeros(3, 4)                                # uniform: CE = log 4
    ed = torch.log(torch.tensor([[.1, .2, .3, .4]])).repeat(3, 1)
    targets = torch.tensor([[0, 3], [1, 0], [-1, -1]])    # third query ignored
    mean = span_loss(st, ed, targets, training=True)
    torch.testing.assert_close(mean, torch.tensor(math.log(4) - (math.log(.4) + math.log(.1)) / 2))
    total = span_loss(st, ed, targets, training=False)
    torch.testing.assert_close(total, torch.tensor(2 * math.log(4) - math.log(.4) - math.log(.1)))
    noise = torch.randn(3, 2, 4) * 5                      # cross logits: rows of other videos
    q_vidx = torch.tensor([1, 0, 1])
    st3, ed3 = noise.clone(), noise.clone()
    st3[torch.arange(3), q_vidx], ed3[torch.arange(3), q_vidx] = st, ed
    torch.testing.assert_close(span_loss(st3, ed3, targets, q_vidx, training=False), total)


def _convs(weights_st, weights_ed):
    st, ed = span_conv(), span_conv()
    with torch.no_grad():
        st.weight.copy_(torch.tensor(weights_st).view(1, 1, 5))
        ed.weight.copy_(torch.tensor(weights_ed).view(1, 1, 5))
    return st, ed


def test_conv_is_unflipped_cross_correlation_with_mask():
    st_conv, ed_conv = _convs([0., 0., 1., 0., 0.], [1., 0., 0., 0., 0.])
    q = torch.tensor([[1.0, 0.0]])
    frames = torch.tensor([[[1., 0.], [2., 0.], [3., 0.], [4., 0.], [5., 0.]]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    st, ed = st_ed_logits(q, frames, mask, st_conv, ed_conv)
    assert st_conv.bias is None and st.shape == (1, 5)
    torch.testing.assert_close(st, torch.tensor([[1., 2., 3., 4., -1e4]]))
    # weight at tap 0 reads two frames back (no kernel flip), zero padded at the start
    torch.testing.assert_close(ed, torch.tensor([[0., 0., 1., 2., -1e4]]))


def test_conv_cross_and_non_cross_agree_on_diagonal():
    gen = torch.Generator().manual_seed(0)
    q, frames = torch.randn(3, 8, generator=gen), torch.randn(3, 6, 8, generator=gen)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])
    st_conv, ed_conv = span_conv(), span_conv()
    st, ed = st_ed_logits(q, frames, mask, st_conv, ed_conv)
    st_x, ed_x = st_ed_logits(q, frames, mask, st_conv, ed_conv, cross=True)
    assert st.shape == (3, 6) and st_x.shape == (3, 3, 6)
    torch.testing.assert_close(st_x.diagonal().t(), st)
    torch.testing.assert_close(ed_x.diagonal().t(), ed)
    st_more, _ = st_ed_logits(q[:2], frames, mask, st_conv, ed_conv)  # counts differ -> cross
    assert st_more.shape == (2, 3, 6)
    assert (st_x[0, 1, 4:] == -1e4).all()


def test_video_scores_ignore_masked_frames():
    q = normalize(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    frames = normalize(torch.tensor([[[1., 1.], [1., 0.]],     # frame 1 is masked
                                     [[0., 3.], [1., 0.]]]))
    mask = torch.tensor([[1, 0], [0, 1]])
    scores = video_scores(q, frames, mask)
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(scores, torch.tensor([[r, 1.0], [r, 0.0]]))
    all_masked = video_scores(q, frames, torch.zeros(2, 2, dtype=torch.long))
    assert (all_masked == -1e4).all()


# ----------------------------------------------------------------- query encoder (model.md §8.2)
def _q_config(hidden=16, heads=4):
    return BertConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=0,
                      max_position_embeddings=514)


def test_query_encoder_keys_padding_and_attention_paths():
    torch.manual_seed(0)
    enc = QueryFeatEncoder(_q_config(), input_size=16).eval()
    keys = set(enc.state_dict())
    assert "modular_vector_mapping.weight" in keys and "modular_vector_mapping.bias" not in keys
    assert "query_input_proj.net.1.weight" in keys
    assert "query_self_attention.self.query.weight" in keys
    assert "query_pos_embed.position_embeddings.weight" in keys
    feats = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    out = enc(feats, mask)
    assert out.shape == (2, 16)
    garbage = feats.clone()
    garbage[1, 3:] = 100.0                      # padded tokens must not matter
    torch.testing.assert_close(enc(garbage, mask), out)
    torch.testing.assert_close(enc(feats[1:, :3], mask[1:, :3]), out[1:])
    set_attn_impl(enc, "math")
    ref = enc(feats, mask)
    assert ((out - ref).norm() / ref.norm()) < 1e-5


# ------------------------------------------------------- autograd all-gather (model.md §8.4)
def _gather_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    from utils.distributed import all_gather_with_grad
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    x = torch.full((rank + 1, 2), float(rank + 1), requires_grad=True)  # sizes 1 and 2
    gathered = all_gather_with_grad(x)
    weights = torch.arange(1, 7, dtype=torch.float).view(3, 2)
    (gathered * weights).sum().backward()
    from model.vsm import gather_for_scoring
    length = rank + 2                                  # frames padded to the global max, 3
    _, frames, mask = gather_for_scoring(torch.ones(1, 2), torch.ones(1, length, 2),
                                         torch.ones(1, length, dtype=torch.long))
    torch.save({"gathered": gathered.detach(), "grad": x.grad, "frames": frames,
                "mask": mask}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_all_gather_with_grad_two_ranks_and_identity(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from utils.distributed import all_gather_with_grad
    x = torch.ones(2, 3)
    assert all_gather_with_grad(x) is x          # one process: identity
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2)
    expected = torch.tensor([[1., 1.], [2., 2.], [2., 2.]])
    weights = torch.arange(1, 7, dtype=torch.float).view(3, 2)
    for rank, rows in ((0, slice(0, 1)), (1, slice(1, 3))):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(out["gathered"], expected)
        torch.testing.assert_close(out["grad"], weights[rows])  # own slice, not summed
        assert out["frames"].shape == (2, 3, 2)
        assert out["mask"].tolist() == [[1., 1., 0.], [1., 1., 1.]]
        assert out["frames"][0, 2].abs().sum() == 0


# ------------------------------------------------------------------ task models (§3, §8, §9)
VDIM, HID = 16, 32
SMALL = small_config(hidden=HID, heads=4, f_layers=1, c_layers=1, vocab=64)
HEAD_SHAPES = {
    "video_query_linear.weight": (768, 768), "video_query_linear.bias": (768,),
    "video_st_predictor.weight": (1, 1, 5), "video_ed_predictor.weight": (1, 1, 5),
    "q_feat_attn.query_input_proj.LayerNorm.weight": (768,),
    "q_feat_attn.query_input_proj.LayerNorm.bias": (768,),
    "q_feat_attn.query_input_proj.net.1.weight": (768, 768),
    "q_feat_attn.query_input_proj.net.1.bias": (768,),
    "q_feat_attn.query_pos_embed.position_embeddings.weight": (514, 768),
    "q_feat_attn.query_pos_embed.LayerNorm.weight": (768,),
    "q_feat_attn.query_pos_embed.LayerNorm.bias": (768,),
    **{f"q_feat_attn.query_self_attention.self.{n}.weight": (768, 768)
       for n in ("query", "key", "value")},
    **{f"q_feat_attn.query_self_attention.self.{n}.bias": (768,)
       for n in ("query", "key", "value")},
    "q_feat_attn.query_self_attention.output.dense.weight": (768, 768),
    "q_feat_attn.query_self_attention.output.dense.bias": (768,),
    "q_feat_attn.query_self_attention.output.LayerNorm.weight": (768,),
    "q_feat_attn.query_self_attention.output.LayerNorm.bias": (768,),
    "q_feat_attn.modular_vector_mapping.weight": (1, 768),
}


def test_full_size_head_keys_parameter_count_and_entries():
    cfg = load_config("hero_finetune")                    # meta device: shapes only, fast
    with torch.device("meta"):
        models = [HeroForPretraining(cfg), HeroForVcmr(cfg),
                  HeroForVr(cfg, lw_neg_ctx=10, lw_neg_q=10)]
    keys = None
    for model in models:
        sd = model.state_dict()
        assert len(sd) == 211
        heads = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("v_encoder.")}
        assert heads == HEAD_SHAPES
        assert sum(p.numel() for p in model.parameters()) == 121_037_262
        assert model.expected_missing_keys == ()
        assert keys is None or list(sd) == keys
        keys = list(sd)


def _small(cls=None, **kwargs):
    torch.manual_seed(0)
    cls = cls or HeroForPretraining
    return cls.from_pretrained(SMALL, {}, vfeat_dim=VDIM, **kwargs)


def _vsm_batch(k=5, seed=0):
    """Two videos (6 and 4 frames, the second padded) with k contiguous queries each."""
    batch = make_video_batch(PADDED_VIDEOS, vfeat_dim=VDIM, vocab_size=64, seed=seed)
    lengths = [3, 5, 4, 2, 6, 3, 4, 5, 2, 3][:2 * k]
    q = make_txt_batch(lengths, vocab_size=64, seed=seed + 1)
    spans = [[0, 1], [2, 4], [1, 3], [4, 5], [3, 5], [0, 3], [1, 2], [2, 3], [0, 1], [1, 3]]
    batch.update(query_input_ids=q["input_ids"], query_pos_ids=q["pos_ids"],
                 query_attn_masks=q["attn_masks"], targets=torch.tensor(spans[:2 * k]),
                 q_vidx=torch.arange(2 * k) // k, vids=["v0", "v1"])
    return batch


def _rel_err(a, b):
    valid = b > -1e4 + 1                                  # compare unmasked logits only
    assert torch.equal(valid, a > -1e4 + 1)
    return ((a - b)[valid].norm() / b[valid].norm()).item()


@pytest.mark.parametrize("cls,task,k", [(HeroForPretraining, "vsm", 5),
                                        (HeroForVcmr, "tvr", 1),
                                        (HeroForVr, "msrvtt_video_sub", 1)])
def test_fast_and_math_attention_agree(cls, task, k):
    kwargs = dict(lw_neg_ctx=1.0, lw_neg_q=1.0)
    if cls is not HeroForVr:
        kwargs["lw_st_ed"] = 1.0
    model = _small(cls, **kwargs).eval()
    batch = _vsm_batch(k)
    with torch.no_grad():
        fast_pred, fast_loss = model(batch, task, compute_loss=False), model(batch, task)
        set_attn_impl(model, "math")
        ref_pred, ref_loss = model(batch, task, compute_loss=False), model(batch, task)
    fast_pred = fast_pred if isinstance(fast_pred, tuple) else (fast_pred,)
    ref_pred = ref_pred if isinstance(ref_pred, tuple) else (ref_pred,)
    for a, b in zip(fast_pred + fast_loss, ref_pred + ref_loss):
        assert _rel_err(a, b) < 1e-5


@pytest.mark.parametrize("cls,task,k", [(HeroForPretraining, "vsm", 5), (HeroForVcmr, "tvr", 1)])
def test_gradients_reach_every_head_parameter(cls, task, k):
    # margin 2 keeps every hinge term active, so the ranking losses reach the query encoder
    model = _small(cls, lw_neg_ctx=1.0, lw_neg_q=1.0, lw_st_ed=1.0, margin=2.0).train()
    losses = model(_vsm_batch(k), task)
    assert all(loss.shape == () for loss in losses)
    sum(losses).backward()
    heads = {n: p for n, p in model.named_parameters() if not n.startswith("v_encoder.")}
    assert len(heads) == len(HEAD_SHAPES)
    for name, param in heads.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model.v_encoder.c_encoder.encoder.layer[0].output.dense.weight.grad.abs().sum() > 0


def test_vsm_loss_wiring_weights_span_drop_and_hard_negatives():
    model = _small(lw_neg_ctx=2.0, lw_neg_q=3.0, lw_st_ed=0.5).eval()
    batch = _vsm_batch(5)
    with torch.no_grad():
        frames = model.v_encoder(batch, "repr")
        scores, st, ed = model.get_pred_from_raw_query(
            frames, batch["c_attn_masks"], batch["query_input_ids"], batch["query_pos_ids"],
            batch["query_attn_masks"])
        assert st.shape == (10, 2, 6)                     # 5 queries per video -> cross mode
        loss_st_ed, loss_ctx, loss_q = model(batch, "vsm")
        span = span_loss(st, ed, batch["targets"], batch["q_vidx"], training=False)
        torch.testing.assert_close(loss_st_ed, 0.5 * span)  # eval: summed CE
        ctx, q = ranking_losses(scores, training=False)
        torch.testing.assert_close(loss_ctx, 2.0 * ctx)
        torch.testing.assert_close(loss_q, 3.0 * q)
        assert loss_ctx.shape == (10,)
        model.set_hard_negative(True, 1, 10.0)
        _, hard_ctx, hard_q = model(batch, "vsm")
        ctx, q = ranking_losses(scores, use_hard_negative=True, hard_pool_size=1,
                                hard_neg_weight=10.0, training=False)
        torch.testing.assert_close(hard_q, 3.0 * q)
        torch.testing.assert_close(hard_ctx, 2.0 * ctx)
        model.set_train_st_ed(0)
        assert model(batch, "vsm")[0].tolist() == [0.0]
        model.set_train_st_ed(0.5)
        model.drop_svmr_prob = 1.0
        assert model(batch, "vsm")[0].item() > 0           # the drop applies to training only
        model.train()
        assert model(batch, "vsm")[0].tolist() == [0.0]
        model.lw_neg_ctx = model.lw_neg_q = 0
        assert model(batch, "vsm", compute_loss=False)[0] is None


def test_get_pred_from_raw_query_shapes_and_vr_outputs():
    vcmr = _small(HeroForVcmr, lw_neg_ctx=1.0).eval()
    batch = _vsm_batch(1)
    q3 = make_txt_batch((3, 5, 4), vocab_size=64, seed=3)
    q2 = make_txt_batch((3, 5), vocab_size=64, seed=3)
    with torch.no_grad():
        frames = vcmr.v_encoder(batch, "repr")
        assert frames.shape == (2, 6, HID)
        mask = batch["c_attn_masks"]
        scores, st, ed = vcmr.get_pred_from_raw_query(frames, mask, *q3.values())
        assert scores.shape == (3, 2) and st.shape == ed.shape == (3, 2, 6)
        assert (st[:, 1, 4:] == -1e4).all() and (scores.abs() <= 1 + 1e-6).all()
        scores2, st2, _ = vcmr.get_pred_from_raw_query(frames, mask, *q2.values())
        assert st2.shape == (2, 6)
        _, st2x, _ = vcmr.get_pred_from_raw_query(frames, mask, *q2.values(), cross=True)
        torch.testing.assert_close(st2x.diagonal().t(), st2)
        torch.testing.assert_close(scores2, scores[:2])
        vr = _small(HeroForVr, lw_neg_ctx=1.0)
        vr.load_state_dict(vcmr.state_dict())
        vr.eval()
        torch.testing.assert_close(vr.get_pred_from_raw_query(frames, mask, *q3.values()),
                                   scores)
        assert vr(batch, "msrvtt_video_only", compute_loss=False).shape == (2, 2)
        losses = vr(batch, "msrvtt_video_sub")
    assert len(losses) == 2 and vr.lw_st_ed == 0 and vr.drop_svmr_prob == 1.0
    vr.set_train_st_ed(0.01)
    assert vr.lw_st_ed == 0
    with pytest.raises(ValueError, match="lw_neg_ctx"):
        _small(HeroForVr)
    with pytest.raises(ValueError, match="unknown task"):
        vr(batch, "tvr")


def test_pretraining_dispatch_to_v_encoder_and_vcmr_task_names():
    model = _small().eval()
    mlm = make_mlm_batch(PADDED_VIDEOS, vfeat_dim=VDIM, vocab_size=64)
    video = make_video_batch(PADDED_VIDEOS, vfeat_dim=VDIM, vocab_size=64)
    cases = [("mlm", mlm), ("mffr", add_mfm_keys(dict(video), {0: [1, 5], 1: [2]})),
             ("mfm-nce", add_mfm_keys(dict(video), {0: [0], 1: [3]})),
             ("fom", add_fom_keys(dict(video), {0: {1: 3, 3: 1}}))]
    with torch.no_grad():
        for task, batch in cases:
            torch.testing.assert_close(model(batch, task), model.v_encoder(batch, task))
    with pytest.raises(ValueError, match="unknown task 'vcmr'"):
        model(video, "vcmr")
    vcmr = _small(HeroForVcmr, lw_neg_ctx=1.0).eval()
    batch = _vsm_batch(1)
    with torch.no_grad():
        ref = vcmr(batch, "tvr")
        for task in ("how2r", "didemo_video_sub", "didemo_video_only", "vsm"):
            torch.testing.assert_close(vcmr(batch, task), ref)
    with pytest.raises(ValueError, match="unknown task 'mlm'"):
        vcmr(mlm, "mlm")


def test_pretraining_checkpoint_loads_into_vcmr_and_vr(tmp_path):
    pre = _small()
    path = tmp_path / "model_step_1.pt"
    torch.save({**pre.state_dict(), "vocab_padded": True}, path)
    ckpt = torch.load(path, weights_only=True)
    for cls, kwargs in ((HeroForVcmr, {}), (HeroForVr, {"lw_neg_ctx": 10.0})):
        torch.manual_seed(1)                                  # a different random init
        model = cls.from_pretrained(SMALL, str(path), vfeat_dim=VDIM, **kwargs)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, ckpt[key], msg=key)
    partial = {k: v for k, v in ckpt.items() if k != "q_feat_attn.modular_vector_mapping.weight"}
    with pytest.raises(KeyError, match="modular_vector_mapping"):
        HeroForVcmr.from_pretrained(SMALL, partial, vfeat_dim=VDIM)
