"""Evaluation refuses a checkpoint without its task's weights (issue 13 item 5).

Run folders are made as training leaves them (log/hps.json, log/model_config.json and a
``ckpt/model_step_N.pt`` written by ``ModelSaver``) over the toy DBs. A TVR run's checkpoint given
to ``eval_videoQA.py`` used to exit 0 with a random QA head's accuracy; now every eval script
stops with one message naming the file, the missing keys and the checkpoint to pass instead.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval_vcmr
import eval_videoQA
import inf_tvc
from config.config import SharedConfigs
from eval.common import EvalSetupError
from model.model import MissingWeightsError
from model.tvc import HeroForTvc
from model.vcmr import HeroForVcmr
from model.videoQA import HeroForVideoQA
from utils.save import CheckpointError, ModelSaver

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config"
STEP = 5
QA_HEAD = HeroForVideoQA.expected_missing_keys


def make_run(root: Path, model, model_config: str, hps: dict) -> Path:
    """A training-run folder holding ``model`` saved at step ``STEP``."""
    (root / "log").mkdir(parents=True)
    (root / "log" / "hps.json").write_text(json.dumps(hps))
    (root / "log" / "model_config.json").write_text((CONFIG / model_config).read_text())
    ModelSaver(root / "ckpt").save(model, STEP)
    return root


def ckpt(run: Path) -> Path:
    return run / "ckpt" / f"model_step_{STEP}.pt"


@pytest.fixture(scope="module")
def tvr_run(tmp_path_factory):
    """A TVR (VCMR) run, hyper-parameters from the TVR demo config."""
    opts = SharedConfigs().get_vcmr_args(["--config", str(CONFIG / "train-tvr-demo.json")])
    torch.manual_seed(0)
    model = HeroForVcmr(str(CONFIG / "hero_demo.json"), lw_neg_ctx=8, lw_neg_q=8)
    return make_run(tmp_path_factory.mktemp("tvr") / "run", model, "hero_demo.json", vars(opts))


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory, tvr_run):
    torch.manual_seed(0)
    hps = {**json.loads((tvr_run / "log" / "hps.json").read_text()), "task": "tvqa"}
    return make_run(tmp_path_factory.mktemp("tvqa") / "run",
                    HeroForVideoQA(str(CONFIG / "hero_demo.json")), "hero_demo.json", hps)


def qa_argv(dbs: Path, run: Path, checkpoint=STEP) -> list[str]:
    return ["--sub_txt_db", str(dbs / "txt_db" / "tv_subtitles.db"),
            "--vfeat_db", str(dbs / "video_db" / "tv"),
            "--query_txt_db", str(dbs / "txt_db" / "tvqa_val.db"), "--split", "val",
            "--output_dir", str(run), "--checkpoint", str(checkpoint), "--n_workers", "0"]


def vcmr_argv(dbs: Path, run: Path) -> list[str]:
    return ["--sub_txt_db", str(dbs / "txt_db" / "tv_subtitles.db"),
            "--vfeat_db", str(dbs / "video_db" / "tv"),
            "--query_txt_db", str(dbs / "txt_db" / "tvr_val.db"), "--split", "val",
            "--output_dir", str(run), "--checkpoint", str(STEP), "--n_workers", "0",
            "--vcmr_eval_video_batch_size", "2", "--batch_size", "8"]


def qa_head_keys() -> list[str]:
    model = HeroForVideoQA(str(CONFIG / "hero_demo.json"))
    return sorted(k for k in model.state_dict() if k.startswith(QA_HEAD))


def test_eval_videoqa_refuses_a_tvr_checkpoint(toy_dbs, tvr_run):
    with pytest.raises(EvalSetupError) as err:
        eval_videoQA.main(qa_argv(toy_dbs, tvr_run))
    msg = str(err.value)
    head = qa_head_keys()
    assert msg.startswith(f"{ckpt(tvr_run)} lacks {len(head)} weight(s) that HeroForVideoQA")
    assert head[0] in msg and f"(+{len(head) - 6} more)" in msg and "\n" not in msg
    assert "looks like a checkpoint of VCMR / VR or pretraining" in msg
    assert "pass a checkpoint fine-tuned for TVQA / How2QA" in msg and "train_videoQA.py" in msg
    assert isinstance(err.value.__cause__, MissingWeightsError)
    assert err.value.__cause__.missing == head
    assert not list(tvr_run.glob("results_*")), "nothing may be written for a refused checkpoint"


def test_eval_videoqa_script_exits_nonzero_naming_the_missing_head(toy_dbs, tvr_run):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "eval_videoQA.py", *qa_argv(toy_dbs, tvr_run)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"{ckpt(tvr_run)} lacks {len(qa_head_keys())} weight(s)" in proc.stderr
    assert "qa_pool.weight" in proc.stderr and "fine-tuned for TVQA" in proc.stderr
    assert not list(tvr_run.glob("results_*"))


def test_the_right_task_checkpoint_still_evaluates(toy_dbs, tvr_run, qa_run, tmp_path):
    val_log, _ = eval_vcmr.main(vcmr_argv(toy_dbs, tvr_run))
    assert "valid/vcmr_val_ex_per_s" in val_log
    val_log, results, _ = eval_videoQA.main(qa_argv(toy_dbs, qa_run))
    assert "valid/acc" in val_log and results


def test_eval_vcmr_refuses_a_tvqa_checkpoint(toy_dbs, qa_run):
    with pytest.raises(EvalSetupError) as err:
        eval_vcmr.main(vcmr_argv(toy_dbs, qa_run))
    msg = str(err.value)
    assert msg.startswith(f"{ckpt(qa_run)} lacks") and "HeroForVcmr" in msg
    assert "q_feat_attn." in msg and "looks like a checkpoint of TVQA / How2QA" in msg
    assert "fine-tuned for VCMR" in msg and "train_vcmr.py" in msg


def test_inf_tvc_refuses_a_checkpoint_without_the_decoder(toy_dbs, toy_raw, tmp_path):
    """A TVQA checkpoint: the decoder's weights are named, its buffers (``decoder.tri_mask``,
    ``loss_func.one_hot``: built, not learned) are not."""
    hps = {"vfeat_interval": 1.5, "max_clip_len": 100, "vfeat_version": "resnet_slowfast",
           "compressed_db": False, "sub_ctx_len": 1, "lsr": 0.1,
           "sub_txt_db": str(toy_dbs / "txt_db" / "tv_subtitles.db"),
           "vfeat_db": str(toy_dbs / "video_db" / "tv"), "toker": str(toy_raw / "tokenizer")}
    qa_model = HeroForVideoQA(str(CONFIG / "hero_demo_tvc.json"))
    run = make_run(tmp_path / "run", qa_model, "hero_demo_tvc.json", hps)
    argv = ["--model_dir", str(run), "--ckpt_step", str(STEP), "--n_workers", "0",
            "--target_clip", str(toy_dbs / "txt_db" / "tvc_val_release.jsonl"),
            "--output", str(tmp_path / "pred.jsonl")]
    with pytest.raises(EvalSetupError) as err:
        inf_tvc.main(argv)
    msg = str(err.value)
    assert msg.startswith(f"{ckpt(run)} lacks") and "HeroForTvc" in msg
    assert "decoder.layer.0." in msg and "looks like a checkpoint of TVQA / How2QA" in msg
    assert "fine-tuned for TVC" in msg and "train_tvc.py" in msg
    missing = err.value.__cause__.missing
    assert "decoder.tri_mask" not in missing and "loss_func.one_hot" not in missing
    assert not (tmp_path / "pred.jsonl").exists()


def test_strict_load_tolerates_buffers_but_not_parameters():
    cfg = str(CONFIG / "hero_demo_tvc.json")
    torch.manual_seed(1)
    src = HeroForTvc(cfg).state_dict()
    sd = {k: v for k, v in src.items() if k not in ("decoder.tri_mask", "loss_func.one_hot")}
    model = HeroForTvc.from_pretrained(cfg, sd, allowed_missing=())
    assert torch.equal(model.state_dict()["emb_LayerNorm.weight"], src["emb_LayerNorm.weight"])
    assert torch.equal(model.decoder.tri_mask, src["decoder.tri_mask"])
    del sd["emb_LayerNorm.bias"]
    with pytest.raises(MissingWeightsError, match="lacks 1 key.*emb_LayerNorm.bias"):
        HeroForTvc.from_pretrained(cfg, sd, allowed_missing=(), source="x.pt")
    assert HeroForTvc.from_pretrained(cfg, sd).emb_LayerNorm.bias.shape == (128,)  # training


def write_bad_checkpoint(kind: str, path: Path, run: Path) -> str:
    """Write a bad ``path`` of ``kind`` (from ``run``'s good checkpoint); returns the pattern
    its error message must hold after the file name."""
    if kind == "list":
        torch.save([torch.zeros(2)], path)
        return "holds a list, not a model state dict"
    if kind == "training_state":
        torch.save({"global_step": 3, "rng": [{}]}, path)
        return "is a training state .*ckpt/model_step_N.pt"
    if kind == "no_frame_table":
        torch.save({"w": torch.zeros(1)}, path)
        return "has no v_encoder.f_encoder.img_embeddings.position_embeddings"
    if kind == "truncated":
        path.write_bytes(ckpt(run).read_bytes()[:4096])
        return "truncated or corrupt"
    sd = torch.load(ckpt(run), weights_only=False)
    sd["qa_pool.weight"] = torch.zeros(3, 3)
    torch.save(sd, path)
    return r"qa_pool.weight: checkpoint shape \(3, 3\) vs model shape .*model_config.json"


@pytest.mark.parametrize("kind", ["list", "training_state", "no_frame_table", "truncated",
                                  "shape"])
def test_bad_checkpoint_file_is_named(toy_dbs, qa_run, tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    pattern = write_bad_checkpoint(kind, path, qa_run)
    error = CheckpointError if kind == "truncated" else EvalSetupError
    with pytest.raises(error, match=f"(?s){re.escape(str(path))}.*{pattern}"):
        eval_videoQA.main(qa_argv(toy_dbs, qa_run, path))


def test_checkpoint_folder_is_refused(toy_dbs, qa_run):
    with pytest.raises(EvalSetupError, match="is a folder; pass a model checkpoint file"):
        eval_videoQA.main(qa_argv(toy_dbs, qa_run, qa_run / "ckpt"))
