"""train_vr.py end to end on the tiny toy corpus (LMDBs built by the project's own scripts).

A short MSR-VTT video-only run raises VR R@1 (measured on the training queries: the tiny val
split holds two videos) over the freshly initialised model and writes upstream's layout (val and
test results at every validation, ``_final`` checkpoint, loss validation without ``st_ed``);
the video+subtitle variant trains; a non-VR task is refused with the fix named.
"""
from __future__ import annotations

import json

import pytest
from helpers_train import train_and_compare, write_config

import train_vr
from config.config import ConfigError
from data.vr import vr_full_eval_collate
from eval.retrieval import validate_full_vr


def test_msrvtt_video_only_training_improves_recall(tmp_path, toy_dbs):
    steps = 40
    cfg = write_config(tmp_path, "train-msrvtt_video_only-demo.json", toy_dbs,
                       train_batch_size=4, val_batch_size=8, learning_rate=1e-3,
                       warmup_steps=4, num_train_steps=steps, valid_steps=30, save_steps=30,
                       hard_negtiave_start_step=[20], hard_pool_size=[2], dropout=0.0)
    out = tmp_path / "run"
    argv = ["--config", str(cfg), "--output_dir", str(out), "--log_steps", "10"]
    _, model, before, after = train_and_compare(train_vr, train_vr.VrTask, argv,
                                                vr_full_eval_collate, validate_full_vr)
    assert after["valid_train_VR/VR_r1"] > before["valid_train_VR/VR_r1"] + 20
    assert model.use_hard_negative and model.lw_st_ed == 0

    assert sorted(p.name for p in (out / "results").iterdir()) == [
        "test_results_30_rank0.json", f"test_results_{steps}_rank0_final.json",
        "val_results_30_rank0.json", f"val_results_{steps}_rank0_final.json"]
    sub = json.loads((out / "results" / "val_results_30_rank0.json").read_text())
    assert set(sub) == {"VR", "video2idx"}
    assert all(isinstance(e["desc_id"], str) for e in sub["VR"])
    assert (out / "ckpt" / f"model_step_{steps}_final.pt").is_file()
    log = (out / "log" / "log.txt").read_text()
    for key in ("loss/msrvtt_video_only_neg_ctx ", "valid_test_VR/VR_r5:",
                "valid_msrvtt_video_only/msrvtt_video_only_valid/loss_neg_q:"):
        assert key in log, key
    assert "st_ed" not in log


def test_msrvtt_video_sub_trains(tmp_path, toy_dbs):
    cfg = write_config(tmp_path, "train-msrvtt_video_sub-demo.json", toy_dbs,
                       train_batch_size=4, num_train_steps=2, valid_steps=2, warmup_steps=1)
    out = tmp_path / "run"
    model = train_vr.main(["--config", str(cfg), "--output_dir", str(out)])
    assert type(model).__name__ == "HeroForVr"
    log = (out / "log" / "log.txt").read_text()
    assert "valid_val_VR/VR_r1:" in log and "valid_test_VR/VR_r1:" in log


def test_non_vr_task_is_refused(tmp_path, toy_dbs):
    cfg = write_config(tmp_path, "train-msrvtt_video_only-demo.json", toy_dbs, task="tvr")
    with pytest.raises(ConfigError, match="msrvtt_video_sub"):
        train_vr.main(["--config", str(cfg), "--output_dir", str(tmp_path / "run")])
