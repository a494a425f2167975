"""Exact resume: a training process SIGKILLed after a checkpoint, resumed with --resume, ends
with the parameters and logged losses of an uninterrupted run.

The toy run has dropout (torch RNG), Python-random input noise built in a DataLoader worker,
shuffled loaders, two tasks drawn per cycle, gradient accumulation, and a validation that
consumes RNG between checkpoints, so every piece of state that resume restores is exercised.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "tests" / "test_engine.py")
ARGS = ["--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--optim", "adamw",
        "--learning_rate", "0.05", "--warmup_steps", "3", "--num_train_steps", "12",
        "--valid_steps", "6", "--save_steps", "4", "--grad_norm", "1.0", "--n_workers", "1",
        "--seed", "11", "--dropout", "0.2", "--toy_hidden", "6", "--toy_noise", "0.3",
        "--toy_tasks", "a", "b", "--log_steps", "1"]
LINE = re.compile(r"update (\d+)/12 (.*)$")


def _run(out, *extra, kill_at=0):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if kill_at:
        env["TOY_KILL_AT"] = str(kill_at)
    return subprocess.run([sys.executable, SCRIPT, *ARGS, "--output_dir", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _logged(out) -> dict:
    """update -> logged line (the last occurrence wins, as a reader of the log would take)."""
    found = {}
    for line in (out / "log" / "log.txt").read_text().splitlines():
        match = LINE.search(line)
        if match:
            found[int(match.group(1))] = match.group(2)
    return found


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = _run(full)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = _run(cut, kill_at=10)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (cut / "ckpt" / "train_state_8.pt").is_file()
    assert 9 in _logged(cut) and 10 not in _logged(cut)

    resumed = _run(cut, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (cut / "log" / "log.txt").read_text()

    a, b = torch.load(full / "final_params.pt"), torch.load(cut / "final_params.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _logged(full) == _logged(cut)
    assert sorted(_logged(full)) == list(range(1, 13))
    states = sorted(p.name for p in (cut / "ckpt").glob("train_state_*.pt"))
    assert states == ["train_state_12.pt", "train_state_8.pt"]  # only the newest two kept
