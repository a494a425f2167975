"""TVQA/How2QA (HeroForVideoQA) and VIOLIN (HeroForViolin): layouts, head maths, losses, loading."""
from __future__ import annotations

import math

import pytest
import torch
from helpers_model import load_config, make_video_batch, small_config

from model.layers import set_attn_impl
from model.model import load_weights
from model.pretrain import HeroForPretraining
from model.videoQA import HeroForVideoQA
from model.violin import FRAME_POS_KEY, HeroForViolin, pad_frame_pos_table

torch.set_num_threads(1)
VFEAT = 24
VOCAB = 64
# question 0: 6-frame video (a frame-less subtitle -> dummy frame); question 1: 4-frame video
Q_VIDEOS = ([(6, [(0, [0, 1], 3), (1, [2, 3, 4], 4), (2, [], 3)])] * 5
            + [(4, [(0, [0, 1], 3), (1, [2, 3], 2)])] * 5)
QA_LENS = (5, 7, 4, 6, 5, 3, 8, 4, 4, 6)


def _config():
    return small_config(hidden=32, heads=4, f_layers=1, c_layers=2, vocab=VOCAB)


def _text(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), 1)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(4, VOCAB, (n,), generator=gen)
        ids[i, 0] = 2
        mask[i, :n] = 1
    return ids, torch.arange(max(lengths)).unsqueeze(0), mask


def _qa_batch(seed=0):
    batch = make_video_batch(list(Q_VIDEOS), vfeat_dim=VFEAT, vocab_size=VOCAB, seed=seed)
    ids, pos, mask = _text(QA_LENS, seed)
    batch.update(qa_input_ids=ids, qa_pos_ids=pos, qa_attn_masks=mask,
                 targets=torch.tensor([[3], [1]]), ts_targets=torch.tensor([[1, 4], [-1, -1]]))
    return batch


def _violin_batch(seed=0):
    videos = [Q_VIDEOS[0], Q_VIDEOS[5], Q_VIDEOS[0]]
    batch = make_video_batch(videos, vfeat_dim=VFEAT, vocab_size=VOCAB, seed=seed)
    ids, pos, mask = _text((4, 6, 3), seed)
    batch.update(q_input_ids=ids, q_pos_ids=pos, q_attn_masks=mask,
                 targets=torch.tensor([[1], [0], [1]]))
    return batch


def _model(cls, seed=0):
    torch.manual_seed(seed)
    return cls(_config(), vfeat_dim=VFEAT).eval()


def _capture_t_trm(model):
    """Record the input and output of the T-TRM encoder stack on every call."""
    seen = {}

    def hook(_mod, args, out):
        seen.update(inp=args[0].detach(), mask=args[1], out=out.detach())
    model.v_encoder.c_encoder.encoder.register_forward_hook(hook)
    return seen


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# ---------------------------------------------------------------- layouts and counts


@pytest.mark.parametrize("cls,entries,params,heads", [
    (HeroForVideoQA, 203, 119_468_231, {
        "qa_pool.weight": (1, 768), "qa_pred_head.linear_1.weight": (1536, 768),
        "qa_pred_head.linear_1.bias": (1536,), "qa_pred_head.LayerNorm.weight": (1536,),
        "qa_pred_head.LayerNorm.bias": (1536,), "qa_pred_head.linear_2.weight": (1, 1536),
        "qa_pred_head.linear_2.bias": (1,), "st_ed_pool.weight": (1, 768),
        "st_ed_pred_head.linear_1.weight": (1536, 768), "st_ed_pred_head.linear_1.bias": (1536,),
        "st_ed_pred_head.LayerNorm.weight": (1536,), "st_ed_pred_head.LayerNorm.bias": (1536,),
        "st_ed_pred_head.linear_2.weight": (2, 1536), "st_ed_pred_head.linear_2.bias": (2,)}),
    (HeroForViolin, 196, 118_280_133, {
        "violin_pool.weight": (1, 768), "violin_pred_head.linear_1.weight": (1536, 768),
        "violin_pred_head.linear_1.bias": (1536,), "violin_pred_head.LayerNorm.weight": (1536,),
        "violin_pred_head.LayerNorm.bias": (1536,), "violin_pred_head.linear_2.weight": (1, 1536),
        "violin_pred_head.linear_2.bias": (1,)}),
])
def test_layout_and_counts_at_finetune_size(cls, entries, params, heads):
    with torch.device("meta"):
        model = cls(load_config("hero_finetune"))
    sd = model.state_dict()
    assert len(sd) == entries
    assert sum(p.numel() for p in model.parameters()) == params
    got = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("v_encoder.")}
    assert got == heads
    assert all(k.startswith(cls.expected_missing_keys) for k in got)
    head_ln = next(m for n, m in model.named_modules() if n.endswith("pred_head.LayerNorm"))
    assert head_ln.eps == 1e-5


def test_st_ed_pool_starts_as_copy_of_qa_pool():
    model = _model(HeroForVideoQA)
    assert torch.equal(model.st_ed_pool.weight, model.qa_pool.weight)
    assert model.st_ed_pool.weight.data_ptr() != model.qa_pool.weight.data_ptr()
    assert model.st_ed_pool.bias is None and model.qa_pool.bias is None


# ---------------------------------------------------------------- video QA maths


def _reference_qa_heads(model, frames, mask):
    """Loop-level reference for §9.3 steps 5-7 from the T-TRM frame outputs."""
    n_q, n_a, length, _ = frames.shape
    logits = torch.zeros(n_q, n_a)
    st, ed = torch.zeros(n_q, length), torch.zeros(n_q, length)
    w_qa, w_se = model.qa_pool.weight[0], model.st_ed_pool.weight[0]
    for q in range(n_q):
        for a in range(n_a):
            s = torch.where(mask[q, a] == 1, frames[q, a] @ w_qa, torch.tensor(-1e4))
            logits[q, a] = model.qa_pred_head(torch.softmax(s, 0) @ frames[q, a])[0]
        for t in range(length):
            s = torch.where(mask[q, :, t] == 1, frames[q, :, t] @ w_se, torch.tensor(-1e4))
            out = model.st_ed_pred_head(torch.softmax(s, 0) @ frames[q, :, t])
            st[q, t] = out[0] if mask[q, 0, t] else -1e4
            ed[q, t] = out[1] if mask[q, 0, t] else -1e4
    return logits, st, ed


def test_video_qa_t_trm_input_and_heads_match_reference():
    model, batch = _model(HeroForVideoQA), _qa_batch()
    seen = _capture_t_trm(model)
    with torch.no_grad():
        logits, st, ed = model.predict(batch)
        v_enc = model.v_encoder
        fused = v_enc.forward_repr(batch, encode_clip=False)
        frame_emb = v_enc.c_encoder.embeddings(fused)
        text_emb = v_enc.f_encoder.embeddings(batch["qa_input_ids"], batch["qa_pos_ids"])
        ref = _reference_qa_heads(model, seen["out"][:, :6].view(2, 5, 6, 32),
                                  batch["c_attn_masks"].view(2, 5, 6))
    assert torch.allclose(seen["inp"], torch.cat([frame_emb, text_emb], 1), atol=1e-6)
    assert torch.equal(seen["mask"], torch.cat([batch["c_attn_masks"],
                                                batch["qa_attn_masks"]], 1))
    assert logits.shape == (2, 5) and st.shape == ed.shape == (2, 6)
    for got, exp in zip((logits, st, ed), ref):
        assert torch.allclose(got, exp, atol=1e-5)
    assert torch.all(st[1, 4:] == -1e4) and torch.all(ed[1, 4:] == -1e4)
    assert torch.equal(model(batch, "tvqa", compute_loss=False), logits)


def test_video_qa_answer_logits_depend_only_on_own_candidate():
    model, batch = _model(HeroForVideoQA), _qa_batch()
    changed = dict(batch, qa_input_ids=batch["qa_input_ids"].clone(),
                   c_v_feats=batch["c_v_feats"].clone())
    changed["qa_input_ids"][7, 1] = 5 if changed["qa_input_ids"][7, 1] != 5 else 6
    changed["c_v_feats"][6:, 4:] += 3.0  # padded frames of question 1's videos
    with torch.no_grad():
        before, after = model(batch, compute_loss=False), model(changed, compute_loss=False)
    assert torch.equal(after[0], before[0])
    assert torch.allclose(after[1, [0, 1, 3, 4]], before[1, [0, 1, 3, 4]], atol=1e-6)
    assert not torch.allclose(after[1, 2], before[1, 2], atol=1e-4)


def test_video_qa_losses_by_hand():
    model, batch = _model(HeroForVideoQA), _qa_batch()
    with torch.no_grad():
        qa_loss, temporal_loss = model(batch, "tvqa")
        logits, st, ed = model.predict(batch)
    expected_qa = -(torch.log_softmax(logits[0], 0)[3] + torch.log_softmax(logits[1], 0)[1]) / 2
    expected_t = -(torch.log_softmax(st[0], 0)[1] + torch.log_softmax(ed[0], 0)[4]) / 2
    assert torch.allclose(qa_loss, expected_qa, atol=1e-6)
    assert torch.allclose(temporal_loss, expected_t, atol=1e-6)  # question 1 ignored (−1)


def test_video_qa_sdpa_matches_math_path():
    model, batch = _model(HeroForVideoQA), _qa_batch()
    valid = batch["c_attn_masks"].view(2, 5, 6)[:, 0].bool()
    with torch.no_grad():
        fast = model.predict(batch), model(batch)
        set_attn_impl(model, "math")
        ref = model.predict(batch), model(batch)
    assert _rel_err(fast[0][0], ref[0][0]) < 1e-5
    for i in (1, 2):
        assert _rel_err(fast[0][i][valid], ref[0][i][valid]) < 1e-5
    for a, b in zip(fast[1], ref[1]):
        assert _rel_err(a, b) < 1e-5


def test_video_qa_gradients_reach_every_head_parameter():
    model, batch = _model(HeroForVideoQA), _qa_batch()
    qa_loss, temporal_loss = model(batch)
    (qa_loss + 0.4 * temporal_loss).backward()
    for prefix in ("qa_pool", "qa_pred_head", "st_ed_pool", "st_ed_pred_head"):
        for name, param in getattr(model, prefix).named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{prefix}.{name}"


def test_video_qa_rejects_batch_not_multiple_of_five():
    model, batch = _model(HeroForVideoQA), _violin_batch()
    batch.update(qa_input_ids=batch["q_input_ids"], qa_pos_ids=batch["q_pos_ids"],
                 qa_attn_masks=batch["q_attn_masks"])
    with pytest.raises(ValueError, match="multiple of 5"):
        model(batch, "tvqa", compute_loss=False)


# ---------------------------------------------------------------- VIOLIN


def test_violin_logit_matches_reference_and_bce_by_hand():
    model, batch = _model(HeroForViolin), _violin_batch()
    seen = _capture_t_trm(model)
    with torch.no_grad():
        logits = model(batch, "violin", compute_loss=False)
        loss = model(batch, "violin")
    assert logits.shape == (3, 1)
    frames, mask = seen["out"][:, :6], batch["c_attn_masks"]
    assert seen["inp"].size(1) == 6 + batch["q_input_ids"].size(1)
    w = model.violin_pool.weight[0]
    for b in range(3):
        s = torch.where(mask[b] == 1, frames[b] @ w, torch.tensor(-1e4))
        with torch.no_grad():
            ref = model.violin_pred_head(torch.softmax(s, 0) @ frames[b])
        assert torch.allclose(logits[b], ref, atol=1e-5)
    prob = [1 / (1 + math.exp(-x)) for x in logits.view(-1).tolist()]
    expected = -(math.log(prob[0]) + math.log(1 - prob[1]) + math.log(prob[2])) / 3
    assert abs(loss.item() - expected) < 1e-5


def test_violin_sdpa_matches_math_path_and_gradients():
    model, batch = _model(HeroForViolin), _violin_batch()
    with torch.no_grad():
        fast = model(batch, compute_loss=False), model(batch)
        set_attn_impl(model, "math")
        ref = model(batch, compute_loss=False), model(batch)
    for a, b in zip(fast, ref):
        assert _rel_err(a, b) < 1e-5
    model(batch).backward()
    for name, param in model.named_parameters():
        if name.startswith("violin_"):
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_pad_frame_pos_table():
    table = torch.randn(60, 32)
    sd = {FRAME_POS_KEY: table, "other": torch.ones(2)}
    padded = pad_frame_pos_table(sd)
    assert padded[FRAME_POS_KEY].shape == (100, 32)
    assert torch.equal(padded[FRAME_POS_KEY][:60], table)
    assert torch.all(padded[FRAME_POS_KEY][60:] == 0)
    assert sd[FRAME_POS_KEY] is table  # input not modified
    long = {FRAME_POS_KEY: torch.randn(120, 32)}
    assert pad_frame_pos_table(long) is long
    assert pad_frame_pos_table({"other": table}) == {"other": table}


# ---------------------------------------------------------------- loading


def _pretrained_state_dict(frame_rows=100):
    torch.manual_seed(11)
    pre = HeroForPretraining(_config(), vfeat_dim=VFEAT, max_frm_seq_len=frame_rows)
    sd = dict(pre.state_dict())
    sd["vocab_padded"] = True
    return sd


@pytest.mark.parametrize("cls", [HeroForVideoQA, HeroForViolin])
def test_loads_pretraining_layout_with_exactly_the_head_keys_missing(cls):
    sd = _pretrained_state_dict()
    missing, unexpected = load_weights(_model(cls, seed=1), sd, cls.expected_missing_keys)
    heads = {k for k in _model(cls).state_dict() if not k.startswith("v_encoder.")}
    assert set(missing) == heads
    assert "vocab_padded" in unexpected and "video_query_linear.weight" in unexpected
    model = cls.from_pretrained(_config(), sd, vfeat_dim=VFEAT)
    for key, value in sd.items():
        if key.startswith("v_encoder."):
            assert torch.equal(model.state_dict()[key], value), key
    bad = {k: v for k, v in sd.items() if k != "v_encoder.frame_transform.net.1.weight"}
    with pytest.raises(KeyError, match="frame_transform.net.1.weight"):
        cls.from_pretrained(_config(), bad, vfeat_dim=VFEAT)


def test_violin_from_pretrained_pads_short_frame_table(tmp_path):
    sd = _pretrained_state_dict(frame_rows=40)
    path = tmp_path / "short.pt"
    torch.save(sd, path)
    model = HeroForViolin.from_pretrained(_config(), str(path), vfeat_dim=VFEAT)
    table = model.v_encoder.f_encoder.img_embeddings.position_embeddings.weight
    assert table.shape == (100, 32)
    assert torch.equal(table[:40], sd[FRAME_POS_KEY]) and torch.all(table[40:] == 0)
    with pytest.raises(ValueError, match="position_embeddings"):
        HeroForVideoQA.from_pretrained(_config(), sd, vfeat_dim=VFEAT)
    again = HeroForViolin.from_pretrained(_config(), model.state_dict(), vfeat_dim=VFEAT)
    batch = _violin_batch()
    with torch.no_grad():
        assert torch.equal(again.eval()(batch, compute_loss=False),
                           model.eval()(batch, compute_loss=False))
