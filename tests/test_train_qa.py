"""train_videoQA.py and train_violin.py end to end on the tiny toy corpus.

Runs are short and seeded; to make "the validation metric improves" reliable in a few updates,
the training set is the validation DB itself (fitting is measured, as in test_pretrain.py).
The demo configs are the starting point, so their keys are exercised too.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import train_videoQA
import train_violin
from config.config import ConfigError
from data.txt_db import QaQueryTokLmdb
from model.model import FRAME_POS_KEY
from model.violin import HeroForViolin
from utils.engine import Trainer

ROOT = Path(__file__).resolve().parents[1]
DEMO_DBS = "demo_output/dbs/"


def demo_config(tmp_path, toy_dbs, name: str, **over) -> Path:
    """``config/train-{name}-demo.json`` pointed at the tiny DBs, with overrides."""
    cfg = json.loads((ROOT / "config" / f"train-{name}-demo.json").read_text())
    for key, value in cfg.items():
        if isinstance(value, str) and value.startswith(DEMO_DBS):
            cfg[key] = str(toy_dbs / value[len(DEMO_DBS):])
    cfg.update(checkpoint=None, n_workers=0, dropout=0.0, output_dir=str(tmp_path / "run"),
               **over)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def fit_config(tmp_path, toy_dbs, name, db, steps, **over) -> list:
    txt = toy_dbs / "txt_db"
    path = demo_config(tmp_path, toy_dbs, name, train_query_txt_db=str(txt / db),
                       val_query_txt_db=str(txt / db), num_train_steps=steps,
                       valid_steps=steps // 2, save_steps=steps // 2,
                       warmup_steps=2, **over)
    return ["--config", str(path), "--log_steps", "10"]


def initial_metrics(module, task_cls, argv) -> dict:
    opts = module.parse_args(argv)
    task = task_cls(opts)
    torch.manual_seed(opts.seed)
    model = task.build_model()
    model.eval()
    return task, task.validate(model, 0)


def test_tvqa_fine_tuning_fits_and_writes_outputs(tmp_path, toy_dbs):
    argv = fit_config(tmp_path, toy_dbs, "tvqa", "tvqa_val.db", 20, train_batch_size=5,
                      learning_rate=5e-4, lr_mul=10.0, lw_st_ed=0.4)
    task, before = initial_metrics(train_videoQA, train_videoQA.VideoQaTask, argv)
    opts = train_videoQA.parse_args(argv)
    trainer = Trainer(train_videoQA.VideoQaTask(opts), opts)
    trained = trainer.run()
    after = task.validate(trained, 20)
    acc, loss = "val_tvqa/tvqa_val_valid/acc", "val_tvqa/tvqa_val_valid/loss"
    assert after[loss] < before[loss] - 0.1, (before, after)
    assert after[acc] > before[acc], (before, after)
    # lr_mul 10 on the QA heads (groups 0-1), base LR on v_encoder (groups 2-3)
    groups = trainer.optimizer.param_groups
    assert groups[0]["lr"] == pytest.approx(10 * groups[2]["lr"])
    run = tmp_path / "run"
    assert {p.name for p in (run / "ckpt").glob("model_step_*.pt")} == {
        "model_step_10.pt", "model_step_20.pt", "model_step_20_final.pt"}
    preds = json.loads((run / "results" / "val_results_20_all.json").read_text())
    n_val = len(QaQueryTokLmdb(str(toy_dbs / "txt_db" / "tvqa_val.db"), -1).ids)
    assert len(preds) == n_val and set(preds.values()) <= set(range(5))
    valid = [json.loads(line) for line in (run / "log" / "metrics.jsonl").read_text().split("\n")
             if '"valid"' in line]
    assert [v["step"] for v in valid] == [10, 20] and acc in valid[-1]["valid"]
    log = (run / "log" / "log.txt").read_text()
    assert "loss/tvqa_qa " in log and "loss/tvqa_st_ed " in log


def test_batch_without_span_target_trains_qa_loss_only(tmp_path, toy_dbs, caplog):
    argv = fit_config(tmp_path, toy_dbs, "tvqa", "tvqa_val.db", 2, train_batch_size=2,
                      lw_st_ed=0.4)
    task = train_videoQA.VideoQaTask(train_videoQA.parse_args(argv))
    torch.manual_seed(0)
    model = task.build_model()
    loader, _ = task.build_train_loaders()["tvqa"]
    batch = next(iter(loader))
    loss, parts = task.compute_loss(model, "tvqa", batch)
    assert loss.item() == pytest.approx(parts["qa"] + 0.4 * parts["st_ed"], rel=1e-5)
    batch["ts_targets"].fill_(-1)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            loss, parts = task.compute_loss(model, "tvqa", batch)
    assert torch.isfinite(loss) and parts["st_ed"] == 0.0
    assert loss.item() == pytest.approx(parts["qa"])
    assert task.no_span_batches == 2
    assert sum("without any span target" in r.message for r in caplog.records) == 1
    loss.backward()


def test_violin_validates_val_and_test_with_lr_mul(tmp_path, toy_dbs):
    argv = fit_config(tmp_path, toy_dbs, "violin", "violin_val.db", 16, train_batch_size=6,
                      learning_rate=2e-4, lr_mul=8.0)
    task, before = initial_metrics(train_violin, train_violin.ViolinTask, argv)
    keys = {f"valid_violin/violin_valid/{s}_{k}" for s in ("val", "test")
            for k in ("loss", "acc", "ex_per_s")}
    assert set(before) == keys
    opts = train_violin.parse_args(argv)
    trainer = Trainer(train_violin.ViolinTask(opts), opts)
    trained = trainer.run()
    after = task.validate(trained, 16)
    loss = "valid_violin/violin_valid/val_loss"
    assert after[loss] < before[loss], (before, after)
    groups = trainer.optimizer.param_groups
    assert groups[0]["lr"] == pytest.approx(8 * groups[2]["lr"])
    results = tmp_path / "run" / "results"
    for split in ("val", "test"):
        preds = json.loads((results / f"{split}_results_16_all.json").read_text())
        assert len(preds) == 12 and set(preds.values()) <= {0, 1}
    assert (tmp_path / "run" / "ckpt" / "model_step_16_final.pt").is_file()


@pytest.mark.parametrize("rows, expected", [(60, 100), (120, 120)])
def test_violin_frame_position_table(tmp_path, toy_dbs, rows, expected):
    """max_frm_seq_len = max(100, checkpoint rows); a shorter table is zero-padded."""
    cfg = json.loads((ROOT / "config" / "hero_demo.json").read_text())
    torch.manual_seed(0)
    state = HeroForViolin(cfg, max_frm_seq_len=rows).state_dict()
    ckpt = tmp_path / "ckpt.pt"
    torch.save(state, ckpt)
    argv = ["--config", str(demo_config(tmp_path, toy_dbs, "violin")), "--checkpoint", str(ckpt)]
    model = train_violin.ViolinTask(train_violin.parse_args(argv)).build_model()
    table = model.state_dict()[FRAME_POS_KEY]
    assert table.shape[0] == expected
    assert torch.equal(table[:rows], state[FRAME_POS_KEY])
    assert not table[rows:].any()


def test_empty_checkpoint_flag_trains_from_scratch(tmp_path, toy_dbs):
    argv = ["--config", str(demo_config(tmp_path, toy_dbs, "tvqa")), "--checkpoint", ""]
    assert train_videoQA.parse_args(argv).checkpoint is None
    cfg = json.loads((ROOT / "config" / "train-tvqa-demo.json").read_text())
    assert cfg["checkpoint"].startswith("demo_output/pretrain/ckpt/model_step_")


def test_missing_query_db_is_named(tmp_path, toy_dbs):
    argv = ["--config", str(demo_config(tmp_path, toy_dbs, "violin")),
            "--train_query_txt_db", str(tmp_path / "nope.db")]
    with pytest.raises(ConfigError, match=r"--train_query_txt_db .*nope\.db"):
        train_violin.main(argv)
