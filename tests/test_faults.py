"""Issue 13 items 3, 6 and 7 on real training processes (the toy script tests/test_engine.py):
non-finite updates are never applied nor saved, a failed write names the file and keeps the
earlier checkpoints, and SIGTERM / SIGINT stop a run cleanly at an update every rank agrees on,
resumable bit-for-bit.
"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_resume import ARGS, LINE

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "tests" / "test_engine.py")


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(out, *extra, env=None, preexec_fn=None, ranks=1, args=ARGS):
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(ranks)]
    return subprocess.run([*launcher, SCRIPT, *args, "--output_dir", str(out), *extra],
                          cwd=ROOT, env=env or _env(), capture_output=True, text=True,
                          timeout=180, preexec_fn=preexec_fn, start_new_session=True)


def _log(out) -> str:
    return (out / "log" / "log.txt").read_text()


def _updates(out) -> dict:
    found = {}
    for line in _log(out).splitlines():
        match = LINE.search(line)
        if match:
            found[int(match.group(1))] = match.group(2)
    return found


def _all_finite(path) -> bool:
    state = torch.load(path, weights_only=False)
    model = state["model"] if "model" in state else state
    return all(torch.isfinite(v).all() for v in model.values() if torch.is_tensor(v))


# ---------------------------------------------------------------- numerics (item 3)
def test_nan_gradient_in_fp32_stops_before_the_update_and_keeps_good_states(tmp_path):
    out = tmp_path / "run"
    proc = _run(out, "--save_steps", "2", env=_env(TOY_NAN_GRAD_AT=5))
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "non-finite gradient norm nan at update 5 (task" in err
    assert "was not applied" in err and "loss/" in err
    assert f"newest good training state: {out / 'ckpt' / 'train_state_4.pt'}" in err
    assert "Traceback" not in proc.stderr  # one message on the console ...
    log = _log(out)
    assert "run failed at update 5" in log and "Traceback" in log  # ... the traceback in log
    states = sorted(p.name for p in (out / "ckpt").glob("train_state_*.pt"))
    assert states == ["train_state_2.pt", "train_state_4.pt"]
    assert all(_all_finite(p) for p in (out / "ckpt").glob("*.pt"))
    assert 4 in _updates(out) and 5 not in _updates(out)


def test_nan_gradient_in_fp16_is_skipped_by_the_scaler(tmp_path):
    out = tmp_path / "run"
    proc = _run(out, "--fp16", env=_env(TOY_NAN_GRAD_AT=5))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fp16 overflow at update 5" in _log(out)
    assert _all_finite(out / "final_params.pt")


def test_non_finite_parameters_are_never_written(tmp_path):
    out = tmp_path / "run"
    proc = _run(out, "--learning_rate", "inf", "--valid_steps", "1", "--save_steps", "1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "not writing model_step_1.pt at update 1" in proc.stderr
    assert "hold NaN/inf" in proc.stderr
    assert not list(out.glob("ckpt/*.pt"))


# ---------------------------------------------------------------- I/O errors (item 6)
def _limit_file_size(max_bytes):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def test_failed_checkpoint_write_names_the_file_and_keeps_earlier_ones(tmp_path):
    """A 400 kB model fits under the 800 kB file-size limit, its 1.2 MB training state does not:
    a real OS write error (EFBIG) in the middle of ``torch.save``."""
    out = tmp_path / "run"
    proc = _run(out, "--toy_hidden", "20000", "--valid_steps", "2", "--save_steps", "4",
                preexec_fn=_limit_file_size(800_000))
    assert proc.returncode == 1, proc.stderr[-3000:]
    target = out / "ckpt" / "train_state_4.pt"
    assert f"cannot write {target}: File too large" in proc.stderr.strip().splitlines()[-1]
    assert f"cannot write {target}: File too large" in _log(out)
    assert not list(out.rglob("*.tmp")) and not target.exists()
    ckpts = sorted(p.name for p in (out / "ckpt").iterdir())
    assert ckpts == ["model_step_2.pt", "model_step_4.pt"]
    assert _all_finite(out / "ckpt" / "model_step_2.pt")


def test_disk_full_message_on_a_tiny_tmpfs(tmp_path):
    """ENOSPC itself, where this machine lets root mount a 64 kB tmpfs (CI runs as root)."""
    from utils.save import CheckpointError, atomic_torch_save
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here; EFBIG test above covers the write path")
    try:
        atomic_torch_save({"small": torch.zeros(10)}, mnt / "model_step_1.pt")
        with pytest.raises(CheckpointError, match="No space left on device") as info:
            atomic_torch_save({"big": torch.zeros(100_000)}, mnt / "model_step_2.pt")
        assert str(mnt / "model_step_2.pt") in str(info.value)
        assert sorted(p.name for p in mnt.iterdir()) == ["model_step_1.pt"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ---------------------------------------------------------------- preemption (item 7)
@pytest.mark.parametrize("sig, group", [("TERM", False), ("TERM", True), ("INT", True)])
def test_stop_signal_saves_state_and_resume_is_bit_identical(tmp_path, sig, group):
    """SIGTERM to the process (Kubernetes, torchrun), SIGTERM to every process of the job
    (SLURM) or SIGINT to the process group (Ctrl-C), DataLoader worker included, at update 7
    of 12: the update finishes, its state is saved, the exit code is 128 + signal, and
    ``--resume`` ends where an uninterrupted run ends."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _run(full).returncode == 0
    env = _env(TOY_SIGNAL_AT=7, TOY_SIGNAL=sig, TOY_SIGNAL_GROUP=int(group))
    stopped = _run(cut, env=env)
    signum = getattr(signal, f"SIG{sig}")
    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    assert f"stopped by SIG{sig} at update 7 of 12" in _log(cut)
    assert "--resume" in _log(cut) and "test_engine.py" in _log(cut)
    assert (cut / "ckpt" / "train_state_7.pt").is_file()
    assert max(_updates(cut)) == 7
    resumed = _run(cut, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = torch.load(full / "final_params.pt"), torch.load(cut / "final_params.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _updates(full) == _updates(cut)


def test_second_signal_exits_at_once_without_saving(tmp_path):
    out = tmp_path / "run"
    proc = _run(out, env=_env(TOY_SIGNAL_AT=7, TOY_SIGNAL_COUNT=2))
    assert proc.returncode == -signal.SIGTERM
    assert not (out / "ckpt" / "train_state_7.pt").exists()


def test_torchrun_ranks_stop_at_the_same_update(tmp_path):
    """Only rank 1 is signalled; both ranks agree on the stop, rank 0 saves every rank's RNG,
    and a resumed 2-rank run ends with the parameters of an uninterrupted one."""
    args = list(ARGS)
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _run(full, ranks=2, args=args).returncode == 0
    stopped = _run(cut, ranks=2, args=args, env=_env(TOY_SIGNAL_AT=5, TOY_SIGNAL_RANK=1))
    assert stopped.returncode != 0
    assert "stopped by SIGTERM at update 5 of 12" in _log(cut)
    state = torch.load(cut / "ckpt" / "train_state_5.pt", weights_only=False)
    assert len(state["rng"]) == 2 and state["global_step"] == 5
    assert max(_updates(cut)) == 5
    resumed = _run(cut, "--resume", ranks=2, args=args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = torch.load(full / "final_params.pt"), torch.load(cut / "final_params.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stuck_stop_gives_up_after_the_grace_period(tmp_path):
    """SIGTERM, then the update never finishes (as when a peer rank has died): the watchdog
    exits with 128 + SIGTERM after HERO_STOP_GRACE_S, saying why, instead of hanging."""
    out = tmp_path / "run"
    proc = _run(out, env=_env(TOY_SIGNAL_AT=7, TOY_HANG_AT=7, HERO_STOP_GRACE_S=2))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "did not stop within 2 s (HERO_STOP_GRACE_S)" in proc.stderr
    assert not (out / "ckpt" / "train_state_7.pt").exists()


def test_unreadable_newest_training_state_is_named_with_the_way_out(tmp_path):
    """A run folder copied in part: the re-run names the bad state and says how to fall back."""
    out = tmp_path / "run"
    assert _run(out, env=_env(TOY_KILL_AT=10)).returncode == -signal.SIGKILL
    newest = out / "ckpt" / "train_state_8.pt"
    os.truncate(newest, newest.stat().st_size // 2)
    proc = _run(out)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert f"cannot read checkpoint {newest}" in last and "previous training state" in last
    newest.unlink()
    assert _run(out).returncode == 0
    assert "resuming from ckpt/train_state_4.pt" in _log(out)
