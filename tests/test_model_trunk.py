"""HERO trunk: state-dict layout, parameter counts, numerics of repr / MLM / MFM / FOM."""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers_model import (
    PADDED_VIDEOS,
    UNPADDED_VIDEOS,
    add_fom_keys,
    add_mfm_keys,
    load_config,
    make_mlm_batch,
    make_video_batch,
    small_config,
)

from model.encoder import mfm_nce_loss, shuffle_frames
from model.layers import set_attn_impl
from model.model import HeroModel

DV, VOCAB = 16, 64
PADDED_MASKS, UNPADDED_MASKS = {0: [1, 5], 1: [3]}, {0: [1], 1: [2]}
FOM_MOVES = {0: {1: 3, 3: 1}, 1: {0: 2, 2: 0}}


def small_model(seed=0, **cfg):
    torch.manual_seed(seed)
    return HeroModel(small_config(**cfg), vfeat_dim=DV).eval()


def task_batch(task, videos):
    if task == "mlm":
        return make_mlm_batch(videos, vfeat_dim=DV, vocab_size=VOCAB, n_masked=2)
    batch = make_video_batch(videos, vfeat_dim=DV, vocab_size=VOCAB)
    if task in ("mffr", "mfm-nce"):
        add_mfm_keys(batch, PADDED_MASKS if videos is PADDED_VIDEOS else UNPADDED_MASKS)
    if task == "fom":
        add_fom_keys(batch, FOM_MOVES)
    return batch


def expected_trunk_shapes(d=768, ff=3072, v=50272, types=2, dv=4352, frm=100):
    layer = {"attention.self.query": (d, d), "attention.self.key": (d, d),
             "attention.self.value": (d, d), "attention.output.dense": (d, d),
             "attention.output.LayerNorm": None, "intermediate.dense": (ff, d),
             "output.dense": (d, ff), "output.LayerNorm": None}
    out = {"v_encoder.pad": (8, d), "v_encoder.f_encoder.pad": (8, d)}

    def linear(name, shape):
        out[name + ".weight"] = shape if shape else (d,)
        out[name + ".bias"] = (shape[0],) if shape else (d,)

    for prefix, n in (("v_encoder.f_encoder.encoder", 6), ("v_encoder.c_encoder.encoder", 3)):
        for i in range(n):
            for name, shape in layer.items():
                linear(f"{prefix}.layer.{i}.{name}", shape)
    f = "v_encoder.f_encoder."
    out.update({f + "embeddings.word_embeddings.weight": (v, d),
                f + "embeddings.position_embeddings.weight": (514, d),
                f + "embeddings.token_type_embeddings.weight": (types, d),
                f + "img_embeddings.img_linear.weight": (d, dv),
                f + "img_embeddings.img_linear.bias": (d,),
                f + "img_embeddings.img_LayerNorm.weight": (dv,),
                f + "img_embeddings.img_LayerNorm.bias": (dv,),
                f + "img_embeddings.position_embeddings.weight": (frm, d),
                f + "img_embeddings.mask_embedding.weight": (2, dv),
                f + "lm_head.bias": (v,), f + "lm_head.decoder.weight": (v, d),
                "v_encoder.frame_transform.LayerNorm.weight": (dv,),
                "v_encoder.frame_transform.LayerNorm.bias": (dv,),
                "v_encoder.frame_transform.net.1.weight": (d, dv),
                "v_encoder.frame_transform.net.1.bias": (d,),
                "v_encoder.c_encoder.embeddings.position_embeddings.weight": (514, d),
                "v_encoder.feat_regress.net.3.weight": (dv, d),
                "v_encoder.feat_regress.net.3.bias": (dv,),
                "v_encoder.mask_embedding.weight": (2, dv),
                "v_encoder.fom_output.linear_1.weight": (2 * d, d),
                "v_encoder.fom_output.linear_1.bias": (2 * d,),
                "v_encoder.fom_output.LayerNorm.weight": (2 * d,),
                "v_encoder.fom_output.LayerNorm.bias": (2 * d,),
                "v_encoder.fom_output.linear_2.weight": (100, 2 * d),
                "v_encoder.fom_output.linear_2.bias": (100,)})
    for name in (f + "embeddings.LayerNorm", f + "img_embeddings.LayerNorm",
                 f + "lm_head.LayerNorm", "v_encoder.c_encoder.embeddings.LayerNorm",
                 "v_encoder.feat_regress.net.2"):
        linear(name, None)
    for name in (f + "pooler.dense", f + "lm_head.dense", "v_encoder.c_encoder.pooler.dense",
                 "v_encoder.feat_regress.net.0"):
        linear(name, (d, d))
    return out


@pytest.fixture(scope="module")
def meta_finetune():
    with torch.device("meta"):
        return HeroModel(load_config("hero_finetune"))


def test_state_dict_keys_and_shapes_match_spec(meta_finetune):
    got = {k: tuple(v.shape) for k, v in meta_finetune.state_dict().items()}
    assert got == expected_trunk_shapes()
    assert len(got) == 189  # 211 pretraining entries minus the 22 VCMR head entries
    groups = list(dict.fromkeys(".".join(k.split(".")[:3]) for k in got))
    assert groups == [  # upstream's module order, which is also its checkpoint key order
        "v_encoder.pad", "v_encoder.f_encoder.pad", "v_encoder.f_encoder.encoder",
        "v_encoder.f_encoder.embeddings", "v_encoder.f_encoder.img_embeddings",
        "v_encoder.f_encoder.pooler", "v_encoder.f_encoder.lm_head",
        "v_encoder.frame_transform.LayerNorm", "v_encoder.frame_transform.net",
        "v_encoder.c_encoder.embeddings", "v_encoder.c_encoder.encoder",
        "v_encoder.c_encoder.pooler", "v_encoder.feat_regress.net",
        "v_encoder.mask_embedding.weight", "v_encoder.fom_output.linear_1",
        "v_encoder.fom_output.LayerNorm", "v_encoder.fom_output.linear_2"]
    f_enc = meta_finetune.v_encoder.f_encoder
    assert f_enc.lm_head.decoder.weight is f_enc.embeddings.word_embeddings.weight
    assert f_enc.lm_head.decoder.bias is None


def test_parameter_counts_match_spec(meta_finetune):
    def count(module):
        return sum(p.numel() for p in module.parameters())
    v = meta_finetune.v_encoder
    assert count(v) == 117_093_572
    assert count(v.f_encoder) == 86_205_792
    assert count(v.f_encoder.img_embeddings) == 3_438_848
    assert count(v.f_encoder.lm_head) - v.f_encoder.lm_head.decoder.weight.numel() == 642_400
    assert count(v.c_encoder) == 22_250_496
    assert count(v.frame_transform) == 3_351_808
    assert count(v.feat_regress) == 3_938_816
    assert count(v.fom_output) == 1_337_956


def test_pretrain_config_sizes_and_constants():
    with torch.device("meta"):
        model = HeroModel(load_config("hero_pretrain"))
    f_enc = model.v_encoder.f_encoder
    assert f_enc.embeddings.word_embeddings.weight.shape == (50265, 768)
    assert f_enc.embeddings.token_type_embeddings.weight.shape == (1, 768)
    assert f_enc.embeddings.word_embeddings.padding_idx == 1
    assert f_enc.img_embeddings.mask_embedding.padding_idx == 0
    assert model.v_encoder.mask_embedding.padding_idx == 0
    eps = {n: m.eps for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    for name, value in eps.items():
        inside_layer = ".encoder.layer." in name
        assert value == (1e-12 if inside_layer else 1e-5), name
    assert sum(".encoder.layer." in n for n in eps) == (6 + 3) * 2


def test_tvc_config_values():
    cfg = load_config("hero_tvc")
    assert cfg["d_config"]["num_hidden_layers"] == 2
    assert cfg["d_config"]["max_position_embeddings"] == 1024
    assert cfg["f_config"]["vocab_size"] == 50272 and "q_config" not in cfg
    demo = load_config("hero_demo_tvc")
    assert demo["f_config"]["hidden_size"] == demo["d_config"]["hidden_size"]


def test_init_follows_upstream_rule():
    model = small_model(hidden=64)
    v = model.v_encoder
    w = v.fom_output.linear_1.weight
    assert abs(w.std().item() - 0.02) < 0.003
    assert torch.all(v.fom_output.linear_1.bias == 0)
    assert torch.all(v.f_encoder.lm_head.dense.bias == 0)
    assert torch.all(v.f_encoder.lm_head.bias == 0)
    assert torch.all(v.feat_regress.net[2].weight == 1)
    assert v.f_encoder.embeddings.word_embeddings.weight[1].abs().sum() > 0  # pad row drawn too
    assert v.f_encoder.img_embeddings.mask_embedding.weight[0].abs().sum() > 0
    assert v.mask_embedding.weight[0].abs().sum() > 0


def reference_repr(model, batch):
    """Independent per-segment, unpadded computation of model.md §6–§7.1 (eval mode)."""
    v = model.v_encoder
    f = v.f_encoder
    type1 = f.embeddings.token_type_embeddings.weight[1]
    d = type1.numel()

    def ln(x, mod):
        return F.layer_norm(x, (x.size(-1),), mod.weight, mod.bias, eps=1e-5)

    outs, row = [], 0
    for clip, pairs in zip(batch["_clip_feats"], batch["sub_idx2frame_idx"]):
        collected = torch.zeros(clip.size(0), d)
        for _, frames in pairs:
            text = torch.tensor(batch["_seg_text"][row])
            row += 1
            emb = f.embeddings
            txt = ln(emb.word_embeddings.weight[text]
                     + emb.position_embeddings.weight[:len(text)] + type1, emb.LayerNorm)
            img_mod = f.img_embeddings
            feats = clip[frames] if frames else torch.zeros(1, clip.size(1))
            img = F.linear(ln(feats, img_mod.img_LayerNorm), img_mod.img_linear.weight,
                           img_mod.img_linear.bias)
            img = ln(img + img_mod.position_embeddings.weight[:len(feats)] + type1,
                     img_mod.LayerNorm)
            mask = torch.ones(1, len(feats) + len(text), dtype=torch.long)
            mask[0, 0] = int(bool(frames))
            out = f.encoder(torch.cat([img, txt])[None], mask)[0]
            for j, fr in enumerate(frames):
                collected[fr] += out[j]
        ft = v.frame_transform
        fused = F.relu(F.linear(ln(clip, ft.LayerNorm), ft.net[1].weight, ft.net[1].bias))
        fused = fused + collected
        c = v.c_encoder
        x = ln(fused + c.embeddings.position_embeddings.weight[:len(clip)],
               c.embeddings.LayerNorm)
        outs.append(c.encoder(x[None], torch.ones(1, len(clip), dtype=torch.long))[0])
    return outs


@torch.no_grad()
@pytest.mark.parametrize("videos", [PADDED_VIDEOS, UNPADDED_VIDEOS])
def test_repr_matches_independent_reference(videos):
    model = set_attn_impl(small_model(), "math")
    batch = make_video_batch(videos, vfeat_dim=DV, vocab_size=VOCAB)
    out = model.v_encoder(batch, "repr")
    assert out.shape == (2, max(n for n, _ in videos), 32)
    for b, ref in enumerate(reference_repr(model, batch)):
        torch.testing.assert_close(out[b, :len(ref)], ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_padded_outputs_are_kept_and_masked_inputs_ignored():
    model = small_model()
    batch = make_video_batch(vfeat_dim=DV, vocab_size=VOCAB)
    out = model.v_encoder(batch, "repr")
    assert out[1, 4:].abs().min() > 0  # video 1 has 4 of 6 frames: padded rows non-zero
    noisy = dict(batch)
    noisy["f_v_feats"] = batch["f_v_feats"].clone()
    noisy["f_v_feats"][3, 0] = 5.0  # the masked dummy frame of the frame-less segment
    noisy["f_sub_input_ids"] = batch["f_sub_input_ids"].masked_fill(
        batch["f_sub_input_attn_masks"] == 0, 7)  # change text padding tokens
    torch.testing.assert_close(model.v_encoder(noisy, "repr"), out, rtol=0, atol=1e-6)


@torch.no_grad()
def test_encode_clip_false_returns_fused_frames():
    model = small_model()
    batch = make_video_batch(vfeat_dim=DV, vocab_size=VOCAB)
    fused = model.v_encoder.forward_repr(batch, encode_clip=False)
    unmatched = model.v_encoder.frame_transform(batch["c_v_feats"][0, 5])
    torch.testing.assert_close(fused[0, 5], unmatched)  # frame 5 belongs to no subtitle
    assert torch.all(unmatched >= 0)
    torch.testing.assert_close(model.v_encoder.c_encoder(fused, batch["c_attn_masks"]),
                               model.v_encoder.forward_repr(batch))


@torch.no_grad()
@pytest.mark.parametrize("videos", [PADDED_VIDEOS, UNPADDED_VIDEOS])
@pytest.mark.parametrize("task", ["repr", "mlm", "mffr", "mfm-nce", "fom"])
def test_sdpa_matches_math_path(task, videos):
    model = small_model()
    batch = task_batch(task, videos)
    compute_loss = task != "repr"
    fast = model(batch, task, compute_loss)
    slow = set_attn_impl(model, "math")(batch, task, compute_loss)
    assert torch.isfinite(fast).all()
    assert ((fast - slow).norm() / slow.norm()).item() < 1e-5


def test_nce_loss_by_hand():
    preds = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    negatives = torch.tensor([[1.0, 1.0]])
    loss, logits = mfm_nce_loss(preds, targets, negatives)
    torch.testing.assert_close(logits, torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 1.0]]))
    e = math.e
    expected = [-math.log(e / (e + 1 + e)), -math.log(e ** 2 / (1 + e ** 2 + e))]
    torch.testing.assert_close(loss, torch.tensor(expected))
    half, _ = mfm_nce_loss(preds, targets, negatives, nce_temp=0.5)
    assert half[0].item() == pytest.approx(math.log(2 + math.exp(-2)), rel=1e-6)


@torch.no_grad()
def test_mfm_nce_negatives_include_padding_and_use_mask_rows():
    """Upstream's pair: (predictions at masked frames, predictions at every other position)."""
    model = small_model()
    batch = task_batch("mfm-nce", PADDED_VIDEOS)
    seen = []
    hook = model.v_encoder.c_encoder.register_forward_hook(lambda m, i, o: seen.append(o))
    out = model(batch, "mfm-nce", compute_loss=False)
    hook.remove()
    assert isinstance(out, tuple) and len(out) == 2
    preds, negs = out
    n_masked = 3
    assert preds.shape == (n_masked, DV)
    assert negs.shape == (2 * 6 - n_masked, DV)  # padded positions of video 1 count
    masks, regress = batch["c_v_masks"], model.v_encoder.feat_regress
    torch.testing.assert_close(preds, regress(seen[0][masks]))  # rows (0, 1), (0, 5), (1, 3)
    torch.testing.assert_close(negs, regress(seen[0][~masks]))
    assert negs[-2:].abs().sum() > 0  # video 1's padded frames 4, 5 are predicted too
    logits = torch.cat([preds @ batch["feat_targets"].t(), preds @ negs.t()], dim=1)
    loss = model(batch, "mfm-nce")
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.arange(n_masked),
                                                     reduction="none"))
    mse = model(batch, "mffr")
    torch.testing.assert_close(mse, (preds - batch["feat_targets"]) ** 2)
    model.v_encoder.mask_embedding.weight[0] += torch.linspace(0, 1, DV)  # row 0 is read
    assert not torch.allclose(model(batch, "mffr"), mse)


def test_shuffle_frames_by_hand():
    x = torch.arange(8.0).view(1, 4, 2)
    out = shuffle_frames(x, torch.tensor([[2, 1, 0, 3]]))
    assert out.tolist() == [[[4.0, 5.0], [2.0, 3.0], [0.0, 1.0], [6.0, 7.0]]]


@torch.no_grad()
def test_fom_loss_by_hand():
    model = small_model()
    batch = task_batch("fom", PADDED_VIDEOS)
    v = model.v_encoder
    fused = v.forward_repr(batch, encode_clip=False)
    shuffled = fused.clone()
    for b, mapping in FOM_MOVES.items():
        for orig, new in mapping.items():
            shuffled[b, new] = fused[b, orig]
    logits = v.fom_output(v.c_encoder(shuffled, batch["c_attn_masks"])).view(-1, 100)
    targets = batch["targets"].view(-1)
    keep = targets != -1
    expected = -F.log_softmax(logits[keep], -1).gather(1, targets[keep, None]).mean()
    torch.testing.assert_close(model(batch, "fom"), expected)
    torch.testing.assert_close(model(batch, "fom", compute_loss=False), logits)


@torch.no_grad()
def test_mlm_logits_use_tied_head_and_full_vocab():
    model = small_model()
    batch = task_batch("mlm", PADDED_VIDEOS)
    logits = model(batch, "mlm", compute_loss=False)
    assert logits.shape == (len(batch["txt_labels"]), VOCAB)  # no vocab_pad slicing
    f = model.v_encoder.f_encoder
    emb = f.embed(batch["input_ids"], batch["position_ids"], batch["v_feat"], None,
                  batch["gather_index"])
    hidden = f.encoder(emb, batch["attn_masks"])[batch["txt_mask_tgt"]]
    head = f.lm_head
    z = head.dense(hidden)
    z = z * 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    z = F.layer_norm(z, (z.size(-1),), head.LayerNorm.weight, head.LayerNorm.bias, 1e-5)
    expected = z @ f.embeddings.word_embeddings.weight.t() + head.bias
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(model(batch, "mlm"),
                               F.cross_entropy(expected, batch["txt_labels"], reduction="none"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_gives_finite_fp32_losses(dtype):
    model = small_model()
    with torch.autocast("cpu", dtype=dtype):
        for task in ("repr", "mlm", "mfm-nce", "fom"):
            out = model(task_batch(task, PADDED_VIDEOS), task)
            assert torch.isfinite(out.float()).all(), task
            if task != "repr":
                assert out.dtype == torch.float32, task


def trunk_grads(model):
    model.train()
    loss = sum(model(task_batch(t, PADDED_VIDEOS), t).mean()
               for t in ("mlm", "mffr", "mfm-nce", "fom"))
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_gradient_reaches_every_trained_parameter():
    grads = trunk_grads(small_model())
    untrained = [n for n, g in grads.items() if g is None or g.abs().sum() == 0]
    assert untrained == ["v_encoder.f_encoder.pooler.dense.weight",
                         "v_encoder.f_encoder.pooler.dense.bias",
                         "v_encoder.c_encoder.pooler.dense.weight",
                         "v_encoder.c_encoder.pooler.dense.bias"]
    for table in ("v_encoder.mask_embedding", "v_encoder.f_encoder.img_embeddings.mask_embedding"):
        grad = grads[table + ".weight"]
        assert grad[0].abs().sum() == 0 and grad[1].abs().sum() > 0  # padding_idx 0 is frozen


def test_gradient_checkpointing_gives_same_gradients():
    def run(flag):
        torch.manual_seed(0)
        cfg = small_config()
        for sub in ("f_config", "c_config"):
            cfg[sub].update(gradient_checkpointing=flag, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        return trunk_grads(HeroModel(cfg, vfeat_dim=DV))
    plain, ckpt = run(False), run(True)
    for name, grad in plain.items():
        if grad is not None:
            torch.testing.assert_close(ckpt[name], grad, msg=name)


def test_errors_name_the_problem():
    model = small_model()
    batch = make_video_batch(vfeat_dim=DV, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="unknown task 'vsm'"):
        model(batch, "vsm")
    bad = dict(batch, sub_idx2frame_idx=[[(0, [0]), (1, [1, 2]), (2, [3, 9]), (3, [])],
                                         batch["sub_idx2frame_idx"][1]])
    with pytest.raises(IndexError, match=r"sub_idx2frame_idx\[0\].*id2nframe"):
        model(bad, "repr")
    with torch.device("meta"):
        pre = HeroModel(load_config("hero_pretrain"))
    with pytest.raises(ValueError, match="load_roberta"):
        pre.v_encoder.f_encoder.forward_txt(torch.zeros(1, 2, dtype=torch.long, device="meta"),
                                            None, torch.ones(1, 2, device="meta"))


@torch.no_grad()
def test_torch_compile_graph_capture_matches_eager():
    """Dynamo + AOTAutograd capture of the whole trunk (no C++ toolchain needed)."""
    model = small_model()
    batch = make_video_batch(vfeat_dim=DV, vocab_size=VOCAB)
    compiled = torch.compile(model.v_encoder.forward_repr, backend="aot_eager")
    torch.testing.assert_close(compiled(batch), model.v_encoder(batch, "repr"))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("HERO_SLOW_TESTS"),
                    reason="inductor compile takes ~1 min on CPU; set HERO_SLOW_TESTS=1")
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile (inductor) on CPU needs a C++ compiler")
@torch.no_grad()
def test_torch_compile_inductor_matches_eager():
    model = small_model()
    batch = make_video_batch(vfeat_dim=DV, vocab_size=VOCAB)
    compiled = torch.compile(model.v_encoder.forward_repr)
    torch.testing.assert_close(compiled(batch), model.v_encoder(batch, "repr"),
                               rtol=1e-4, atol=1e-4)
