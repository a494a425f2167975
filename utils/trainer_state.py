"""The Trainer's training state: saved every ``save_steps``, restored by ``--resume``
(training.md §3; upstream's resume was lossy, P15).

:class:`StateMixin` is a base of :class:`utils.engine.Trainer`; it reads the attributes the
Trainer sets up (``model``, ``optimizer``, ``scalers``, ``meters``, ``meta_loader``, the
per-rank loaders, ``world``, ``ctx``) and is not used on its own.

Checkpoints and resume. ``ckpt/model_step_<N>.pt`` at every validation; a full training state
(model, optimizer, scalers, meters, data positions, RNG of every rank) every ``save_steps``
as ``ckpt/train_state_<N>.pt``; the two newest are kept. ``--resume`` continues from the newest
bit-for-bit (upstream's resume was lossy, P15): the data side is in :mod:`data.resumable`, and
validation runs under a saved-and-restored RNG (:func:`utils.engine.forked_rng`) so training
randomness does not depend on when validation happens. On resume ``log/hps.json`` must equal
the current options (the keys that differ are listed; ``resume``, ``overwrite``,
``output_dir`` (a run folder may be moved) and ``log_steps`` are ignored). Re-running the same
command resumes too, as upstream did from its ``restore.pt``; the last act of
:meth:`utils.engine.Trainer.finish` writes ``log/finished.json``, after which a re-run (with or
without ``--resume``) trains nothing and returns the final model (policy in
:mod:`utils.run_dir`). A resumed run whose validation checkpoint of the resumed update is
missing redoes that validation first (see :meth:`StateMixin._validation_missing`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from data.resumable import load_loaders_state, loaders_state_dict
from utils.distributed import broadcast_object
from utils.logger import RunningMeter
from utils.save import load_training_state, save_training_state

LOGGER = logging.getLogger("utils.engine")  # the Trainer's log lines keep one logger name
KEEP_TRAIN_STATES = 2


class StateMixin:
    """Save, load and restore the full training state; decide whether a resumed run must redo
    the validation of the update it resumed at."""

    def _state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scalers": {k: s.state_dict() for k, s in self.scalers.items()},
                "meters": {k: m.state_dict() for k, m in self.meters.items()},
                "data": {"meta_step": self.meta_loader.step,
                         "loaders": loaders_state_dict(self._loaders),
                         "loaders_by_rank": self.world.gather(
                             [loaders_state_dict(d) for d in self._rank_loaders])},
                "examples": dict(self.examples), "overflows": dict(self.overflows),
                "zero_grads": [n for n, p in self.model.named_parameters()
                               if p.grad is not None]}

    def _save_state(self) -> None:
        ckpt = Path(self.opts.output_dir) / "ckpt"
        self._check_finite(f"{ckpt / f'train_state_{self.global_step}.pt'}", True)
        path = save_training_state(ckpt, self.global_step, self._state(),
                                   self.world.rng_states())
        if self.ctx.rank == 0:
            states = sorted(ckpt.glob("train_state_*.pt"),
                            key=lambda p: int(p.stem.rsplit("_", 1)[1]))
            for old in states[:-KEEP_TRAIN_STATES]:
                old.unlink()
            LOGGER.info("saved training state %s", path)

    def _load_state(self, path) -> dict:
        state = load_training_state(path, self.world.size, self.world.global_rank(0),
                                    self.world.per_rank)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for name, scaler_state in state["scalers"].items():
            self.scalers[name].load_state_dict(scaler_state)
        for name, meter_state in state["meters"].items():
            self.meters[name] = RunningMeter(name, meter_state["smooth"])
            self.meters[name].load_state_dict(meter_state)
        self.examples.update(state["examples"])
        self.overflows.update(state["overflows"])
        self._restore_zero_grads(state["zero_grads"])
        self.global_step = int(state["global_step"])
        LOGGER.info("resumed from %s at update %d", path, self.global_step)
        return state

    def _restore_zero_grads(self, names) -> None:
        """Zero (not None) grads where the saved run had them: Adam still steps those."""
        named = dict(self.model.named_parameters())
        for name in names:
            named[name].grad = torch.zeros_like(named[name])

    def _restore_data_and_rng(self, state) -> None:
        """Last step of setup: nothing may consume RNG between this and the first batch.

        Each (virtual) rank gets its own loader positions; states written before those were
        saved per rank give every rank rank 0's."""
        data = state["data"]
        self.meta_loader.step = data["meta_step"]
        by_rank = data.get("loaders_by_rank")
        positions = (self.world.local_slice(by_rank) if by_rank
                     else [data["loaders"]] * len(self._rank_loaders))
        missing = set()
        for loaders, saved in zip(self._rank_loaders, positions):
            missing.update(load_loaders_state(loaders, saved))
        if missing:
            LOGGER.warning("no saved position for loader(s) %s", ", ".join(sorted(missing)))
        self.world.load_rng_states(state["rng_local"])

    def _validation_missing(self) -> bool:
        """Resumed at a validation step whose ``model_step_N.pt`` is absent, where that means
        the validation may never have run: tasks that save the training state before
        validating (died during it), and the last update (a run ends with its checkpoint)."""
        step = self.global_step
        if step == 0 or step % self.opts.valid_steps != 0:
            return False
        if not (self.task.restore_before_validation or step >= self.opts.num_train_steps):
            return False
        path = Path(self.opts.output_dir) / "ckpt" / f"model_step_{step}.pt"
        return bool(broadcast_object(not path.is_file() if self.ctx.rank == 0 else None))
