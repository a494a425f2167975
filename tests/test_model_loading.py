"""Checkpoint loading (model.md §11): round trips, tolerated quirks, clear errors, RoBERTa init."""
from __future__ import annotations

import logging

import pytest
import torch
from helpers_model import make_mlm_batch, make_video_batch, small_config
from torch import nn

from model.config import BertConfig
from model.encoder import CrossModalTrm
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


def fake_hf_roberta(vocab=61, hidden=HID, layers=12, seed=7):
    """A small dict in HuggingFace RobertaForMaskedLM layout (roberta.*, lm_head.*)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = small_config(hidden=hidden, vocab=vocab, type_vocab=1, f_layers=2)["f_config"]
    donor = CrossModalTrm(BertConfig(**cfg), DV, 100)
    layer = dict(donor.encoder.layer[0].state_dict())
    sd = {f"roberta.embeddings.{k}": torch.randn(v.shape, generator=gen)
          for k, v in donor.embeddings.state_dict().items()}
    sd["roberta.embeddings.position_ids"] = torch.arange(514)[None]
    for i in range(layers):
        for k, v in layer.items():
            sd[f"roberta.encoder.layer.{i}.{k}"] = torch.full(v.shape, float(i))
    sd.update({"lm_head.dense.weight": torch.randn(hidden, hidden, generator=gen),
               "lm_head.dense.bias": torch.randn(hidden, generator=gen),
               "lm_head.layer_norm.weight": torch.randn(hidden, generator=gen),
               "lm_head.layer_norm.bias": torch.randn(hidden, generator=gen),
               "lm_head.bias": torch.randn(vocab, generator=gen),
               "lm_head.decoder.weight": sd["roberta.embeddings.word_embeddings.weight"]})
    return sd


def pretrain_config(f_layers=2):
    cfg = small_config(vocab=61, type_vocab=1, f_layers=f_layers)
    cfg["q_config"]["vocab_size"] = 61
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
def test_roberta_init_from_hf_layout():
    sd = fake_hf_roberta()
    model = load_roberta(build(cfg=pretrain_config()), sd, skip_layers=True)
    f_enc = model.v_encoder.f_encoder
    word = f_enc.embeddings.word_embeddings.weight
    assert word.shape == (64, HID) and f_enc.vocab_pad == 3
    assert torch.equal(word[:61], sd["roberta.embeddings.word_embeddings.weight"])
    assert torch.all(word[61:] == 0) and torch.all(f_enc.lm_head.bias[61:] == 0)
    assert f_enc.lm_head.decoder.weight is word
    assert torch.equal(f_enc.lm_head.bias[:61], sd["lm_head.bias"])
    assert torch.equal(f_enc.lm_head.LayerNorm.weight, sd["lm_head.layer_norm.weight"])
    types = f_enc.embeddings.token_type_embeddings.weight
    row0 = sd["roberta.embeddings.token_type_embeddings.weight"][0]
    assert types.shape == (2, HID) and torch.equal(types[0], row0) and torch.equal(types[1], row0)
    assert torch.all(f_enc.encoder.layer[0].output.dense.weight == 5)  # gap 6: layers 5, 11
    assert torch.all(f_enc.encoder.layer[1].output.dense.weight == 11)
    assert torch.all(model.v_encoder.mask_embedding.weight[0] == 0)
    assert f_enc.img_embeddings.mask_embedding.weight[0].abs().sum() > 0
    logits = model(make_mlm_batch(vfeat_dim=DV, vocab_size=61), "mlm", compute_loss=False)
    assert logits.shape[1] == 61  # the 3 padded columns are sliced off


def test_roberta_model_checkpoint_loads_as_finetune_size(tmp_path):
    pre = load_roberta(build(cfg=pretrain_config()), fake_hf_roberta())
    path = tmp_path / "pretrained.pt"
    torch.save(checkpoint(pre), path)
    tuned = HeroModel.from_pretrained(small_config(vocab=64), path, vfeat_dim=DV).eval()
    batch = make_video_batch(vfeat_dim=DV, vocab_size=61)
    torch.testing.assert_close(tuned(batch, "repr"), pre.eval()(batch, "repr"), rtol=0, atol=0)


def test_roberta_init_without_skip_and_bad_files():
    sd = fake_hf_roberta(layers=2)
    model = load_roberta(build(cfg=pretrain_config()), sd, skip_layers=False, hf_lm_head=False)
    f_enc = model.v_encoder.f_encoder
    assert torch.all(f_enc.encoder.layer[1].output.dense.weight == 1)
    assert not torch.equal(f_enc.lm_head.dense.weight, sd["lm_head.dense.weight"])
    with pytest.raises(KeyError, match="no 'roberta"):
        load_roberta(build(cfg=pretrain_config()), {"encoder.x": torch.zeros(1)})
    del sd["roberta.encoder.layer.1.output.dense.weight"]
    with pytest.raises(KeyError, match="encoder.layer.1.output.dense.weight"):
        load_roberta(build(cfg=pretrain_config()), sd, skip_layers=False)
