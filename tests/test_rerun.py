"""Issue 14 item 3: re-running the command that started a run continues it, as upstream users
and cluster wrappers (which re-submit the identical command after a crash or preemption)
expect; a finished run is left alone; other options are refused naming the keys.

Real training processes of the toy script (tests/test_engine.py), with the 12-update run of
tests/test_resume.py; the crash-during-final-validation cases run the Trainer in-process with a
validation that fails once.
"""
from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.test_engine import BASE, ToyTask, toy_args
from tests.test_faults import SCRIPT, _env, _log, _run, _updates
from tests.test_resume import ARGS
from utils.engine import Trainer
from utils.preemption import resume_command
from utils.run_dir import FINISHED_MARKER, LOCK_NAME


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """An uninterrupted, finished run (the reference for bit-identical resumes)."""
    out = tmp_path_factory.mktemp("rerun") / "full"
    done = _run(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _same_params(a: Path, b: Path) -> bool:
    x, y = torch.load(a / "final_params.pt"), torch.load(b / "final_params.pt")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _snapshot(out: Path) -> dict:
    """relative path -> (mtime, size) of every file but the toy script's own final_params.pt."""
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "final_params.pt"}


@pytest.mark.parametrize("kill_at", [10, 3])
def test_killed_run_resumes_when_the_same_command_is_run_again(tmp_path, full, kill_at):
    """Killed at update 10: resumes from train_state_8. Killed at update 3, before the first
    training state: starts again from update 0 in the same folder."""
    cut = tmp_path / "cut"
    killed = _run(cut, env=_env(TOY_KILL_AT=kill_at))
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (cut / "log" / "hps.json").is_file() and not (cut / FINISHED_MARKER).exists()

    again = _run(cut)  # the identical command: no --resume
    assert again.returncode == 0, again.stderr[-3000:]
    line = (f"output_dir {cut} holds an unfinished run with the same options: resuming from "
            "ckpt/train_state_8.pt (pass --overwrite to start over)" if kill_at == 10 else
            f"output_dir {cut} holds an unfinished run with the same options but no training "
            f"state ({cut / 'ckpt'}/train_state_*.pt) yet: starting it again from update 0")
    assert line in again.stderr and line in _log(cut)
    assert _same_params(full, cut)
    assert _updates(full) == _updates(cut) and sorted(_updates(cut)) == list(range(1, 13))
    marker = json.loads((cut / FINISHED_MARKER).read_text())
    assert marker["global_step"] == 12 and marker["final_checkpoint"] == "ckpt/model_step_12.pt"


def test_finished_run_is_left_alone_with_or_without_resume(tmp_path, full):
    run = tmp_path / "run"
    shutil.copytree(full, run)
    before = _snapshot(run)
    for extra in ((), ("--resume",)):
        again = _run(run, *extra)
        assert again.returncode == 0, again.stderr[-3000:]
        assert (f"output_dir {run} holds a finished run (update 12 of 12, finished "
                in again.stderr)
        assert (f"final checkpoint {run / 'ckpt' / 'model_step_12.pt'}): nothing to do; pass "
                "--overwrite to train again") in again.stderr
        assert "update 1/12" not in again.stderr and "validation at" not in again.stderr
        assert _snapshot(run) == before  # no file written, log.txt included
        assert _same_params(full, run)  # the returned model holds the final weights
    assert not (run / LOCK_NAME).exists()


def test_rerun_with_other_options_is_refused_naming_the_keys(tmp_path, full):
    run = tmp_path / "run"
    shutil.copytree(full, run)
    (run / FINISHED_MARKER).unlink()  # an unfinished run: still refused
    before = _snapshot(run)
    other = _run(run, "--learning_rate", "0.1", "--toy_noise", "0")
    assert other.returncode == 1
    hps = run / "log" / "hps.json"
    assert (f"output_dir {run} holds a run whose options differ from this command's, see {hps} "
            "in keys: learning_rate, toy_noise (learning_rate: 0.05 in that run, 0.1 now; "
            "toy_noise: 0.3 in that run, 0.0 now); pass that run's options to continue it, "
            "--overwrite to move it aside") in other.stderr
    assert _snapshot(run) == before


def test_stopped_by_sigterm_then_the_printed_command_resumes(tmp_path, full):
    cut = tmp_path / "cut"
    stopped = _run(cut, env=_env(TOY_SIGNAL_AT=7))
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    command = "python " + shlex.join([SCRIPT, *ARGS, "--output_dir", str(cut)])
    assert ("to resume, run the same command again (it continues from this state on its own, "
            f"as with --resume): {command}") in stopped.stderr.strip().splitlines()[-1]

    again = _run(cut)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from ckpt/train_state_7.pt" in _log(cut)
    assert _same_params(full, cut) and _updates(full) == _updates(cut)


def test_resume_command_drops_overwrite(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_vr.py", "--overwrite", "--seed", "2"])
    assert resume_command(1, overwrite=True) == "python train_vr.py --seed 2 --no-overwrite"
    monkeypatch.setattr(sys, "argv", ["train_vr.py", "--seed", "2"])
    assert resume_command(2) == "torchrun --nproc_per_node 2 train_vr.py --seed 2"


class FlakyValidation(ToyTask):
    """Validation of the last update dies once (e.g. out of memory, a node lost)."""

    final_ckpt_suffix = "_final"
    armed = False

    def validate(self, model, global_step, final=False):
        if global_step == self.opts.num_train_steps and FlakyValidation.armed:
            FlakyValidation.armed = False
            raise RuntimeError("validation died")
        return super().validate(model, global_step, final)


def _flaky_run(out, steps, restore_first, armed=False):
    opts = toy_args(BASE + ["--num_train_steps", str(steps), "--valid_steps", "2",
                            "--save_steps", str(steps if steps % 2 else 2),
                            "--output_dir", str(out)])
    task = FlakyValidation(opts)
    task.restore_before_validation = restore_first
    FlakyValidation.armed = armed
    return Trainer(task, opts).run()


@pytest.mark.parametrize("steps, restore_first", [(3, False), (4, True)])
def test_run_that_died_in_its_last_validation_is_not_finished(tmp_path, steps, restore_first):
    """3 updates: the final validation of ``finish()`` dies after ``train_state_3`` was saved.
    4 updates, state saved before validating (videoQA, violin): the validation of update 4 in
    the loop dies after ``train_state_4``. Either way the re-run redoes it and ends as an
    uninterrupted run."""
    reference = _flaky_run(tmp_path / "reference", steps, restore_first)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="validation died"):
        _flaky_run(out, steps, restore_first, armed=True)
    assert (out / "ckpt" / f"train_state_{steps}.pt").is_file()
    assert not (out / FINISHED_MARKER).exists()

    model = _flaky_run(out, steps, restore_first)
    log = _log(out)
    assert f"resuming from ckpt/train_state_{steps}.pt" in log
    if restore_first:
        assert "resumed at update 4, which has no model_step_4.pt: redoing its validation" in log
    final = out / "ckpt" / f"model_step_{steps}_final.pt"
    names = {p.name for p in (out / "ckpt").glob("model_step_*.pt")}
    assert names == {p.name for p in (tmp_path / "reference" / "ckpt").glob("model_step_*.pt")}
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(),
                                                 model.state_dict().values()))
    assert json.loads((out / FINISHED_MARKER).read_text())["final_checkpoint"] == \
        f"ckpt/{final.name}"
    before = _snapshot(out)
    _flaky_run(out, steps, restore_first)  # finished now
    assert _snapshot(out) == before


def test_torchrun_finished_rerun_returns_on_every_rank(tmp_path):
    """The finished verdict reaches every rank: none waits for a training the others skip."""
    args = [*ARGS, "--num_train_steps", "4", "--valid_steps", "2", "--save_steps", "2"]
    out = tmp_path / "run"
    assert _run(out, ranks=2, args=args).returncode == 0
    again = _run(out, ranks=2, args=args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"output_dir {out} holds a finished run (update 4 of 4" in again.stderr
