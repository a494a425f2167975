"""Graceful stop on SIGTERM / SIGINT (issue 13 item 7).

SLURM and Kubernetes send SIGTERM some seconds before they kill a job; a person presses Ctrl-C.
The first such signal only raises a flag: the engine finishes the update in progress, agrees on
the flag with every rank (so all ranks stop after the same update and the saved state is
consistent), saves a full training state and exits with ``128 + signal``. A second signal
restores the default action and re-delivers itself, so the process exits at once.

The flag is checked between updates only: a long validation runs to its end first. The first
signal also arms a watchdog: if the process has not stopped ``HERO_STOP_GRACE_S`` seconds later
(default 600; e.g. a peer rank died, so the agreeing all-reduce can never complete), it exits
with ``128 + signal`` without saving, naming why, instead of hanging until the process-group
timeout. The newest periodic training state is then what a re-run resumes from.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading

LOGGER = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installs the handlers for the lifetime of a run; :attr:`signum` is the first signal."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}
        self._watchdog: threading.Timer | None = None

    def install(self) -> None:
        """Handlers can only be set from the main thread; elsewhere (e.g. a test runner's
        worker thread) the run simply keeps the default behaviour."""
        try:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:
            LOGGER.warning("not in the main thread: SIGTERM/SIGINT stop the run at once")

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._watchdog is not None:
            self._watchdog.cancel()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        grace = float(os.environ.get("HERO_STOP_GRACE_S", "600"))
        LOGGER.warning("%s received: finishing the current update, then saving a training "
                       "state (send it again to exit at once without saving; gives up after "
                       "%g s)", signal.Signals(signum).name, grace)
        self._watchdog = threading.Timer(grace, self._give_up, (signum, grace))
        self._watchdog.daemon = True
        self._watchdog.start()

    @staticmethod
    def _give_up(signum: int, grace: float) -> None:
        LOGGER.error("%s: the run did not stop within %g s (HERO_STOP_GRACE_S); a peer rank may "
                     "be gone or the update is stuck. Exiting without saving: a re-run resumes "
                     "from the newest periodic training state", signal.Signals(signum).name, grace)
        logging.shutdown()
        os._exit(128 + signum)


def resume_command(world_size: int, overwrite: bool = False) -> str:
    """The command line that resumes this run (torchrun prefix when distributed).

    Re-running a run's own command resumes it (:mod:`utils.run_dir`), so that is what is
    printed, without ``--resume``; only ``--overwrite`` is replaced by ``--no-overwrite`` (it
    would set the run aside and start over, also when set in the JSON config).
    """
    argv = [a for a in sys.argv if a != "--overwrite"]
    if overwrite:
        argv.append("--no-overwrite")
    prefix = f"torchrun --nproc_per_node {world_size} " if world_size > 1 else "python "
    return prefix + shlex.join(argv)


def resume_advice(world_size: int, overwrite: bool = False) -> str:
    """The end of a stop message: how to resume (cluster wrappers re-submit the same command)."""
    command = resume_command(world_size, overwrite)
    if overwrite:
        return (f"to resume, run the command without --overwrite (which would set this run "
                f"aside and start over): {command}")
    return ("to resume, run the same command again (it continues from this state on its own, "
            f"as with --resume): {command}")
