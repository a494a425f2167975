"""train_tvc.py end to end on the tiny toy corpus.

The training captions are the validation DB's own (fitting is measured, so a few updates
suffice), decoding is cut to 10 steps and METEOR/PTB are replaced by eval.tvc's Java-free path
to keep the test fast; the scorer is otherwise the real TVCEval.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train_tvc
from config.config import ConfigError
from eval.tvc import TVCEval

ROOT = Path(__file__).resolve().parents[1]
DEMO_DBS = "demo_output/dbs/"
STEPS = 10


def tvc_argv(tmp_path, toy_dbs, **over) -> list:
    cfg = json.loads((ROOT / "config" / "train-tvc-demo.json").read_text())
    for key, value in cfg.items():
        if isinstance(value, str) and value.startswith(DEMO_DBS):
            cfg[key] = str(toy_dbs / value[len(DEMO_DBS):])
    cfg.update(checkpoint=None, n_workers=0, dropout=0.0, output_dir=str(tmp_path / "run"),
               **over)
    path = tmp_path / "tvc.json"
    path.write_text(json.dumps(cfg))
    return ["--config", str(path)]


@pytest.fixture
def no_java(monkeypatch):
    monkeypatch.setattr(train_tvc, "TVCEval", lambda ref, use_java=None: TVCEval(ref, False))


def test_parser_keeps_upstream_tvc_flags_and_defaults(toy_dbs, toy_raw):
    opts = train_tvc.parse_args(["--train_db", str(toy_dbs / "txt_db" / "tvc_train.db")])
    assert (opts.optim, opts.weight_decay, opts.grad_norm, opts.sub_ctx_len) == \
        ("adamw", 0.01, 2.0, 1)
    assert (opts.max_gen_step, opts.max_cap_per_vid, opts.lsr, opts.test_db) == (30, -1, 0.1, None)
    assert (opts.gradient_accumulation_steps, opts.train_batch_size, opts.valid_steps,
            opts.warmup_steps, opts.lr_mul) == (16, 16, 1000, 4000, 1.0)
    assert opts.task == "tvc" and opts.rank == 0
    assert Path(opts.toker) == toy_raw / "tokenizer"


def test_train_db_without_tokenizer_asks_for_toker(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"BOS": 0, "EOS": 2}))
    with pytest.raises(ConfigError, match="--toker"):
        train_tvc.parse_args(["--train_db", str(tmp_path)])


def test_tvc_fine_tuning_improves_cider_above_constant_baseline(tmp_path, toy_dbs, no_java):
    txt = toy_dbs / "txt_db"
    argv = tvc_argv(tmp_path, toy_dbs, train_db=str(txt / "tvc_val.db"), max_gen_step=10,
                    num_train_steps=STEPS, valid_steps=STEPS, save_steps=STEPS,
                    warmup_steps=1, learning_rate=5e-4)
    opts = train_tvc.parse_args(argv)
    task = train_tvc.TvcTask(opts)
    torch.manual_seed(opts.seed)
    before = task.validate(task.build_model(), 0)
    trained = train_tvc.main(argv)
    after = task.validate(trained, STEPS)
    baseline = train_tvc.constant_caption_scores(
        train_tvc.most_frequent_caption(txt / "tvc_val.db"), txt / "tvc_val_release.jsonl",
        use_java=False)
    assert after["CIDEr"] > before["CIDEr"] + 20, (before, after)
    assert after["CIDEr"] > baseline["CIDEr"] + 20, (baseline, after)

    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "results" / f"results_{STEPS}.jsonl").open()]
    refs = [json.loads(x) for x in (txt / "tvc_val_release.jsonl").open() if x.strip()]
    assert sorted(r["clip_id"] for r in lines) == sorted(r["clip_id"] for r in refs)
    assert set(lines[0]) == {"vid_name", "clip_id", "ts", "descs"}
    assert {p.name for p in (run / "ckpt").glob("model_step_*.pt")} == {f"model_step_{STEPS}.pt"}
    hps = json.loads((run / "log" / "hps.json").read_text())
    assert (hps["task"], hps["rank"], hps["lr_mul"]) == ("tvc", 0, 10.0)
    assert Path(hps["toker"]).is_dir()


def test_tensorboard_keys_are_upstreams(tmp_path, toy_dbs, no_java):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    txt = toy_dbs / "txt_db"
    argv = tvc_argv(tmp_path, toy_dbs, train_db=str(txt / "tvc_val.db"), max_gen_step=2,
                    num_train_steps=3, valid_steps=3, warmup_steps=1)
    train_tvc.main(argv)
    events = EventAccumulator(str(tmp_path / "run" / "log"))
    events.Reload()
    keys = set(events.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "Bleu_4", "ROUGE_L", "CIDEr"} <= keys
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
