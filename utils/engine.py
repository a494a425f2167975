"""The training engine shared by every entry script (training.md §3, §3.8, §4.7).

An entry script describes its task with a small :class:`TrainTask` (:mod:`utils.train_task`)
and calls ``Trainer(task, opts).run()``. The engine owns everything else: process setup,
seeding, the output-directory policy, run metadata, the DDP wrap, optimizer, mixed precision,
accumulation, the all-reduce, clipping, the LR schedule, logging, validation cadence,
checkpoints and resume.

This module holds :class:`Trainer` (setup, the training loop, the update, logging, validation
cadence, finish and close) and re-exports the names scripts import from it. Two bases of the
Trainer hold the rest: :class:`utils.trainer_state.StateMixin` (the training state,
checkpoints and resume) and :class:`utils.trainer_faults.FaultsMixin` (non-finite checks,
stop signals and fatal errors, issue 13).

Gradient semantics are upstream's (§3.7, P11): each micro-batch loss is the model's *mean* loss,
**not** divided by ``gradient_accumulation_steps``; gradients are summed over micro-batches and
summed (not averaged) over ranks (:mod:`utils.dist_setup`); the global norm of that sum is clipped
to ``grad_norm`` (the pre-clip norm is logged as ``grad_norm``); ``global_step`` is incremented
before the LR is computed, and the LR is written into all 4 groups every update, with
``lr_mul`` applied to groups 0-1 only where the task says upstream honours it (P3).
``zero_grad`` fills gradients with zeros instead of ``None``, as upstream's PyTorch 1.x/apex did:
a parameter that has received a gradient once keeps being stepped by Adam on later updates of
other tasks (its moments decay), which changes multi-task pretraining numbers if not reproduced.

Virtual ranks (issue 16). ``--virtual_world_size N`` with W processes: each process plays
N/W ranks of an N-process run in turn (their shards, RNG streams, task draw, summed gradients,
VSM gather over all N); the machinery is in :mod:`utils.virtual_world` and
:mod:`utils.virtual_gather`, the loop only runs every local rank's micro-batch. Tasks get the
world as ``task.world`` so that their loss validation plays the same ranks
(:meth:`TrainTask.validation_world`). ``n_gpu`` stays
the number of processes; both sizes are in ``hps.json``.

Mixed precision. ``--fp16``: ``torch.autocast(float16)`` plus one ``torch.amp.GradScaler`` per
training task (upstream's ``num_losses``; apex defaults: scale 2^16, halve and skip on inf/NaN,
double after 2000 clean steps); skipped updates are counted and logged. ``--bf16``: autocast
bfloat16, no scaler. Both work on CPU. Difference from apex O2 (§8 question 3): O2 kept fp16
weights and activations everywhere (LayerNorm and softmax included) with an fp32 master copy in
the optimizer; here the weights *are* the fp32 master copy and autocast runs matmuls in fp16
while keeping LayerNorm, softmax and the losses in fp32. The optimizer sees the same fp32
update; only the rounding of forward activations differs (slightly *more* accurate here), so
losses and metrics stay comparable but are not bit-identical. Gradients are all-reduced while
still scaled, then unscaled, as upstream.

Deliberate deviation (P14): training-loss scalars are logged at the same TensorBoard step as
``lr`` and ``grad_norm`` (upstream wrote them one step behind).
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from config.config import ConfigError, check_required_keys, config_warnings
from model.layers import set_dropout
from optim.misc import build_optimizer
from optim.sched import get_lr_sched, set_lr
from utils.dist_setup import (
    end_distributed,
    init_distributed,
    max_over_ranks,
    maybe_no_sync,
    wrap_model,
)
from utils.distributed import all_gather_object, broadcast_object
from utils.logger import METRICS_LOG, TB_LOGGER, RunningMeter, setup_logging
from utils.preemption import StopRequest
from utils.run_dir import mark_finished, plan_output_dir
from utils.save import (
    CheckpointError,
    ModelSaver,
    load_checkpoint_file,
    rng_state,
    save_training_meta,
    set_rng_state,
)
from utils.train_task import (
    ID_KEYS,
    NonFiniteLossError,
    RunStopped,
    TrainTask,
    add_run_args,
    check_required_paths,
    describe_batch,
)
from utils.trainer_faults import FaultsMixin
from utils.trainer_state import KEEP_TRAIN_STATES, StateMixin
from utils.virtual_world import VirtualMetaLoader, VirtualWorld, resolve_virtual_world_size

__all__ = [
    "ID_KEYS",
    "KEEP_TRAIN_STATES",
    "PERF_EVERY",
    "NonFiniteLossError",
    "RunStopped",
    "TrainTask",
    "Trainer",
    "add_run_args",
    "check_required_paths",
    "describe_batch",
    "forked_rng",
    "set_random_seed",
]

LOGGER = logging.getLogger(__name__)
PERF_EVERY = 100


def set_random_seed(seed: int) -> None:
    """Same seed on every rank for Python, NumPy and torch (§3.2)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def forked_rng():
    """Run a block without changing Python/NumPy/torch RNG states seen afterwards."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


class Trainer(StateMixin, FaultsMixin):
    """Runs a :class:`TrainTask` under upstream's training-loop semantics (see module doc)."""

    def __init__(self, task: TrainTask, opts):
        self.task, self.opts = task, opts
        self.global_step = 0
        self.meters: dict[str, RunningMeter] = {}
        self.examples = defaultdict(int)
        self.overflows = defaultdict(int)
        self.scalers: dict = {}
        self.bad_loss = None
        self.update_losses: list[float] = []
        self.update_terms: dict[str, list] = defaultdict(list)
        self.pbar = None
        self._log_file = None
        self._stop_signum = 0
        self._finished = None  # (message, final checkpoint) of a folder holding a finished run
        self._resumed_from = None
        self.stop = StopRequest()

    # ------------------------------------------------------------------ entry point
    def run(self):
        """Set up, train until ``num_train_steps``, final validation/save; returns the model.

        When ``output_dir`` holds a finished run of the same options nothing is trained or
        written: the message is logged and the model is returned with the run's final weights
        (so entry scripts and their callers behave as after training). A stop signal ends the
        loop after an update agreed by every rank: a training state is saved and
        :class:`RunStopped` raised. Any error is written with its traceback to
        ``log/log.txt`` (once this run owns it) before it propagates.
        """
        self.stop = StopRequest()
        try:
            self.stop.install()
            if self.setup():
                self.train()
                if self._stop_signum:
                    self._stop_for_signal()
                self.finish()
            end_distributed()  # every rank got here: meet, then close the process group
        except BaseException as exc:
            self._log_fatal(exc)
            raise
        finally:
            self.stop.restore()
            self.close()
        return self.model

    # ------------------------------------------------------------------ setup
    def setup(self) -> bool:
        """Everything before the first update; False when ``output_dir`` holds a finished run
        (then only :attr:`model` is set up, with that run's final weights)."""
        opts = self.opts
        self.ctx = init_distributed()
        self.device = self.task.device = self.ctx.device
        opts.n_gpu = self.ctx.world_size
        setup_logging(None, self.ctx.rank)
        self._check_options()
        set_random_seed(opts.seed)
        resume_path = self._resumed_from = self._plan_output_dir()
        if self._finished is not None:
            return self._set_up_finished()
        self._open_logs()
        if self._run_dir is not None:
            self._run_dir.log_notes()  # what claiming the folder did, now also in log.txt
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, opts)
        rank_loaders = self._build_loaders()
        self.scalers = self._build_scalers()
        state = self._load_state(resume_path) if resume_path else None
        save_training_meta(opts, opts.output_dir)
        self.saver = ModelSaver(Path(opts.output_dir) / "ckpt")
        self.ddp = wrap_model(self.model, self.ctx, self.task.find_unused_parameters)
        self.meta_loader = VirtualMetaLoader(rank_loaders, opts.gradient_accumulation_steps,
                                             self.world, distributed=self.ctx.distributed)
        if state is not None:
            self._restore_data_and_rng(state)
        return True

    def _check_options(self) -> None:
        opts = self.opts
        check_required_keys(opts, ("output_dir", *self.task.required_keys))
        if getattr(opts, "fp16", False) and getattr(opts, "bf16", False):
            raise ConfigError("--fp16 and --bf16 are exclusive; pick one")
        for key in ("resume", "overwrite"):
            setattr(opts, key, bool(getattr(opts, key, False)))
        check_required_paths(self.task.required_paths(), opts)
        size = resolve_virtual_world_size(opts, self.ctx.world_size)
        self.world = VirtualWorld(size, self.ctx.rank, self.ctx.world_size)
        self.task.world = self.world

    def _plan_output_dir(self) -> Path | None:
        """Rank 0 locks ``output_dir`` and applies the policy (:mod:`utils.run_dir`); every
        rank gets its verdict (error, finished run or state path), so all ranks train or all
        return. The lock is held until :meth:`close`."""
        verdict, self._run_dir = None, None
        if self.ctx.rank == 0:
            try:
                run = self._run_dir = plan_output_dir(self.opts)
                verdict = (("finished", (run.finished, run.final_checkpoint)) if run.finished
                           else ("ok", run.resume_path))
            except ConfigError as exc:
                verdict = ("error", str(exc))
        kind, value = broadcast_object(verdict)
        if kind == "error":
            raise ConfigError(value)
        if kind == "finished":
            self._finished = value
            return None
        return value

    def _set_up_finished(self) -> bool:
        """The finished run's final model; nothing in ``output_dir`` is written."""
        message, path = self._finished
        if self._run_dir is not None:
            self._run_dir.log_notes()  # console only: this run opens no log.txt
        LOGGER.info("%s", message)
        self.model = self._build_model()
        state = load_checkpoint_file(path, map_location=self.device)
        try:
            self.model.load_state_dict({k: v for k, v in state.items() if torch.is_tensor(v)})
        except RuntimeError as exc:
            raise CheckpointError(f"{path}, the final checkpoint of the finished run in "
                                  f"{self.opts.output_dir}, does not fit this script's model "
                                  f"({exc}); pass --overwrite to train again") from exc
        return False

    def _open_logs(self) -> None:
        log_dir = Path(self.opts.output_dir) / "log"
        if self.ctx.rank == 0:
            log_dir.mkdir(parents=True, exist_ok=True)
            self._log_file = str((log_dir / "log.txt").resolve())
        setup_logging(log_dir, self.ctx.rank)
        if self.ctx.rank == 0:  # parsed before log.txt existed (issue 13)
            for message in config_warnings(self.opts):
                LOGGER.warning(message)
        TB_LOGGER.open(log_dir)
        METRICS_LOG.open(log_dir)

    def _build_model(self):
        model = self.task.build_model().to(self.device)
        set_dropout(model, self.opts.dropout)
        return model

    def _build_loaders(self) -> list:
        """name -> (loader, ratio) of each local virtual rank (one dict without virtual ranks,
        :mod:`utils.virtual_world`)."""
        rank_loaders = self.world.build(self._build_rank_loaders)
        self._rank_loaders = [{n: loader for n, (loader, _) in d.items()} for d in rank_loaders]
        self._loaders = self._rank_loaders[0]
        plain = [name for name, loader in self._loaders.items()
                 if not hasattr(loader, "state_dict")]
        if plain:
            LOGGER.warning("loaders without a saveable position (resume restarts their epoch):"
                           " %s", ", ".join(plain))
        return rank_loaders

    def _build_rank_loaders(self) -> dict:
        return {name: value if isinstance(value, tuple) else (value, 1)
                for name, value in self.task.build_train_loaders().items()}

    def _build_scalers(self) -> dict:
        if not self.opts.fp16:
            return {}
        return {name: torch.amp.GradScaler(self.device.type) for name in self._loaders}

    def _autocast(self):
        if self.opts.fp16:
            return torch.autocast(self.device.type, dtype=torch.float16)
        if getattr(self.opts, "bf16", False):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        opts = self.opts
        self.pbar = tqdm(total=opts.num_train_steps, initial=self.global_step, desc="train",
                         disable=self.ctx.rank != 0, dynamic_ncols=True)
        self.t_start, self.start_examples = time.time(), dict(self.examples)
        if self._resumed_from is not None and self._validation_missing():
            LOGGER.info("resumed at update %d, which has no model_step_%d.pt: redoing its "
                        "validation and checkpoint", self.global_step, self.global_step)
            self._validate(final=False)
            self._save_model()
        if self.global_step >= opts.num_train_steps:
            LOGGER.info("already at update %d of %d", self.global_step, opts.num_train_steps)
            return
        self.model.train()
        accum = opts.gradient_accumulation_steps
        for name, batches in self.meta_loader:
            last = self.meta_loader.step % accum == 0
            gathers = self.world.active and self.task.all_gathers(self.model, name)
            self.world.micro_steps(name, batches, last, self._micro_step,
                                   self._capture if gathers else None)
            if last:
                self._update(name)
                if self._stop_signum or self.global_step >= opts.num_train_steps:
                    break

    def _capture(self, name: str, batch) -> None:
        """The no-grad first pass of a loss that all-gathers, under virtual ranks
        (:mod:`utils.virtual_gather`); the bare model: no DDP hooks."""
        self.task.schedule(self.model, self.global_step)
        with self._autocast():
            self.task.compute_loss(self.model, name, batch)

    def _micro_step(self, name: str, batch, sync: bool, local: int = 0) -> None:
        """One micro-batch of local virtual rank ``local``; ``sync``: the update's last
        backward (the DDP all-reduce). Only global rank 0's losses are logged, as upstream."""
        self.task.schedule(self.model, self.global_step)
        with maybe_no_sync(self.ddp, sync=sync):
            with self._autocast():
                loss, components = self.task.compute_loss(self.ddp, name, batch)
            self._record_loss(name, loss, components, batch, local)
            scaler = self.scalers.get(name)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        self.examples[name] += self.opts.train_batch_size

    def _record_loss(self, name, loss, components, batch, local: int = 0) -> None:
        value = loss.item()
        if not math.isfinite(value):
            if self.bad_loss is None:
                self.bad_loss = (f"rank {self.world.global_rank(local)}: loss {value} at update "
                                 f"{self.global_step + 1} (micro-batch {self.meta_loader.step}),"
                                 f" task {name}, {describe_batch(batch)}")
            return
        if local:
            return
        self._meter(f"loss/{name}", value)
        self.update_losses.append(value)
        self.update_terms[f"loss/{name}"].append(value)
        for key, comp in components.items():
            self._meter(f"loss/{name}_{key}", float(comp))
            self.update_terms[f"loss/{name}_{key}"].append(float(comp))

    def _meter(self, key: str, value: float) -> None:
        if key not in self.meters:
            self.meters[key] = RunningMeter(key)
        self.meters[key](value)

    def _update(self, name: str) -> None:
        bad_loss, signum = max_over_ranks([self.bad_loss is not None,
                                           self.stop.signum or 0], self.device)
        if signum:  # agreed by every rank, including those that got no signal themselves
            self._stop_signum = int(signum)
        if bad_loss:
            self._raise_non_finite()
        opts = self.opts
        self.global_step += 1
        lr = get_lr_sched(self.global_step, opts)
        set_lr(self.optimizer, lr, opts.lr_mul if self.task.honour_lr_mul else 1.0)
        scaler = self.scalers.get(name)
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        grad_norm = self._clip_gradients(scaler is None)
        if scaler is None and grad_norm is not None and not math.isfinite(grad_norm):
            self._raise_non_finite_update(name, f"gradient norm {grad_norm}")
        self._optimizer_step(name, scaler)
        self.optimizer.zero_grad(set_to_none=False)
        self._log_update(name, lr, grad_norm)
        self.update_terms = defaultdict(list)
        self._after_update()

    def _clip_gradients(self, must_check: bool):
        """Clip to ``grad_norm`` and return the pre-clip norm (``None`` when clipping is off,
        unless ``must_check``: fp32/bf16 measure it anyway, a non-finite update must never be
        applied). The gradients are the same on every rank, so every rank decides alike."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.opts.grad_norm != -1:
            return torch.nn.utils.clip_grad_norm_(params, self.opts.grad_norm).item()
        if not must_check:
            return None
        grads = [p.grad for p in params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads).item() if grads else 0.0

    def _optimizer_step(self, name: str, scaler) -> None:
        if scaler is None:
            self.optimizer.step()
            return
        before = scaler.get_scale()
        scaler.step(self.optimizer)
        scaler.update()
        if scaler.get_scale() < before:
            self.overflows[name] += 1
            LOGGER.info("fp16 overflow at update %d (task %s): update skipped, loss scale %g "
                        "-> %g (%d skipped so far)", self.global_step, name, before,
                        scaler.get_scale(), self.overflows[name])

    # ------------------------------------------------------------------ logging
    def _log_update(self, name: str, lr: float, grad_norm) -> None:
        step = self.global_step
        TB_LOGGER.set_step(step)
        TB_LOGGER.add_scalar("lr", lr)
        if grad_norm is not None:
            TB_LOGGER.add_scalar("grad_norm", grad_norm)
        for key, meter in self.meters.items():
            TB_LOGGER.add_scalar(key, meter.val)
        if name in self.scalers:
            TB_LOGGER.add_scalar(f"loss_scale/{name}", self.scalers[name].get_scale())
        self._log_raw_update(name, lr, grad_norm)
        self.pbar.update(1)
        self.pbar.set_postfix(task=name, loss=f"{self.meters[f'loss/{name}'].val:.4f}",
                              lr=f"{lr:.2e}", refresh=False)
        if step % max(1, getattr(self.opts, "log_steps", 100)) == 0:
            losses = " ".join(f"{k} {m.val:.6g}" for k, m in sorted(self.meters.items()))
            norm = "" if grad_norm is None else f" grad_norm {grad_norm:.6g}"
            LOGGER.info("update %d/%d task %s lr %.6g%s %s", step, self.opts.num_train_steps,
                        name, lr, norm, losses)
        if step % PERF_EVERY == 0:
            self._log_throughput()
        self.task.log_update(step, self.meters)

    def _log_raw_update(self, name: str, lr: float, grad_norm) -> None:
        """``log/metrics.jsonl``: the update's raw mean micro-batch loss (not smoothed)."""
        losses, self.update_losses = self.update_losses, []
        METRICS_LOG.write(step=self.global_step, task=name,
                          loss=sum(losses) / len(losses) if losses else None, lr=lr,
                          grad_norm=grad_norm)

    def _log_throughput(self) -> None:
        """``perf/{task}_ex_per_s``: examples of all ranks since this session started."""
        elapsed = max(time.time() - self.t_start, 1e-9)
        totals = defaultdict(int)
        for counts in all_gather_object(dict(self.examples)):
            for name, n in counts.items():
                totals[name] += n - self.start_examples.get(name, 0)
        for name, n in totals.items():
            TB_LOGGER.add_scalar(f"perf/{name}_ex_per_s", n / elapsed)

    # ------------------------------------------------------------------ cadence
    def _after_update(self) -> None:
        if self.task.restore_before_validation:
            self._maybe_save_state()
            self._maybe_validate()
        else:
            self._maybe_validate()
            self._maybe_save_state()

    def _maybe_validate(self) -> None:
        if self.global_step % self.opts.valid_steps == 0:
            self._validate(final=False)
            self._save_model()

    def _save_model(self, suffix: str = "") -> None:
        self._check_finite(f"model_step_{self.global_step}{suffix}.pt", False)
        self.saver.save(self.model, self.global_step, suffix)

    def _maybe_save_state(self) -> None:
        save_steps = getattr(self.opts, "save_steps", None)
        if save_steps and self.global_step % save_steps == 0:
            self._save_state()

    def _validate(self, final: bool) -> None:
        """Task validation in eval mode, under autocast, without touching training RNG."""
        LOGGER.info("validation at update %d%s", self.global_step, " (final)" if final else "")
        with forked_rng(), self.world.forked(), self._autocast():
            self.model.eval()
            try:
                metrics = self.task.validate(self.model, self.global_step, final=final)
            finally:
                self.model.train()
        for key, value in (metrics or {}).items():
            TB_LOGGER.add_scalar(key, value, self.global_step)
            LOGGER.info("  %s: %.6g", key, value)
        METRICS_LOG.write(step=self.global_step, final=final,
                          valid={k: float(v) for k, v in (metrics or {}).items()})

    def finish(self) -> None:
        """After the loop (§3.8): final validation/save per ``final_ckpt_suffix``, then the
        ``log/finished.json`` marker that makes a re-run of the command a no-op."""
        step, suffix = self.global_step, self.task.final_ckpt_suffix
        if step % self.opts.valid_steps != 0:
            self._validate(final=True)
            if suffix is None:
                self._save_model()
        if suffix is not None:
            self._save_model(suffix)
        skipped = sum(self.overflows.values())
        LOGGER.info("training finished at update %d; fp16 updates skipped: %d %s", step,
                    skipped, dict(self.overflows) if skipped else "")
        if self.ctx.rank == 0:  # last: a run that dies before this resumes when re-run
            mark_finished(self.opts.output_dir, step, self.opts.num_train_steps,
                          f"ckpt/model_step_{step}{suffix or ''}.pt")

    def close(self) -> None:
        """Close logs and writers, then release ``output_dir`` (last: nothing writes after)."""
        if self.pbar is not None:
            self.pbar.close()
        for loaders in getattr(self, "_rank_loaders", []):
            for loader in loaders.values():
                if hasattr(loader, "close"):
                    loader.close()
        TB_LOGGER.close()
        METRICS_LOG.close()
        root = logging.getLogger()
        for handler in [h for h in root.handlers
                        if getattr(h, "baseFilename", None) == self._log_file]:
            root.removeHandler(handler)
            handler.close()
        if getattr(self, "_run_dir", None) is not None:
            self._run_dir.release()
            self._run_dir = None
