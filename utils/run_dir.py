"""Who owns a run folder, and what a new run does with what is already in it (issue 13 items 4, 6;
issue 14 item 3).

Before anything in ``output_dir`` is read, moved or opened for logging, rank 0 of a training run
takes an exclusive lock on ``output_dir/.run.lock`` and holds it until ``Trainer.close()`` or
process exit. The file records the holder (PID, host, start time, command line), so a second run
into the same folder is refused at start with a :class:`ConfigError` naming them. The lock is a
POSIX record lock (``fcntl.lockf``): it belongs to the process, so the kernel drops it when the
process dies, even on ``kill -9``, and, unlike ``flock``, DataLoader workers forked from the run
do not inherit it and cannot keep a dead run's folder locked. A lock file whose lock is free but
which still names a holder was left by a run that died without ``close()``: it is taken over
with a WARNING naming that holder. A clean exit removes the lock file. On a file system without
lock support the run goes on unlocked, with a WARNING.

With the lock held, in this order:

1. Leftover temporary files of atomic writes (``.<name>.<random>.tmp`` from
   :func:`utils.save.atomic_torch_save` / ``atomic_write_text`` / ``eval.common.write_json_atomic``,
   ``.<name>.tmp`` from ``eval.qa``) anywhere under ``output_dir`` except inside ``previous-*``
   are deleted, each logged with its size: only a killed save leaves them, and nothing reads them.
2. The output-dir policy. A folder *holds a run* when it has ``log/hps.json`` or ``ckpt/*.pt``.
   Re-running the command that started it is how upstream users (and cluster wrappers that
   re-submit a job after a crash or preemption) continue a run, so without flags:

   * an empty folder, or one holding no run: a new run starts;
   * a run whose ``hps.json`` equals this command's options (except :data:`RUN_CONTROL_KEYS`)
     and that is not finished: it *resumes* from the newest ``ckpt/train_state_N.pt``, saying
     so. With no training state yet it starts again from update 0 in the same folder: the
     earlier attempt's ``model_step_N.pt`` files are replaced only by the same updates' saves
     of an identical run, its ``metrics.jsonl`` records by later ones (readers keep the last
     record per step), so nothing of value is lost;
   * a *finished* run: it says so and nothing is trained (the Trainer returns the final model
     from its checkpoint). Finished means ``log/finished.json`` (:data:`FINISHED_MARKER`),
     written atomically as the very last act of ``Trainer.finish()`` and naming the final
     checkpoint, exists and that checkpoint too. A run that died during its final validation
     or save has no marker and resumes, redoing them; a marker whose checkpoint was deleted is
     removed and the run resumes to write it again. Runs of versions without the marker resume
     from their last state and redo the final validation/save once;
   * a run with other options: refused, naming each differing key with both values;
   * checkpoints without ``hps.json``: refused (the options cannot be compared).

   ``--resume`` is the explicit form: the same, except that checkpoints without ``hps.json``
   are continued, and an empty folder starts from update 0 with a WARNING. ``--overwrite``
   *moves* everything in the folder (log/ with the marker, ckpt/, results*, ...) except the lock
   file and earlier ``previous-*`` folders to a new ``output_dir/previous-<YYYYmmdd-HHMMSS>/``,
   so the new run starts in an empty folder (no old checkpoint, log line or ``metrics.jsonl``
   record mixes with it) and nothing of the old run is lost; delete ``previous-*`` yourself
   when it is not needed. ``--resume --overwrite`` together is refused: one continues the run,
   the other sets it aside.

What was done is kept as notes and logged by :meth:`RunDir.log_notes` once ``log/log.txt`` is
open, so the new run's log says which folder the old run went to, what was removed and where it
resumed from. Processes that write into a run folder without this lock (evaluation scripts
writing ``results_*``) should not be started at the same moment as a training run into that
folder.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from config.config import ConfigError
from utils.save import atomic_write_text, latest_training_state

LOGGER = logging.getLogger(__name__)
LOCK_NAME = ".run.lock"
PREVIOUS_PREFIX = "previous-"
TMP_RE = re.compile(r"^\..+\.tmp$")
RUN_CONTROL_KEYS = ("resume", "overwrite", "output_dir", "log_steps")
LOCK_TRIES = 5
FINISHED_MARKER = Path("log") / "finished.json"


def options_json(opts) -> dict:
    """The options as ``hps.json`` stores them (JSON round trip)."""
    return json.loads(json.dumps(vars(opts), default=str))


def hps_differences(saved: dict, current: dict) -> list:
    """Option keys whose values differ, ignoring the run-control flags (a folder may move).

    A run written before ``virtual_world_size`` existed ran as its ``n_gpu`` ranks."""
    if "virtual_world_size" not in saved and "n_gpu" in saved:
        saved = {**saved, "virtual_world_size": saved["n_gpu"]}
    keys = (set(saved) | set(current)) - set(RUN_CONTROL_KEYS)
    return sorted(k for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>"))


def _holder_record() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                       "command": shlex.join([sys.executable, *sys.argv])}, indent=1)


def describe_holder(text: str) -> str:
    """``PID 12 on host h, started T (command: ...)`` from a lock file's content."""
    try:
        rec = json.loads(text)
        return (f"PID {rec['pid']} on host {rec['host']}, started {rec['started']} "
                f"(command: {rec['command']})")
    except (ValueError, KeyError, TypeError):
        return (f"holder not recorded in the lock file ({text.strip()[:200]!r})" if text.strip()
                else "holder not recorded (the lock file is empty)")


class RunLock:
    """Exclusive, process-owned lock on ``output_dir/.run.lock`` (see module doc for why lockf)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self._fd: int | None = None

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot create the run lock {self.path}: {exc}; pass an "
                              "--output_dir you can write to") from exc

    def _is_current(self, fd: int) -> bool:
        """Still the file at ``path``? (a run exiting cleanly unlinks it while locked)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def acquire(self) -> list:
        """Take the lock or raise naming its holder; returns notes ``(level, message)``."""
        for _ in range(LOCK_TRIES):
            fd = self._open()
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                held = exc.errno in (errno.EACCES, errno.EAGAIN)
                text = _read_holder(fd) if held else ""
                os.close(fd)
                if held:
                    raise ConfigError(
                        f"output_dir {self.path.parent} is in use by another run: "
                        f"{describe_holder(text)}. Wait for it to end or stop it, or pass "
                        f"another --output_dir (lock file {self.path})") from None
                return [(logging.WARNING, f"cannot lock {self.path} ({exc.strerror}): this "
                         "file system has no locks, so a second run into this folder is not "
                         "detected")]
            if self._is_current(fd):
                return self._take(fd)
            os.close(fd)
        raise ConfigError(f"cannot lock {self.path}: it keeps being replaced by other runs; "
                          "pass another --output_dir")

    def _take(self, fd: int) -> list:
        self._fd = fd
        old = os.pread(fd, 1 << 16, 0).decode(errors="replace")
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_record().encode(), 0)
        if not old.strip():
            return []
        note = (f"took over the stale lock {self.path} of a run that ended without releasing "
                f"it: {describe_holder(old)}")
        host = _field(old, "host")
        if host and host != socket.gethostname():
            note += (f". If that run is still alive on {host}, this file system does not share "
                     "locks between hosts: stop this run")
        return [(logging.WARNING, note)]

    def release(self) -> None:
        """Remove the lock file (while still locked, so no one locks a dying file) and unlock."""
        if self._fd is None:
            return
        try:
            if self._is_current(self._fd):
                self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> str:
    """The holder's record; it writes it just after locking, so wait briefly for it."""
    text = ""
    for _ in range(20):
        text = os.pread(fd, 1 << 16, 0).decode(errors="replace")
        if text.strip():
            break
        time.sleep(0.05)
    return text


def _field(text: str, key: str):
    try:
        return json.loads(text).get(key)
    except (ValueError, AttributeError):
        return None


def remove_leftover_tmp(out: Path) -> list:
    """Delete ``.*.tmp`` files of interrupted atomic writes (not in ``previous-*``); notes."""
    notes = []
    for root, dirs, files in os.walk(out):
        if Path(root) == out:
            dirs[:] = [d for d in dirs if not d.startswith(PREVIOUS_PREFIX)]
        for name in sorted(files):
            if not TMP_RE.match(name):
                continue
            path = Path(root) / name
            try:
                size = path.lstat().st_size
                path.unlink()
            except OSError as exc:
                notes.append((logging.WARNING, f"cannot remove leftover temporary file {path}: "
                              f"{exc.strerror}"))
                continue
            notes.append((logging.INFO, f"removed {path} ({size:,} bytes), a temporary file "
                          "left by an interrupted save"))
    return notes


def move_previous_run(out: Path) -> tuple[Path | None, list]:
    """Move all of ``out`` but the lock and ``previous-*`` into a new ``previous-<time>/``."""
    entries = sorted(p for p in out.iterdir()
                     if p.name != LOCK_NAME and not p.name.startswith(PREVIOUS_PREFIX))
    if not entries:
        return None, []
    stamp = f"{PREVIOUS_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    dest, n = out / stamp, 1
    while dest.exists():
        n += 1
        dest = out / f"{stamp}-{n}"
    try:
        dest.mkdir()
        for path in entries:
            os.rename(path, dest / path.name)
    except OSError as exc:
        raise ConfigError(f"--overwrite: cannot move the previous run in {out} aside to {dest}: "
                          f"{exc}; what was moved is in {dest}. Fix the cause or move the "
                          "files yourself, then start again") from exc
    return dest, [p.name for p in entries]


@dataclass
class RunDir:
    """A claimed run folder: its lock, the verdict of the policy and what was done to it.

    ``finished`` is the message for a folder holding a finished run (``final_checkpoint`` its
    final model); otherwise ``resume_path`` is the training state to continue, or None.
    """

    path: Path
    lock: RunLock
    resume_path: Path | None = None
    finished: str | None = None
    final_checkpoint: Path | None = None
    notes: list = field(default_factory=list)

    def log_notes(self) -> None:
        """Log what the claim did (call once ``log/log.txt`` is open, so it is in there)."""
        for level, message in self.notes:
            LOGGER.log(level, "%s", message)
        self.notes = []

    def release(self) -> None:
        self.lock.release()


def plan_output_dir(opts) -> RunDir:
    """Lock ``opts.output_dir``, clean it, apply the policy; the returned claim holds the lock.

    On any refusal the lock is released before the error propagates.
    """
    out = Path(opts.output_dir)
    if opts.resume and opts.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the "
                          f"run in {out}, --overwrite moves it aside to start over; pass one")
    run = RunDir(out, RunLock(out))
    run.notes += run.lock.acquire()
    try:
        run.notes += remove_leftover_tmp(out)
        _apply_policy(opts, out, run)
    except BaseException:
        run.log_notes()  # a refused run has no log.txt of its own: the console gets them
        run.release()
        raise
    return run


def mark_finished(out, global_step: int, num_train_steps: int, final_checkpoint: str) -> None:
    """Write :data:`FINISHED_MARKER` (rank 0, after everything else of the run is saved)."""
    atomic_write_text(Path(out) / FINISHED_MARKER, json.dumps(
        {"global_step": global_step, "num_train_steps": num_train_steps,
         "final_checkpoint": final_checkpoint,
         "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, indent=1))


def _read_hps(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} to compare this command's options with that "
                          f"run's: {exc}; restore it from a copy, or start over with "
                          "--overwrite") from exc


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_same_options(opts, out: Path, hps: Path, ckpt: Path) -> None:
    """Refuse a run folder whose ``hps.json`` differs from (or, without --resume, lacks) the
    options of this command, naming each differing key with both values."""
    if not hps.is_file():
        if opts.resume:
            return
        raise ConfigError(f"output_dir {out} holds checkpoints ({ckpt}) but no {hps} to "
                          "compare this command's options with; pass --resume to continue "
                          "from them anyway, or --overwrite to move them aside and start over")
    saved, current = _read_hps(hps), options_json(opts)
    diff = hps_differences(saved, current)
    if not diff:
        return
    values = "; ".join(f"{k}: {_short(saved.get(k, '<absent>'))} in that run, "
                       f"{_short(current.get(k, '<absent>'))} now" for k in diff)
    what = ("--resume: options differ from" if opts.resume else
            f"output_dir {out} holds a run whose options differ from this command's, see")
    raise ConfigError(f"{what} {hps} in keys: {', '.join(diff)} ({values}); pass that run's "
                      "options to continue it, --overwrite to move it aside and start over, "
                      "or another --output_dir")


def _finished_run(out: Path, notes: list) -> tuple[str | None, Path | None]:
    """(message, final checkpoint) when the marker says the run finished, else (None, None)."""
    marker = out / FINISHED_MARKER
    if not marker.is_file():
        return None, None
    try:
        rec = json.loads(marker.read_text())
        step, total = int(rec["global_step"]), int(rec["num_train_steps"])
        final = out / rec["final_checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read {marker}, which marks the run in {out} as finished: "
                          f"{exc}; delete it to resume that run (its final validation and "
                          "checkpoint are redone), or pass --overwrite to train again") from exc
    if not final.is_file():
        marker.unlink()
        notes.append((logging.WARNING, f"{marker} says the run finished, but its final "
                      f"checkpoint {final} is missing: removed the marker, resuming the run "
                      "to write it again"))
        return None, None
    return (f"output_dir {out} holds a finished run (update {step} of {total}, finished "
            f"{rec.get('finished', 'at an unrecorded time')}, final checkpoint {final}): "
            "nothing to do; pass --overwrite to train again"), final


def _resume_point(opts, out: Path, ckpt: Path, notes: list) -> Path | None:
    """The newest training state of an unfinished run, with a note saying what happens."""
    path = latest_training_state(ckpt) if ckpt.is_dir() else None
    if opts.resume:
        if path is None:
            notes.append((logging.WARNING, f"--resume: no training state in {ckpt}; "
                          "starting from step 0"))
        return path
    if path is None:
        notes.append((logging.WARNING, f"output_dir {out} holds an unfinished run with the "
                      f"same options but no training state ({ckpt}/train_state_*.pt) yet: "
                      "starting it again from update 0 in this folder (pass --overwrite to "
                      "move the earlier attempt aside instead)"))
    else:
        notes.append((logging.INFO, f"output_dir {out} holds an unfinished run with the same "
                      f"options: resuming from {path.relative_to(out)} (pass --overwrite to "
                      "start over)"))
    return path


def _apply_policy(opts, out: Path, run: RunDir) -> None:
    """Move aside / start / refuse / finished / resume, per the module doc; sets ``run``."""
    hps, ckpt = out / "log" / "hps.json", out / "ckpt"
    if opts.overwrite:
        dest, moved = move_previous_run(out)
        run.notes.append((logging.INFO, f"--overwrite: moved the previous run's "
                          f"{', '.join(moved)} to {dest}; this run starts in an empty folder"
                          if dest else f"--overwrite: {out} held nothing to move aside"))
        return
    if not (opts.resume or hps.is_file() or any(ckpt.glob("*.pt"))):
        return
    _check_same_options(opts, out, hps, ckpt)
    run.finished, run.final_checkpoint = _finished_run(out, run.notes)
    if run.finished is None:
        run.resume_path = _resume_point(opts, out, ckpt, run.notes)
