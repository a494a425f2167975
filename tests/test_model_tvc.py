"""TVC: decoder (causal mask, KV cache, layer maths), label smoothing, HeroForTvc end to end."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers_model import PADDED_VIDEOS, load_config, make_video_batch, small_config

from model.config import BertConfig
from model.decoder import TransformerDecoder, causal_mask
from model.layers import set_attn_impl
from model.model import load_weights
from model.pretrain import HeroForPretraining
from model.tvc import BOS_ID, EOS_ID, HeroForTvc, LabelSmoothingLoss, cut_before_eos

torch.set_num_threads(1)
DEC_CFG = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2)


def _decoder(seed=0):
    torch.manual_seed(seed)
    return TransformerDecoder(BertConfig(**DEC_CFG)).eval()


def _memory(seed=1):
    gen = torch.Generator().manual_seed(seed)
    enc = torch.randn(3, 5, 32, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    x = torch.randn(3, 7, 32, generator=gen)
    return x, enc, mask


# ---------------------------------------------------------------- decoder


def test_tri_mask_values_and_persistence():
    dec = _decoder()
    tri = dec.tri_mask
    assert tri.shape == (1024, 1024)
    assert "tri_mask" in dec.state_dict()
    rows, cols = torch.meshgrid(torch.arange(1024), torch.arange(1024), indexing="ij")
    assert torch.all(tri[cols <= rows] == 0)
    assert torch.all(tri[cols > rows] == -10000.0)
    assert math.copysign(1.0, tri[0, 0].item()) == -1.0  # −0.0 as upstream (model.md §3.4)
    assert torch.equal(causal_mask(3), torch.tensor([[0., -1e4, -1e4], [0., 0., -1e4],
                                                     [0., 0., 0.]]))


def test_decoder_state_dict_keys():
    keys = set(_decoder().state_dict())
    per_layer = {f"{m}.{p}" for m in ("self_attention.query", "self_attention.key",
                                      "self_attention.value", "dec_enc_attention.query",
                                      "dec_enc_attention.key", "dec_enc_attention.value",
                                      "add_norm_1.dense", "add_norm_1.LayerNorm",
                                      "add_norm_2.dense", "add_norm_2.LayerNorm",
                                      "intermidiate.dense", "add_norm_3.dense",
                                      "add_norm_3.LayerNorm") for p in ("weight", "bias")}
    expected = {f"layer.{i}.{k}" for i in range(2) for k in per_layer} | {"tri_mask"}
    assert keys == expected
    assert _decoder().layer[0].add_norm_1.LayerNorm.eps == 1e-12


def _ref_attention(mod, q_in, kv_in, mask, heads=4):
    n, lq, d = q_in.shape
    split = lambda t: t.view(n, -1, heads, d // heads).transpose(1, 2)
    q, k, v = split(mod.query(q_in)), split(mod.key(kv_in)), split(mod.value(kv_in))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads) + mask, dim=-1)
    return (probs @ v).transpose(1, 2).reshape(n, lq, d)


def _ref_add_norm(mod, h, residual):
    ln = mod.LayerNorm
    return F.layer_norm(mod.dense(h) + residual, (residual.size(-1),), ln.weight, ln.bias, 1e-12)


def _ref_layer(layer, x, enc, enc_mask):
    t = x.size(1)
    tri = torch.triu(torch.full((t, t), -10000.0), diagonal=1)
    x1 = _ref_add_norm(layer.add_norm_1, _ref_attention(layer.self_attention, x, x, tri), x)
    ext = (1.0 - enc_mask[:, None, None, :].float()) * -10000.0
    x2 = _ref_add_norm(layer.add_norm_2, _ref_attention(layer.dec_enc_attention, x1, enc, ext),
                       x1)
    h = layer.intermidiate.dense(x2)
    return _ref_add_norm(layer.add_norm_3, h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0))), x2)


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_decoder_matches_hand_written_layers(impl):
    dec = set_attn_impl(_decoder(), impl)
    x, enc, mask = _memory()
    expected = x
    for layer in dec.layer:
        expected = _ref_layer(layer, expected, enc, mask)
    with torch.no_grad():
        got = dec(x, enc, mask)
        assert torch.allclose(got, expected.detach(), atol=1e-5, rtol=1e-5)
        # causality: changing a later input leaves earlier outputs unchanged
        x2 = x.clone()
        x2[:, 4:] += 1.0
        assert torch.allclose(dec(x2, enc, mask)[:, :4], got[:, :4], atol=1e-6)
        assert not torch.allclose(dec(x2, enc, mask)[:, 4:], got[:, 4:], atol=1e-3)


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_kv_cache_matches_full_pass(impl):
    dec = set_attn_impl(_decoder(), impl)
    x, enc, mask = _memory()
    with torch.no_grad():
        full = dec(x, enc, mask)
        cache = dec.init_cache()
        chunks = [dec(x[:, :3], enc, mask, cache)]  # a 3-token prefix, then one at a time
        for t in range(3, x.size(1)):
            chunks.append(dec(x[:, t:t + 1], enc, mask, cache))
    assert dec.cache_len(cache) == x.size(1)
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


def test_decoder_rejects_positions_beyond_tri_mask():
    dec = _decoder()
    x, enc, mask = _memory()
    cache = dec.init_cache()
    cache[0]["self_k"] = torch.zeros(3, 4, 1020, 8)
    with pytest.raises(ValueError, match="tri_mask"):
        dec(x, enc, mask, cache)


# ---------------------------------------------------------------- label smoothing


def test_label_smoothing_small_vocab_by_hand():
    loss_fn = LabelSmoothingLoss(0.1, 3)
    assert torch.allclose(loss_fn.one_hot, torch.full((1, 3), 0.05))
    logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, -1.0], [5.0, 5.0, 5.0]])
    target = torch.tensor([0, 2, -1])
    got = loss_fn(logits, target)
    assert got.shape == (2,)  # the −1 row is dropped
    # row 0: q = (.9, .05, .05), p uniform
    row0 = 0.9 * math.log(0.9) + 2 * 0.05 * math.log(0.05) + math.log(3)
    # row 1: q = (.05, .05, .9), log p = logits − logsumexp
    lse = math.log(math.exp(2.0) + 1.0 + math.exp(-1.0))
    logp = [2.0 - lse, 0.0 - lse, -1.0 - lse]
    q = [0.05, 0.05, 0.9]
    row1 = sum(qi * (math.log(qi) - lp) for qi, lp in zip(q, logp))
    assert torch.allclose(got, torch.tensor([row0, row1]), atol=1e-6)


def test_label_smoothing_two_class_limit_and_plain_ce():
    # two classes, lsr=0.5: q is uniform, so loss = KL(uniform ‖ p)
    loss_fn = LabelSmoothingLoss(0.5, 2)
    logits = torch.tensor([[1.0, -1.0]])
    p1 = 1 / (1 + math.exp(-2.0))
    expected = 0.5 * math.log(0.5 / p1) + 0.5 * math.log(0.5 / (1 - p1))
    assert torch.allclose(loss_fn(logits, torch.tensor([1])), torch.tensor([expected]))
    ce = LabelSmoothingLoss(0.0, 3)
    assert "one_hot" not in ce.state_dict()
    logits = torch.tensor([[0.3, -0.2, 1.0], [0.0, 0.0, 0.0]])
    got = ce(logits, torch.tensor([-1, 1]))
    assert torch.allclose(got, torch.tensor([math.log(3)]))


def test_one_hot_buffer_full_vocab():
    loss_fn = LabelSmoothingLoss(0.1, 50272)
    assert loss_fn.one_hot.shape == (1, 50272)
    assert torch.all(loss_fn.one_hot == torch.tensor(0.1 / 50271))
    assert abs(loss_fn.one_hot[0, 0].item() - 1.98922e-06) < 1e-11
    assert "one_hot" in loss_fn.state_dict()


def test_cut_before_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [2, 3, 3, 3, 3], [4, 4, 4, 4, 4]])
    assert cut_before_eos(ids) == [[5, 6], [], [4, 4, 4, 4, 4]]


# ---------------------------------------------------------------- HeroForTvc

VFEAT = 24
VOCAB = 64
CLIP_RANGES = (((0, 3), (2, 6)), ((1, 2),))  # video 0 (6 frames), video 1 (4 frames)
CAPTIONS = ([5, 9, 13, 7], [21, 4], [30, 31, 32, 33, 34, 35])


def _tvc_config():
    return small_config(hidden=32, heads=4, f_layers=1, c_layers=1, vocab=VOCAB, with_q=False,
                        d_layers=2)


def _tvc_model(seed=0, lsr=0.1):
    torch.manual_seed(seed)
    return HeroForTvc(_tvc_config(), vfeat_dim=VFEAT, lsr=lsr).eval()


def _tvc_batch(seed=0):
    batch = make_video_batch(PADDED_VIDEOS, vfeat_dim=VFEAT, vocab_size=VOCAB, seed=seed)
    seg_lens = [ed - st for clips in CLIP_RANGES for st, ed in clips]
    width = max(len(c) for c in CAPTIONS) + 1
    inputs = torch.full((len(CAPTIONS), width), 1)
    targets = torch.full((len(CAPTIONS), width), -1)
    for i, cap in enumerate(CAPTIONS):
        inputs[i, :len(cap) + 1] = torch.tensor([BOS_ID] + cap)
        targets[i, :len(cap) + 1] = torch.tensor(cap + [EOS_ID])
    cap_mask = torch.zeros(len(CAPTIONS), max(seg_lens), dtype=torch.long)
    for i, n in enumerate(seg_lens):
        cap_mask[i, :n] = 1
    batch.update(cap_input_ids=inputs, cap_pos_ids=torch.arange(width).unsqueeze(0),
                 cap_tgt_ids=targets, cap_attn_mask=cap_mask, clip_ranges=CLIP_RANGES)
    return batch


def test_tvc_state_dict_layout_and_counts_at_finetune_size():
    with torch.device("meta"):
        model = HeroForTvc(load_config("hero_tvc"))
    sd = model.state_dict()
    assert len(sd) == 246
    assert sum(p.numel() for p in model.parameters()) == 136_785_092
    heads = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("v_encoder.")}
    assert heads["position_embeddings.weight"] == (1024, 768)
    assert heads["emb_LayerNorm.weight"] == heads["emb_LayerNorm.bias"] == (768,)
    assert heads["decoder.tri_mask"] == (1024, 1024)
    assert heads["loss_func.one_hot"] == (1, 50272)
    assert heads["decoder.layer.1.intermidiate.dense.weight"] == (3072, 768)
    assert heads["decoder.layer.1.add_norm_3.dense.weight"] == (768, 3072)
    assert heads["decoder.layer.0.dec_enc_attention.value.bias"] == (768,)
    assert len(heads) == 1 + 2 + 1 + 1 + 2 * 26
    assert all(k.startswith(HeroForTvc.expected_missing_keys) for k in heads)
    assert model.emb_LayerNorm.eps == 1e-5
    with torch.device("meta"):
        no_ls = HeroForTvc(load_config("hero_tvc"), lsr=0.0)
    assert len(no_ls.state_dict()) == 245


def test_tvc_requires_decoder_config():
    with pytest.raises(KeyError, match="d_config"):
        HeroForTvc(small_config(hidden=32, heads=4, f_layers=1, c_layers=1, vocab=VOCAB),
                   vfeat_dim=VFEAT)


def test_tvc_buffers_in_full_model():
    model = _tvc_model()
    assert torch.equal(model.decoder.tri_mask, causal_mask())
    assert torch.all(model.loss_func.one_hot == torch.tensor(0.1 / (VOCAB - 1)))


def test_tvc_encoder_memory_is_clip_slice():
    model, batch = _tvc_model(), _tvc_batch()
    with torch.no_grad():
        frames = model.v_encoder(batch, "repr")
        memory, mask = model.encode(batch)
    assert memory.shape == (3, 4, 32) and torch.equal(mask, batch["cap_attn_mask"])
    assert torch.equal(memory[0, :3], frames[0, 0:3]) and torch.all(memory[0, 3:] == 0)
    assert torch.equal(memory[1], frames[0, 2:6])
    assert torch.equal(memory[2, :1], frames[1, 1:2]) and torch.all(memory[2, 1:] == 0)


def test_tvc_loss_equals_label_smoothed_kl_by_hand():
    model, batch = _tvc_model(), _tvc_batch()
    with torch.no_grad():
        losses = model(batch, compute_loss=True)
        logits = model(batch, "tvc", compute_loss=False)
        assert torch.equal(model(batch, False), logits)  # positional bool = compute_loss
    assert logits.shape == (3, 7, VOCAB)
    expected = []
    for i, cap in enumerate(CAPTIONS):
        for t, gold in enumerate(cap + [EOS_ID]):
            logp = torch.log_softmax(logits[i, t].double(), dim=-1)
            q = torch.full((VOCAB,), 0.1 / (VOCAB - 1), dtype=torch.double)
            q[gold] = 0.9
            expected.append((q * (q.log() - logp)).sum())
    assert losses.shape == (sum(len(c) + 1 for c in CAPTIONS),)
    assert torch.allclose(losses.double(), torch.stack(expected), atol=1e-5)


def test_tvc_decoder_embedding_has_no_dropout_and_no_type():
    model, batch = _tvc_model(), _tvc_batch()
    model.train()
    ids, pos = batch["cap_input_ids"], batch["cap_pos_ids"]
    words = model.v_encoder.f_encoder.embeddings.word_embeddings.weight[ids]
    expected = F.layer_norm(words + model.position_embeddings.weight[:ids.size(1)], (32,),
                            model.emb_LayerNorm.weight, model.emb_LayerNorm.bias, 1e-5)
    assert torch.allclose(model.embed_caption(ids, pos), expected, atol=1e-6)


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_tvc_sdpa_matches_math_path():
    model, batch = _tvc_model(), _tvc_batch()
    with torch.no_grad():
        fast = (model(batch, compute_loss=False), model(batch))
        set_attn_impl(model, "math")
        assert model.decoder.layer[1].dec_enc_attention.attn_impl == "math"
        assert all(m.attn_impl == "math" for m in model.modules() if hasattr(m, "attn_impl"))
        ref = (model(batch, compute_loss=False), model(batch))
    for a, b in zip(fast, ref):
        assert _rel_err(a, b) < 1e-5


@pytest.mark.parametrize("impl,eos_bias", [("sdpa", 0.0), ("math", 0.0), ("sdpa", 0.3),
                                           ("math", 0.3)])
def test_cached_greedy_equals_full_recompute(impl, eos_bias):
    model, batch = set_attn_impl(_tvc_model(seed=3), impl), _tvc_batch(seed=3)
    with torch.no_grad():  # a small EOS bias makes some captions stop early
        model.v_encoder.f_encoder.lm_head.bias[EOS_ID] += eos_bias
    cached = model.greedy_ids(batch, use_cache=True)
    full = model.greedy_ids(batch, use_cache=False)
    assert cached.shape == (3, 30)
    assert torch.equal(cached, full)
    assert len(set(full.flatten().tolist())) > 5  # not a degenerate constant output
    captions = model.decode(batch)
    assert captions == model.decode_full_recompute(batch) == cut_before_eos(full)
    if eos_bias:
        assert all(0 < len(c) < 30 for c in captions)
    else:
        assert all(len(c) == 30 for c in captions)
    assert model.decode(batch, max_step=0) == [[], [], []]


def test_tvc_gradients_reach_every_head_parameter():
    model, batch = _tvc_model(), _tvc_batch()
    model(batch).mean().backward()
    heads = [(n, p) for n, p in model.named_parameters() if not n.startswith("v_encoder.")]
    assert len(heads) == 3 + 2 * 26
    for name, param in heads:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model.v_encoder.f_encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    c_layer = model.v_encoder.c_encoder.encoder.layer[0]  # the clip memory is differentiable
    assert c_layer.output.dense.weight.grad.abs().sum() > 0


def test_tvc_loads_pretraining_checkpoint_with_expected_missing_keys():
    torch.manual_seed(7)
    cfg = _tvc_config()
    pre = HeroForPretraining({k: v for k, v in cfg.items() if k != "d_config"} |
                             {"q_config": small_config(hidden=32, heads=4, vocab=VOCAB)[
                                 "q_config"]}, vfeat_dim=VFEAT)
    sd = dict(pre.state_dict())
    sd["vocab_padded"] = True
    model = _tvc_model(seed=1)
    missing, unexpected = load_weights(model, sd, HeroForTvc.expected_missing_keys)
    head_keys = {k for k in model.state_dict() if not k.startswith("v_encoder.")}
    assert set(missing) == head_keys
    assert "vocab_padded" in unexpected and any(k.startswith("q_feat_attn.") for k in unexpected)
    loaded = HeroForTvc.from_pretrained(cfg, sd, vfeat_dim=VFEAT)
    for key, value in pre.state_dict().items():
        if key.startswith("v_encoder."):
            assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(loaded.decoder.tri_mask, causal_mask())
    del sd["v_encoder.c_encoder.encoder.layer.0.output.dense.bias"]
    with pytest.raises(KeyError, match="output.dense.bias"):
        HeroForTvc.from_pretrained(cfg, sd, vfeat_dim=VFEAT)
    roundtrip = HeroForTvc.from_pretrained(cfg, loaded.state_dict(), vfeat_dim=VFEAT)
    batch = _tvc_batch()
    with torch.no_grad():
        assert torch.equal(roundtrip.eval()(batch), loaded.eval()(batch))
