"""utils.entry: the parse-and-run tail of the training entry scripts."""
from __future__ import annotations

import json

import pytest

import utils.entry
from config.config import SharedConfigs
from utils.entry import parse_task_args, run_training


def test_task_args_get_engine_flags_and_config(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"task": "how2qa", "log_steps": 3, "learning_rate": 1e-3}))
    opts = parse_task_args("qa", SharedConfigs.get_videoQA_args,
                           ["--config", str(cfg), "--log_steps", "7", "--resume"])
    assert opts.task == "how2qa" and opts.learning_rate == 1e-3
    assert opts.log_steps == 7 and opts.resume and not opts.overwrite


@pytest.mark.parametrize("flag, expected", [(False, ""), (True, None)])
def test_empty_checkpoint_is_none_only_when_asked(flag, expected):
    opts = parse_task_args("vcmr", SharedConfigs.get_vcmr_args, ["--checkpoint", ""],
                           empty_checkpoint_is_none=flag)
    assert opts.checkpoint == expected
    kept = parse_task_args("vcmr", SharedConfigs.get_vcmr_args, ["--checkpoint", "m.pt"],
                           empty_checkpoint_is_none=flag)
    assert kept.checkpoint == "m.pt"


def test_run_training_builds_task_from_parsed_options(monkeypatch):
    calls = []

    class FakeTrainer:
        def __init__(self, task, opts):
            calls.append((task, opts))

        def run(self):
            return "model"

    monkeypatch.setattr(utils.entry, "Trainer", FakeTrainer)
    parse = lambda argv: {"argv": argv}
    assert run_training(lambda opts: ("task", opts), parse, ["--x"]) == "model"
    assert calls == [(("task", {"argv": ["--x"]}), {"argv": ["--x"]})]
