"""Run-folder ownership (issue 13 item 4) and leftover ``.*.tmp`` cleanup (item 6), on real
training processes: the toy script of tests/test_engine.py, launched as test_resume.py does.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from config.config import ConfigError
from utils.run_dir import LOCK_NAME, plan_output_dir

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "tests" / "test_engine.py")
ARGS = ["--train_batch_size", "2", "--gradient_accumulation_steps", "1", "--optim", "adamw",
        "--learning_rate", "0.05", "--warmup_steps", "1", "--valid_steps", "2",
        "--save_steps", "2", "--grad_norm", "1.0", "--n_workers", "0", "--seed", "1",
        "--dropout", "0", "--log_steps", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
# Locks the folder like a run's rank 0, forks a child that outlives it (as DataLoader workers
# can), reports both PIDs and waits to be killed.
HOLDER = """
import os, sys, time
from pathlib import Path
from utils.run_dir import RunLock
RunLock(Path(sys.argv[1])).acquire()
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
print(os.getpid(), child, flush=True)
time.sleep(60)
"""


def _train(out, steps, *extra):
    return subprocess.run([sys.executable, SCRIPT, *ARGS, "--num_train_steps", str(steps),
                           "--output_dir", str(out), *extra], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)


def _steps(out) -> list:
    lines = (out / "log" / "metrics.jsonl").read_text().splitlines()
    return sorted({json.loads(line)["step"] for line in lines})


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_locked_folder_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    child = None
    try:
        pid, child = map(int, holder.stdout.readline().split())
        refused = _train(out, 2)
        assert refused.returncode != 0
        assert f"PID {pid} on host {socket.gethostname()}, started" in refused.stderr
        assert f"output_dir {out} is in use by another run" in refused.stderr
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing read or written

        holder.kill()  # SIGKILL: no clean release; its forked child still runs
        holder.wait()
        done = _train(out, 2)
        assert done.returncode == 0, done.stderr[-3000:]
        log = (out / "log" / "log.txt").read_text()
        assert "took over the stale lock" in log and f"PID {pid} on host" in log
        assert not (out / LOCK_NAME).exists()  # a clean exit removes its lock file
    finally:
        holder.kill()
        holder.stdout.close()
        if child:
            _kill(child)


def test_overwrite_moves_the_old_run_aside_and_tmp_leftovers_are_removed(tmp_path):
    out = tmp_path / "run"
    first = _train(out, 4)
    assert first.returncode == 0, first.stderr[-3000:]
    leftover = out / "ckpt" / ".train_state_6.pt.k2x9q_1a.tmp"  # a save killed mid-write
    leftover.write_bytes(b"\0" * 1234)
    earlier = out / "previous-20000101-000000" / "ckpt"
    earlier.mkdir(parents=True)
    (earlier / ".model_step_9.pt.abc.tmp").write_bytes(b"y")

    refused = _train(out, 2)  # not the command of the run in there: refused, not resumed
    assert refused.returncode != 0
    assert "in keys: num_train_steps (num_train_steps: 4 in that run, 2 now)" in refused.stderr
    assert not leftover.exists()  # removed at start, even by a refused run
    assert f"removed {leftover} (1,234 bytes)" in refused.stderr
    (out / "results").mkdir()
    (out / "results" / ".logits_4_all.pkl.tmp").write_bytes(b"x")  # eval/qa.py's pattern
    second = _train(out, 2, "--overwrite")
    assert second.returncode == 0, second.stderr[-3000:]

    assert sorted(p.name for p in (out / "ckpt").iterdir()) == [
        "model_step_2.pt", "train_state_2.pt"]
    assert _steps(out) == [1, 2]
    prev = sorted(out.glob("previous-2*"))
    assert len(prev) == 2 and prev[0].name == "previous-20000101-000000"
    moved = prev[1]
    assert {"model_step_4.pt", "train_state_4.pt"} <= {p.name for p in (moved / "ckpt").iterdir()}
    assert _steps(moved) == [1, 2, 3, 4] and (moved / "final_params.pt").is_file()
    assert json.loads((moved / "log" / "finished.json").read_text())["global_step"] == 4
    assert json.loads((out / "log" / "finished.json").read_text())["global_step"] == 2
    assert not list(moved.rglob("*.tmp")) and (earlier / ".model_step_9.pt.abc.tmp").is_file()
    log = (out / "log" / "log.txt").read_text()
    assert f"--overwrite: moved the previous run's ckpt, final_params.pt, log, results to {moved}" \
        in log
    assert "update 2/2" in log and "update 2/4" not in log  # the first run's lines moved
    assert f"removed {out / 'results' / '.logits_4_all.pkl.tmp'} (1 bytes)" in log


def test_resume_with_overwrite_is_refused_before_the_folder_is_touched(tmp_path):
    opts = SimpleNamespace(output_dir=str(tmp_path / "run"), resume=True, overwrite=True)
    with pytest.raises(ConfigError, match="--resume and --overwrite exclude each other"):
        plan_output_dir(opts)
    assert not (tmp_path / "run").exists()
