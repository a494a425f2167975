"""What an entry script hands the training engine (training.md §3, §3.8).

An entry script describes its task with a small :class:`TrainTask` (model, training loaders,
per-micro-batch loss, schedule switches, validation, three per-script flags) and calls
``Trainer(task, opts).run()`` (:mod:`utils.engine`, which re-exports every name here). This
module also holds what scripts need around that: the run flags every parser gets
(:func:`add_run_args`), the path check that names the flag or config key at fault
(:func:`check_required_paths`), the batch description used in error messages
(:func:`describe_batch`) and the two errors a run ends with on purpose (issue 13):
:class:`NonFiniteLossError` and :class:`RunStopped`.

Virtual ranks (issue 16): the Trainer gives the task its world as ``task.world`` so that the
task's loss validation plays the same ranks (:meth:`TrainTask.validation_world`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from config.config import ConfigError, add_bool, describe_origin
from utils.errors import HeroError
from utils.virtual_world import VirtualWorld, plain_world

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
        ``--virtual_world_size`` under :class:`utils.engine.Trainer`, else the real
        processes."""
        return self.world if self.world is not None else plain_world()

    def log_update(self, global_step: int, meters: dict) -> None:
        """Task-specific TensorBoard scalars after each update (every rank; TB step already
        set), e.g. upstream TVC's bare ``loss`` and ``perf/cap_per_s``; ``meters`` is the
        engine's ``{key: RunningMeter}``."""


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
