"""pretrain.py end to end on the tiny toy corpus (LMDBs built by the project's own scripts).

Every task's validation loss (measured on the training videos with identical masks) falls
after a few dozen updates, and a run resumed from its mid-run training state ends with the
same parameters as the uninterrupted run (real masking datasets, four loaders, VSM schedule).
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers_model import PADDED_VIDEOS, add_mfm_keys, make_video_batch, small_config

import pretrain
from model.model import HeroModel

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30


def _config(tmp_path, toy_dbs) -> Path:
    cfg = json.loads((ROOT / "config" / "pretrain-demo.json").read_text())
    split = cfg["targets"][0]["splits"][0]
    split.update(tasks=["mlm", "mfm-nce", "mffr", "fom", "vsm"], ratio=[1, 1, 1, 1, 1],
                 val_idx=split["train_idx"])  # measure fitting on the training videos
    cfg.update(txt_db=str(toy_dbs / "txt_db"), img_db=str(toy_dbs / "video_db"),
               train_batch_size=4, val_batch_size=4, learning_rate=1e-4, warmup_steps=3,
               num_train_steps=STEPS, valid_steps=STEPS, save_steps=STEPS // 2, n_workers=0,
               hard_negtiave_start_step=[STEPS // 2], drop_svmr_prob=0.5, dropout=0.0)
    path = tmp_path / "pretrain.json"
    path.write_text(json.dumps(cfg))
    return path


def _metrics(task, model) -> dict:
    random.seed(0)  # identical masks for the before/after comparison
    task.schedule(model, STEPS)  # the same span weight and hard negatives for both
    model.eval()
    out = task.validate(model, 0)
    return {k: v for k, v in out.items() if k.endswith(("_loss", "valid/loss", "loss_overall"))}


def test_every_task_loss_falls_and_resume_is_exact(tmp_path, toy_dbs):
    argv = ["--config", str(_config(tmp_path, toy_dbs)), "--output_dir", str(tmp_path / "run"),
            "--log_steps", "10"]
    opts = pretrain.parse_args(argv)
    task = pretrain.PretrainTask(opts)
    torch.manual_seed(opts.seed)
    before = _metrics(task, task.build_model())
    assert len(before) == 5, before

    trained = pretrain.main(argv)
    after = _metrics(task, trained)
    for key, value in before.items():
        assert after[key] < value, (key, value, after[key])
    log = (tmp_path / "run" / "log" / "log.txt").read_text()
    for name in ("mlm", "mfm-nce", "mffr", "fom", "vsm"):
        assert f"loss/{name}_tv_all " in log

    half = tmp_path / "half"
    shutil.copytree(tmp_path / "run", half)
    (half / "ckpt" / f"train_state_{STEPS}.pt").unlink()
    (half / "ckpt" / f"model_step_{STEPS}.pt").unlink()
    resumed = pretrain.main(["--config", str(_config(tmp_path, toy_dbs)), "--output_dir",
                             str(half), "--log_steps", "10", "--resume"])
    for (key, a), b in zip(trained.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


@torch.no_grad()
def test_mfm_nce_validation_from_upstreams_pair():
    """The model returns only (P, N); validation's loss and accuracy equal the reference
    computed from the fp32 logits [P·targetsᵀ ‖ P·Nᵀ] (the former in-model path)."""
    torch.manual_seed(0)
    model = HeroModel(small_config(), vfeat_dim=16).eval()
    batch = add_mfm_keys(make_video_batch(PADDED_VIDEOS, vfeat_dim=16, vocab_size=64),
                         {0: [1, 5], 1: [3]})
    preds, negs = model(batch, "mfm-nce", compute_loss=False)
    unit = preds / preds.norm(dim=1, keepdim=True)
    batch["feat_targets"] = torch.stack([100 * unit[0], -preds[1], 100 * unit[2]])
    logits = torch.cat([preds @ batch["feat_targets"].t(), preds @ negs.t()], dim=1).float()
    labels = torch.arange(3)
    ref_correct = (logits.argmax(-1) == labels).sum()
    ref_loss = F.cross_entropy(logits / model.v_encoder.nce_temp, labels, reduction="sum")
    assert ref_correct.item() == 2  # rows 0 and 2 rank their positive first, row 1 does not
    stats = pretrain.val_mfm_nce(model, batch)
    assert torch.equal(stats["correct"], ref_correct) and stats["n"] == 3
    torch.testing.assert_close(stats["loss"], ref_loss)
    torch.testing.assert_close(stats["loss"], model(batch, "mfm-nce").sum())
    assert float(pretrain.fin_mfm_nce(stats, 1.0, model)["acc"]) == pytest.approx(2 / 3)
