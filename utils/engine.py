"""The training engine shared by every entry script (training.md §3, §3.8, §4.7).

An entry script describes its task with a small :class:`TrainTask` (model, training loaders,
per-micro-batch loss, schedule switches, validation, three per-script flags) and calls
``Trainer(task, opts).run()``. The engine owns everything else: process setup, seeding, the
output-directory policy, run metadata, the DDP wrap, optimizer, mixed precision, accumulation,
the all-reduce, clipping, the LR schedule, logging, validation cadence, checkpoints and resume.

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

Checkpoints and resume. ``ckpt/model_step_<N>.pt`` at every validation; a full training state
(model, optimizer, scalers, meters, data positions, RNG of every rank) every ``save_steps``
as ``ckpt/train_state_<N>.pt``; the two newest are kept. ``--resume`` continues from the newest
bit-for-bit (upstream's resume was lossy, P15): the data side is in :mod:`data.resumable`, and
validation runs under a saved-and-restored RNG so training randomness does not depend on when
validation happens. On resume ``log/hps.json`` must equal the current options (the keys that
differ are listed; ``resume``, ``overwrite``, ``output_dir`` (a run folder may be moved) and
``log_steps`` are ignored). Re-running the same command resumes too, as upstream did from its
``restore.pt``; the last act of :meth:`Trainer.finish` writes ``log/finished.json``, after
which a re-run (with or without ``--resume``) trains nothing and returns the final model
(policy in :mod:`utils.run_dir`). A resumed run whose validation checkpoint of the resumed
update is missing redoes that validation first (see :meth:`Trainer._validation_missing`).

Faults (issue 13). The run folder is locked and claimed by :mod:`utils.run_dir`. Before every
optimizer step the loss (every rank) and, in fp32/bf16, the gradient norm are checked: a
non-finite update is never applied and the run stops naming the update, its loss terms and the
newest good state (fp16: the scaler skips it, as apex did). No checkpoint or training state
holding NaN/inf is written (:mod:`utils.numerics`), so rotation never drops the last good state.
SIGTERM / the first SIGINT (:mod:`utils.preemption`) are agreed across ranks in the same
all-reduce as the loss check; the run saves after that update and raises :class:`RunStopped`
(exit ``128 + signal``). A fatal error goes with its traceback into ``log/log.txt``.

Deliberate deviation (P14): training-loss scalars are logged at the same TensorBoard step as
``lr`` and ``grad_norm`` (upstream wrote them one step behind). Deviation (issue 13): upstream
applied a non-finite fp32 update and saved whatever the weights held.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from config.config import (
    ConfigError,
    add_bool,
    check_required_keys,
    config_warnings,
    describe_origin,
)
from data.resumable import load_loaders_state, loaders_state_dict
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
from utils.errors import HeroError
from utils.logger import METRICS_LOG, TB_LOGGER, RunningMeter, setup_logging
from utils.numerics import newest_good_files, non_finite_tensors
from utils.preemption import StopRequest, resume_advice
from utils.run_dir import mark_finished, plan_output_dir
from utils.save import (
    CheckpointError,
    ModelSaver,
    load_checkpoint_file,
    load_training_state,
    rng_state,
    save_training_meta,
    save_training_state,
    set_rng_state,
)
from utils.virtual_world import (
    VirtualMetaLoader,
    VirtualWorld,
    plain_world,
    resolve_virtual_world_size,
)

LOGGER = logging.getLogger(__name__)
KEEP_TRAIN_STATES = 2
PERF_EVERY = 100
ID_KEYS = ("vids", "qids", "vid_names", "q_ids", "clip_ids")


class NonFiniteLossError(HeroError, RuntimeError):
    """A training loss, gradient norm or parameter was NaN or infinite; training stopped before
    anything non-finite was applied or saved (issue 13 item 3)."""


class RunStopped(HeroError):
    """SIGTERM/SIGINT: the run saved a training state and stops; exit code ``128 + signal``."""

    logged = True

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def add_run_args(parser) -> None:
    """Flags the engine adds to every script's parser (call before parsing)."""
    add_bool(parser, "resume", help="continue from the newest ckpt/train_state_*.pt (the "
             "same command without it does so too)")
    add_bool(parser, "overwrite", help="move the run already in output_dir aside to "
             "output_dir/previous-<time>/ and start over")
    parser.add_argument("--log_steps", type=int, default=100,
                        help="write the running losses to log/log.txt every N updates")


class TrainTask:
    """What an entry script supplies. Override the methods; set the three upstream flags.

    ``honour_lr_mul``: upstream applies ``lr_mul`` to groups 0-1 (videoQA, violin, tvc).
    ``restore_before_validation``: the training state is saved before validation (videoQA,
    violin) rather than after it (pretrain, vcmr, vr).
    ``final_ckpt_suffix``: ``None`` saves ``model_step_N`` at the end only if the last step did
    not already validate (pretrain, tvc); a string such as ``"_final"`` always saves
    ``model_step_N<suffix>`` (vcmr, vr, videoQA, violin).
    """

    honour_lr_mul = False
    restore_before_validation = False
    final_ckpt_suffix: str | None = None
    find_unused_parameters = True
    world: VirtualWorld | None = None  # set by the Trainer (``--virtual_world_size``)
    path_flags: tuple[str, ...] = ()  # option names of the paths required_paths checks
    # options the run cannot start without (missing/null is a ConfigError naming the key and
    # the config file, issue 13); ``output_dir`` is always required
    required_keys: tuple[str, ...] = ()

    def __init__(self, opts):
        self.opts = opts
        self.device = torch.device("cpu")

    def required_paths(self) -> dict:
        """flag -> path that must exist (checked before anything is built).

        The default checks the flags named in ``path_flags``; an empty value counts as unset.
        """
        return {k: getattr(self.opts, k, None) or None for k in self.path_flags}

    def build_model(self):
        raise NotImplementedError

    def build_train_loaders(self) -> dict:
        """name -> (loader, ratio); use :func:`data.resumable.build_resumable_loader`."""
        raise NotImplementedError

    def compute_loss(self, model, task: str, batch):
        """(scalar mean loss, {component: value to log}) for one micro-batch."""
        raise NotImplementedError

    def schedule(self, model, global_step: int) -> None:
        """Schedule switches, called before every micro-batch (§3.8 step 1)."""

    def all_gathers(self, model, task: str) -> bool:
        """Whether training task ``task``'s loss all-gathers across ranks (the VSM ranking
        losses, model.md §8.4): ``--virtual_world_size`` then gathers the virtual ranks too."""
        return False

    def validate(self, model, global_step: int, final: bool = False) -> dict:
        """TensorBoard key -> value; runs on every rank with the model in eval mode."""
        return {}

    def validation_world(self) -> VirtualWorld:
        """The ranks a loss validation plays (:meth:`VirtualWorld.validation_sums`): those of
        ``--virtual_world_size`` under the :class:`Trainer`, else the real processes."""
        return self.world if self.world is not None else plain_world()

    def log_update(self, global_step: int, meters: dict) -> None:
        """Task-specific TensorBoard scalars after each update (every rank; TB step already
        set), e.g. upstream TVC's bare ``loss`` and ``perf/cap_per_s``; ``meters`` is the
        engine's ``{key: RunningMeter}``."""


def set_random_seed(seed: int) -> None:
    """Same seed on every rank for Python, NumPy and torch (§3.2)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def describe_batch(batch) -> str:
    """Keys and, where present, the item ids of a batch (for error messages)."""
    if not isinstance(batch, dict):
        return f"batch of type {type(batch).__name__}"
    ids = {k: list(batch[k])[:8] for k in ID_KEYS if k in batch}
    return f"batch keys [{', '.join(map(str, batch))}]" + (f", ids {ids}" if ids else "")


def check_required_paths(paths: dict, opts=None) -> None:
    """Refuse paths that do not exist, each named with the flag or config key that set it."""
    missing = []
    for key, path in paths.items():
        if path is not None and not Path(path).exists():
            origin = describe_origin(opts, key)
            missing.append(f"{'--' if key.isidentifier() else ''}{key} {path}"
                           + (f" ({origin})" if origin else ""))
    if missing:
        raise ConfigError(f"path(s) not found: {'; '.join(missing)}; correct them where they "
                          f"are set (relative paths are resolved from {Path.cwd()})")


@contextlib.contextmanager
def forked_rng():
    """Run a block without changing Python/NumPy/torch RNG states seen afterwards."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


class Trainer:
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

    # ------------------------------------------------------------------ training state
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
        for loaders, saved in zip(self._rank_loaders, positions):
            missing = load_loaders_state(loaders, saved)
        if missing:
            LOGGER.warning("no saved position for loader(s) %s", ", ".join(missing))
        self.world.load_rng_states(state["rng_local"])

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
