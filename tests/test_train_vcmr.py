"""train_vcmr.py end to end on the tiny toy corpus (LMDBs built by the project's own scripts).

A short TVR run raises full-corpus retrieval (VR R@1, VCMR R@10/R@100 at IoU 0.5, measured on
the training queries: the tiny val split holds two videos) over the freshly initialised model,
writes upstream's results/checkpoint layout, and switches its schedules; DiDeMo video-only
evaluates val and test at every validation; checkpoints load; bad paths are named.
"""
from __future__ import annotations

import json

import pytest
import torch
from helpers_train import ROOT, train_and_compare, write_config

import train_vcmr
from config.config import ConfigError
from data.vcmr import vcmr_full_eval_collate
from eval.retrieval import validate_full_vcmr
from model.pretrain import HeroForPretraining
from utils.save import ModelSaver


def test_tvr_training_improves_retrieval(tmp_path, toy_dbs):
    steps = 50
    cfg = write_config(tmp_path, "train-tvr-demo.json", toy_dbs, train_batch_size=8,
                       val_batch_size=16, learning_rate=1e-3,
                       warmup_steps=5, num_train_steps=steps, valid_steps=40, save_steps=40,
                       hard_negtiave_start_step=[30], hard_pool_size=[4], dropout=0.0)
    out = tmp_path / "run"
    argv = ["--config", str(cfg), "--output_dir", str(out), "--log_steps", "5"]
    opts, model, before, after = train_and_compare(train_vcmr, train_vcmr.VcmrTask, argv,
                                                   vcmr_full_eval_collate, validate_full_vcmr)
    gains = {"VR/VR_r1": 20, "VCMR/VCMR_0.5-r10": 0, "VCMR/VCMR_0.5-r100": 10}
    for key, gain in gains.items():
        key = f"valid_train_{key}"
        assert after[key] > before[key] + gain, (key, before[key], after[key])
    assert model.use_hard_negative and model.hard_pool_size == 4
    assert model.lw_st_ed == opts.lw_st_ed

    results = out / "results"
    assert sorted(p.name for p in results.iterdir()) == [
        "val_results_40_rank0.json", f"val_results_{steps}_rank0_final.json"]
    sub = json.loads((results / "val_results_40_rank0.json").read_text())
    assert set(sub) == {"VCMR", "SVMR", "VR", "video2idx"}
    assert {p.name for p in (out / "ckpt").glob("model_step_*")} == {
        "model_step_40.pt", f"model_step_{steps}_final.pt"}
    log = (out / "log" / "log.txt").read_text()
    for key in ("loss/tvr ", "loss/tvr_st_ed ", "valid_tvr/tvr_valid/loss_overall:",
                "valid_tvr/tvr_valid/loss_neg_q:", "valid_val_VCMR_nms_0.5/VCMR_0.7-r1:",
                "valid_val_VCMR_by_type/VCMR_by_type_t-0.7-r1:",
                "valid_val_VCMR_by_type/VCMR_by_type_desc_type_ratio: v "):
        assert key in log, key
    records = [json.loads(line) for line in (out / "log" / "metrics.jsonl").open()]
    valid = [r["valid"] for r in records if "valid" in r]  # the string is text-log only
    assert valid and all("valid_val_VR_by_type/VR_by_type_v-r1" in v for v in valid)
    assert not any(k.endswith("desc_type_ratio") for v in valid for k in v)


def test_didemo_video_only_evaluates_val_and_test(tmp_path, toy_dbs):
    cfg = write_config(tmp_path, "train-didemo_video_only-demo.json", toy_dbs,
                       train_batch_size=4, num_train_steps=2, valid_steps=2, save_steps=2,
                       warmup_steps=1, hard_negtiave_start_step=[1])
    out = tmp_path / "run"
    model = train_vcmr.main(["--config", str(cfg), "--output_dir", str(out)])
    assert model.use_hard_negative
    names = sorted(p.name for p in (out / "results").iterdir())
    assert names == ["test_results_2_rank0.json", "val_results_2_rank0.json"]
    test_sub = json.loads((out / "results" / "test_results_2_rank0.json").read_text())
    for entry in test_sub["VCMR"]:  # DiDeMo video-only window: 3 <= j - i < 6
        assert all(3 <= round((ed - st) / 1.5) - 1 < 6 for _, st, ed, _ in entry["predictions"])
    log = (out / "log" / "log.txt").read_text()
    for key in ("valid_test_VCMR/VCMR_0.7-r10:", "valid_val_SVMR/SVMR_0.5-r1:",
                "valid_didemo_video_only/didemo_video_only_valid/loss_st_ed:"):
        assert key in log, key
    assert "_nms_" not in log  # DiDeMo configs switch NMS off (nms_thd -1)
    assert (out / "ckpt" / "model_step_2_final.pt").is_file()


def test_checkpoint_loads_and_empty_checkpoint_means_scratch(tmp_path, toy_dbs):
    torch.manual_seed(1)
    pretrained = HeroForPretraining(str(ROOT / "config" / "hero_demo.json"))
    path = ModelSaver(tmp_path / "ckpt").save(pretrained, 7)
    cfg = write_config(tmp_path, "train-tvr-demo.json", toy_dbs)
    opts = train_vcmr.parse_args(["--config", str(cfg), "--checkpoint", str(path)])
    model = train_vcmr.VcmrTask(opts).build_model()
    for key, value in pretrained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.lw_st_ed == 0 and not model.use_hard_negative
    opts = train_vcmr.parse_args(["--config", str(cfg), "--checkpoint", ""])
    task = train_vcmr.VcmrTask(opts)
    assert task.required_paths()["checkpoint"] is None
    assert not torch.equal(task.build_model().video_query_linear.weight,
                           pretrained.video_query_linear.weight)


def test_missing_database_is_named(tmp_path, toy_dbs):
    missing = str(tmp_path / "nowhere" / "tvr_val.db")
    cfg = write_config(tmp_path, "train-tvr-demo.json", toy_dbs, val_query_txt_db=missing)
    with pytest.raises(ConfigError, match=f"--val_query_txt_db {missing}"):
        train_vcmr.main(["--config", str(cfg), "--output_dir", str(tmp_path / "run")])


def test_test_split_name():
    assert train_vcmr.test_split_name("/txt/tvr_test_public.db/") == "test_public"
    assert train_vcmr.test_split_name("/txt/didemo_test.db") == "test"
