"""Checkpoint loading (model.md §11): round trips, tolerated quirks, clear errors, RoBERTa init."""
from __future__ import annotations

import logging

import pytest
import torch
from helpers_model import make_mlm_batch, make_video_batch, small_config
from torch import nn

from model.model import (
    FRAME_POS_KEY,
    HeroModel,
    load_roberta,
    max_frm_seq_len_from_state_dict,
    skip_roberta_layers,
)

DV, VOCAB, HID = 16, 64, 32


def build(seed=0, cls=HeroModel, cfg=None, **kwargs):
    torch.manual_seed(seed)
    return cls(cfg or small_config(), vfeat_dim=DV, **kwargs).eval()


class WithHead(HeroModel):
    """A task model with one extra head that a trunk checkpoint lacks."""

    expected_missing_keys = ("task_head.",)

    def __init__(self, config, vfeat_dim=4352, max_frm_seq_len=100):
        super().__init__(config, vfeat_dim, max_frm_seq_len)
        self.task_head = nn.Linear(HID, 1)


def checkpoint(model):
    return {**model.state_dict(), "vocab_padded": True}


@torch.no_grad()
def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    src = build(seed=1)
    path = tmp_path / "model_step_10.pt"
    torch.save(checkpoint(src), path)
    dst = HeroModel.from_pretrained(small_config(), str(path), vfeat_dim=DV).eval()
    video, mlm = make_video_batch(vfeat_dim=DV, vocab_size=VOCAB), make_mlm_batch(
        vfeat_dim=DV, vocab_size=VOCAB)
    torch.testing.assert_close(dst(video, "repr"), src(video, "repr"), rtol=0, atol=0)
    torch.testing.assert_close(dst(mlm, "mlm"), src(mlm, "mlm"), rtol=0, atol=0)
    f_enc = dst.v_encoder.f_encoder
    assert f_enc.lm_head.decoder.weight is f_enc.embeddings.word_embeddings.weight
    assert set(dst.state_dict()) == set(src.state_dict())


def test_fp16_checkpoint_loads_into_fp32():
    src = build(seed=1)
    half = {k: v.half() if v.is_floating_point() else v for k, v in src.state_dict().items()}
    dst = HeroModel.from_pretrained(small_config(), half, vfeat_dim=DV)
    weight = dst.v_encoder.fom_output.linear_1.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, src.v_encoder.fom_output.linear_1.weight.half().float())


def test_empty_state_dict_is_fresh_init_and_vocab_padded_tolerated(caplog):
    torch.manual_seed(3)
    fresh = HeroModel.from_pretrained(small_config(), {}, vfeat_dim=DV)
    assert fresh.v_encoder.f_encoder.embeddings.word_embeddings.weight.std() > 0.01
    with caplog.at_level(logging.INFO, logger="model.model"):
        HeroModel.from_pretrained(small_config(), checkpoint(build()), vfeat_dim=DV)
    assert "1 unexpected checkpoint entr(ies) ignored: vocab_padded" in caplog.text


def test_shape_mismatch_names_key_and_shapes():
    sd = build(max_frm_seq_len=50).state_dict()
    with pytest.raises(ValueError) as err:
        HeroModel.from_pretrained(small_config(), sd, vfeat_dim=DV)
    msg = str(err.value)
    assert FRAME_POS_KEY in msg and "(50, 32)" in msg and "(100, 32)" in msg
    assert "max_frm_seq_len_from_state_dict" in msg
    assert max_frm_seq_len_from_state_dict(sd) == 50
    assert max_frm_seq_len_from_state_dict({}) == 100
    model = HeroModel.from_pretrained(small_config(), sd, vfeat_dim=DV,
                                      max_frm_seq_len=max_frm_seq_len_from_state_dict(sd))
    assert torch.equal(model.state_dict()[FRAME_POS_KEY], sd[FRAME_POS_KEY])


def test_missing_keys_only_where_the_class_expects_them():
    sd = build().state_dict()
    model = WithHead.from_pretrained(small_config(), sd, vfeat_dim=DV)  # task_head stays at init
    assert model.task_head.weight.shape == (1, HID)
    del sd["v_encoder.fom_output.linear_2.bias"]
    with pytest.raises(KeyError, match="v_encoder.fom_output.linear_2.bias"):
        WithHead.from_pretrained(small_config(), sd, vfeat_dim=DV)


def test_tied_decoder_key_and_pad_buffers_may_be_absent():
    src = build(seed=2)
    sd = src.state_dict()
    for key in ("v_encoder.f_encoder.lm_head.decoder.weight", "v_encoder.pad",
                "v_encoder.f_encoder.pad"):
        del sd[key]
    dst = HeroModel.from_pretrained(small_config(), sd, vfeat_dim=DV)
    word = src.v_encoder.f_encoder.embeddings.word_embeddings.weight
    assert torch.equal(dst.v_encoder.f_encoder.lm_head.decoder.weight, word)


def test_non_dict_file_and_non_tensor_value_are_clear_errors(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(TypeError, match=r"weights\.pt holds a list"):
        HeroModel.from_pretrained(small_config(), path, vfeat_dim=DV)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        HeroModel.from_pretrained(small_config(), tmp_path / "nope.pt", vfeat_dim=DV)
    sd = build().state_dict()
    sd["v_encoder.mask_embedding.weight"] = [0.0]
    with pytest.raises(ValueError, match="v_encoder.mask_embedding.weight.*list"):
        HeroModel.from_pretrained(small_config(), sd, vfeat_dim=DV)


def test_gamma_beta_names_are_renamed():
    src = build(seed=4)
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                     "LayerNorm.beta"): v
          for k, v in src.state_dict().items()}
    dst = HeroModel.from_pretrained(small_config(), sd, vfeat_dim=DV)
    ln = "v_encoder.f_encoder.encoder.layer.0.output.LayerNorm.bias"
    assert torch.equal(dst.state_dict()[ln], src.state_dict()[ln])


HF_VOCAB = 61  # padded to 64 by load_roberta (vocab_pad 3), as 50265 -> 50272
HF_BUFFERS = ("roberta.embeddings.position_ids", "roberta.embeddings.token_type_ids")


def hf_roberta(layers=12, seed=7):
    """A tiny transformers ``RobertaForMaskedLM`` (the real class, so real key names).

    Every parameter is redrawn from N(0, 1): HF's init (zero biases, unit LayerNorms) equals
    HERO's, so a tensor that was never loaded could not be told apart from a loaded one. The
    layer LayerNorm eps is HERO's 1e-12 so a layer can be compared by its outputs.
    """
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig(vocab_size=HF_VOCAB, hidden_size=HID, num_hidden_layers=layers,
                           num_attention_heads=4, intermediate_size=4 * HID,
                           max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-12)
    model = RobertaForMaskedLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    return model


def save_hf(model, directory, fmt):
    """The file Hugging Face ships: ``pytorch_model.bin`` (``torch.save`` of the state dict,
    tied duplicates included, as transformers < 5 and the hub's roberta-base have it) or
    ``model.safetensors`` as ``save_pretrained`` writes it today (tied duplicates dropped;
    the pinned torch's ``torch.load`` reads it)."""
    if fmt == "bin":
        path = directory / "pytorch_model.bin"
        torch.save(model.state_dict(), path)
        return path
    model.save_pretrained(directory)
    return directory / "model.safetensors"


def expected_hero_key(hf_key, layer_map):
    """Where HERO's F-TRM must hold an HF tensor, written from model.md §11.4 and the HF
    names; ``None`` for what is dropped by design (skipped layers, HF's index buffers)."""
    if hf_key in HF_BUFFERS:
        return None
    if hf_key.startswith("roberta.encoder.layer."):
        parts = hf_key.split(".")
        dst = layer_map.get(int(parts[3]))
        return None if dst is None else ".".join(["encoder.layer", str(dst), *parts[4:]])
    if hf_key.startswith("roberta."):
        return hf_key[len("roberta."):]
    renames = {"lm_head.layer_norm.weight": "lm_head.LayerNorm.weight",
               "lm_head.layer_norm.bias": "lm_head.LayerNorm.bias",
               "lm_head.decoder.bias": "lm_head.bias"}  # HF ties decoder.bias to lm_head.bias
    return renames.get(hf_key, hf_key)


def assert_loaded_key_by_key(hf_sd, f_enc, layer_map, with_head=True):
    """Every HF tensor sits, unchanged, where HERO must hold it; every F-TRM entry that got
    nothing is one model.md §11.4 leaves at init (frame embeddings, pooler, pad)."""
    hero, covered = f_enc.state_dict(), set()
    for key, src in hf_sd.items():
        target = expected_hero_key(key, layer_map)
        if target is None or (not with_head and target.startswith("lm_head.")):
            continue
        got = hero[target]
        if target == "embeddings.token_type_embeddings.weight":
            assert torch.equal(got[1], src[0]), key  # row 1 (the one used) copies row 0
        elif got.shape[0] == f_enc.vocab_pad + HF_VOCAB and src.shape[0] == HF_VOCAB:
            assert not got[HF_VOCAB:].any(), key  # padded vocab rows are zero
        got = got[:src.shape[0]]
        assert torch.equal(got, src), key
        covered.add(target)
    assert f_enc.lm_head.decoder.weight is f_enc.embeddings.word_embeddings.weight
    covered.add("lm_head.decoder.weight")  # tied: absent from save_pretrained's file
    at_init = {k for k in hero if k.startswith(("img_embeddings.", "pooler.")) or k == "pad"}
    if not with_head:
        at_init |= {k for k in hero if k.startswith("lm_head.")} - {"lm_head.decoder.weight"}
    assert set(hero) - covered == at_init


def pretrain_config(f_layers=2):
    cfg = small_config(vocab=HF_VOCAB, type_vocab=1, f_layers=f_layers)
    cfg["q_config"]["vocab_size"] = HF_VOCAB
    return cfg


def test_skip_layers_maps_every_second_roberta_layer():
    keys = {f"roberta.encoder.layer.{i}.output.dense.weight": i for i in range(12)}
    keys["roberta.pooler.dense.weight"] = -1
    out = skip_roberta_layers(keys, 6)
    assert out == {**{f"roberta.encoder.layer.{j}.output.dense.weight": 2 * j + 1
                      for j in range(6)}, "roberta.pooler.dense.weight": -1}
    with pytest.raises(ValueError, match="num_hidden_layers to divide 12"):
        skip_roberta_layers(keys, 5)


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_roberta_init_from_transformers_checkpoint(tmp_path, fmt):
    hf = hf_roberta()
    path = save_hf(hf, tmp_path, fmt)
    model = load_roberta(build(cfg=pretrain_config()).eval(), path, skip_layers=True)
    assert not model.v_encoder.f_encoder.training  # the fresh F-TRM keeps the model's mode
    f_enc = model.v_encoder.f_encoder
    assert f_enc.embeddings.word_embeddings.weight.shape == (64, HID) and f_enc.vocab_pad == 3
    assert f_enc.embeddings.token_type_embeddings.weight.shape == (2, HID)
    layer_map = {5: 0, 11: 1}  # 2 HERO layers: gap 6, RoBERTa layers 5 and 11
    assert_loaded_key_by_key(hf.state_dict(), f_enc, layer_map)
    # the same computation, not only the same names (Q/K/V and both LayerNorms in place)
    hidden = torch.randn(2, 5, HID, generator=torch.Generator().manual_seed(0))
    mask = (1.0 - torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))[:, None, None] * -1e4
    for src, dst in layer_map.items():
        out = hf.roberta.encoder.layer[src](hidden, attention_mask=mask)
        out = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(f_enc.encoder.layer[dst](hidden, mask), out, rtol=0, atol=0)
    # HERO's head LayerNorm eps is 1e-5 where this HF config has 1e-12 (model.md §15.1)
    torch.testing.assert_close(f_enc.lm_head(hidden)[..., :HF_VOCAB], hf.lm_head(hidden),
                               rtol=0, atol=1e-4)
    assert torch.all(model.v_encoder.mask_embedding.weight[0] == 0)
    assert f_enc.img_embeddings.mask_embedding.weight[0].abs().sum() > 0
    logits = model(make_mlm_batch(vfeat_dim=DV, vocab_size=HF_VOCAB), "mlm", compute_loss=False)
    assert logits.shape[1] == HF_VOCAB  # the 3 padded columns are sliced off


def test_roberta_model_checkpoint_loads_as_finetune_size(tmp_path):
    pre = load_roberta(build(cfg=pretrain_config()), hf_roberta().state_dict())
    path = tmp_path / "pretrained.pt"
    torch.save(checkpoint(pre), path)
    tuned = HeroModel.from_pretrained(small_config(vocab=64), path, vfeat_dim=DV).eval()
    batch = make_video_batch(vfeat_dim=DV, vocab_size=HF_VOCAB)
    torch.testing.assert_close(tuned(batch, "repr"), pre.eval()(batch, "repr"), rtol=0, atol=0)


def test_roberta_init_without_skip_and_bad_files():
    sd = hf_roberta(layers=2).state_dict()
    model = load_roberta(build(cfg=pretrain_config()), sd, skip_layers=False, hf_lm_head=False)
    f_enc = model.v_encoder.f_encoder
    assert_loaded_key_by_key(sd, f_enc, {0: 0, 1: 1}, with_head=False)
    assert not torch.equal(f_enc.lm_head.dense.weight, sd["lm_head.dense.weight"])
    with pytest.raises(KeyError, match="no 'roberta"):
        load_roberta(build(cfg=pretrain_config()), {"encoder.x": torch.zeros(1)})
    del sd["roberta.encoder.layer.1.output.dense.weight"]
    with pytest.raises(KeyError, match="encoder.layer.1.output.dense.weight"):
        load_roberta(build(cfg=pretrain_config()), sd, skip_layers=False)
