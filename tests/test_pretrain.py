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

import torch

import pretrain

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
