"""JSON + CLI configuration merging (training.md §1) and the shipped upstream configs."""
import json

import pytest

from config.config import ConfigError, SharedConfigs


def write(tmp_path, cfg, name="c.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def test_precedence_cli_over_json_over_default(tmp_path):
    cfg = write(tmp_path, {"learning_rate": 1e-4, "train_batch_size": 8, "targets": ["x"]})
    opts = SharedConfigs().get_violin_args(["--config", cfg, "--learning_rate=5e-5"])
    assert opts.learning_rate == 5e-5  # explicit flag wins
    assert opts.train_batch_size == 8  # JSON beats default
    assert opts.valid_steps == 1000  # default
    assert opts.targets == ["x"]  # JSON-only key kept
    assert not hasattr(opts, "config")


def test_no_flag_switches_json_true_off(tmp_path):
    cfg = write(tmp_path, {"fp16": True, "pin_mem": True})
    opts = SharedConfigs().get_violin_args(["--config", cfg, "--no-fp16", "--no_pin_mem"])
    assert opts.fp16 is False and opts.pin_mem is False
    opts = SharedConfigs().get_violin_args(["--config", cfg])
    assert opts.fp16 is True


def test_json_values_keep_their_type(tmp_path):
    cfg = write(tmp_path, {"vfeat_interval": 2})
    opts = SharedConfigs().get_violin_args(["--config", cfg])
    assert f"resnet_slowfast_{opts.vfeat_interval}" == "resnet_slowfast_2"


@pytest.mark.parametrize("cfg,key", [({"train_batch_size": "32"}, "train_batch_size"),
                                     ({"betas": 0.9}, "betas"),
                                     ({"fp16": "yes"}, "fp16")])
def test_wrong_type_is_refused_with_key_named(tmp_path, cfg, key):
    with pytest.raises(ConfigError, match=key):
        SharedConfigs().get_violin_args(["--config", write(tmp_path, cfg)])


def test_missing_or_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        SharedConfigs().get_violin_args(["--config", str(tmp_path / "nope.json")])
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        SharedConfigs().get_violin_args(["--config", str(bad)])


def test_inconsistent_hard_negative_lists(tmp_path):
    cfg = write(tmp_path, {"hard_negtiave_start_step": [1, 2], "hard_neg_weights": [10]})
    with pytest.raises(ConfigError, match="same length"):
        SharedConfigs().get_vcmr_args(["--config", cfg])


@pytest.mark.parametrize("name,getter,expect", [
    ("train-tvr-8gpu.json", "get_vcmr_args",
     {"learning_rate": 1e-4, "num_train_steps": 5000, "nms_thd": 0.5, "lw_st_ed": 0.01,
      "vcmr_eval_q_batch_size": 80, "hard_negtiave_start_step": [2000]}),
    ("train-didemo_video_only-4gpu.json", "get_vcmr_args",
     {"max_clip_len": 20, "min_pred_l": 3, "max_pred_l": 6, "gradient_accumulation_steps": 1}),
    ("train-didemo_video_sub-8gpu.json", "get_vcmr_args", {"hard_pool_size": [80]}),
    ("train-msrvtt_video_only-4gpu.json", "get_vr_args",
     {"train_batch_size": 96, "vfeat_interval": 2, "task": "msrvtt_video_only"}),
    ("train-msrvtt_video_sub-4gpu.json", "get_vr_args", {"sub_ctx_len": 1}),
    ("train-tvqa-8gpu.json", "get_videoQA_args",
     {"lr_mul": 10.0, "lw_st_ed": 0.4, "max_txt_len": 120}),
    ("train-violin-8gpu.json", "get_violin_args",
     {"compressed_db": True, "sub_ctx_len": 2, "lr_mul": 8.0}),
    ("pretrain-tv-16gpu.json", "get_pretrain_args",
     {"targets_ratio": [1], "warmup_steps": 10000, "mask_prob": 0.15, "seed": 77}),
])
def test_shipped_configs_parse_with_upstream_values(name, getter, expect):
    opts = getattr(SharedConfigs(), getter)(["--config", f"config/{name}"])
    for key, value in expect.items():
        assert getattr(opts, key) == value, key
