"""How a training run fails or stops: non-finite checks, stop signals, fatal errors (issue 13,
training.md §3).

:class:`FaultsMixin` is a base of :class:`utils.engine.Trainer`; it reads the attributes the
Trainer sets up (``opts``, ``model``, ``optimizer``, ``global_step``, ``bad_loss``,
``update_terms``, ``ctx``, ``pbar``, the log file) and is not used on its own. The Trainer's
update calls the loss and gradient checks, and every write of a checkpoint or training state
calls :meth:`FaultsMixin._check_finite` first.

Faults (issue 13). The run folder is locked and claimed by :mod:`utils.run_dir`. Before every
optimizer step the loss (every rank) and, in fp32/bf16, the gradient norm are checked: a
non-finite update is never applied and the run stops naming the update, its loss terms and the
newest good state (fp16: the scaler skips it, as apex did). No checkpoint or training state
holding NaN/inf is written (:mod:`utils.numerics`), so rotation never drops the last good state.
SIGTERM / the first SIGINT (:mod:`utils.preemption`) are agreed across ranks in the same
all-reduce as the loss check; the run saves after that update and raises :class:`RunStopped`
(exit ``128 + signal``). A fatal error goes with its traceback into ``log/log.txt``.

Deviation (issue 13): upstream applied a non-finite fp32 update and saved whatever the weights
held.
"""
from __future__ import annotations

import logging
import signal
from pathlib import Path

from utils.distributed import all_gather_object
from utils.numerics import newest_good_files, non_finite_tensors
from utils.preemption import resume_advice
from utils.train_task import NonFiniteLossError, RunStopped

LOGGER = logging.getLogger("utils.engine")  # the Trainer's log lines keep one logger name


class FaultsMixin:
    """Stop for a signal, log a fatal error, and refuse non-finite losses, gradients and
    weights with messages that say what to do next."""

    def _stop_for_signal(self):
        """Save, wait until rank 0 has written the state (a launcher may signal the other
        ranks as soon as one exits), then raise :class:`RunStopped`."""
        self._save_state()
        all_gather_object(True)
        if self.pbar is not None:
            self.pbar.close()  # so the message below is the console's last line
        name = signal.Signals(self._stop_signum).name
        message = (f"stopped by {name} at update {self.global_step} of "
                   f"{self.opts.num_train_steps}; training state saved in "
                   f"{Path(self.opts.output_dir) / 'ckpt'}; "
                   f"{resume_advice(self.ctx.world_size, self.opts.overwrite)}")
        LOGGER.warning(message)
        raise RunStopped(message, self._stop_signum)

    def _log_fatal(self, exc: BaseException) -> None:
        """The error and its traceback into this run's ``log.txt`` only (the console shows the
        message, or Python's traceback for a bug); nothing before the run owns the folder."""
        if isinstance(exc, RunStopped) or self._log_file is None:
            return
        for handler in logging.getLogger().handlers:
            if getattr(handler, "baseFilename", None) == self._log_file:
                record = LOGGER.makeRecord(
                    LOGGER.name, logging.ERROR, __file__, 0,
                    "run failed at update %d: %s: %s", (self.global_step, type(exc).__name__,
                                                        exc), (type(exc), exc, exc.__traceback__))
                handler.handle(record)

    def _raise_non_finite(self):
        reports = [r for r in all_gather_object(self.bad_loss) if r]
        raise NonFiniteLossError(
            "non-finite training loss; stopped before the optimizer step, nothing saved for "
            f"this update ({self._newest_good()}): " + "; ".join(reports))

    def _raise_non_finite_update(self, name: str, what: str):
        terms = ", ".join(f"{k} {sum(v) / len(v):.6g}" for k, v in
                          sorted(self.update_terms.items()) if v)
        raise NonFiniteLossError(
            f"non-finite {what} at update {self.global_step} (task {name}); the update was "
            f"not applied and nothing was saved. Loss terms of this update: {terms or 'none'}. "
            f"{self._newest_good()}. Lower --learning_rate or raise the warmup, then start "
            "over (--overwrite) or continue from that state (--resume)")

    def _newest_good(self) -> str:
        return newest_good_files(Path(self.opts.output_dir) / "ckpt")

    def _check_finite(self, what: str, with_optimizer: bool) -> None:
        """Refuse to write ``what`` if a parameter (or optimizer moment) is non-finite."""
        bad = non_finite_tensors(self.model, self.optimizer if with_optimizer else None)
        if bad:
            raise NonFiniteLossError(
                f"not writing {what} at update {self.global_step}: {len(bad)} tensor(s) hold "
                f"NaN/inf, e.g. {', '.join(bad[:5])}. {self._newest_good()}. Lower "
                "--learning_rate, then start over (--overwrite) or --resume from that state")
