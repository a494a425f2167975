"""Command-line + JSON configuration (training.md §1).

Every entry script declares its flags with :class:`SharedConfigs` and parses with
:func:`parse_with_config`. Precedence is upstream's: an explicit CLI flag beats the JSON value,
which beats the argparse default; JSON keys that the script does not declare are kept as
attributes (e.g. ``targets``) and logged once.

Differences from upstream, on purpose:
* boolean flags are ``--flag/--no-flag`` (``argparse.BooleanOptionalAction``), so a JSON
  ``true`` can be switched off from the command line;
* JSON values keep their JSON type as upstream (``vfeat_interval: 2`` stays the int ``2``, which
  names the folder ``resnet_slowfast_2``), but a value of the wrong *kind* (a string for an int
  flag, a scalar for a list flag, ...) is refused with the file and key named, instead of
  failing later;
* ``choices`` are not checked for JSON values, as upstream (``train_vr.py`` relies on this);
* ``max_vr_video``, ``vr_eval_video_batch_size`` and ``vr_eval_q_batch_size`` are declared
  (training.md §8 question 8) with the defaults the released configs rely on.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

LOGGER = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value is missing, malformed, or inconsistent."""


def add_bool(parser, name: str, default: bool = False, help: str = "") -> None:
    """Declare ``--name`` / ``--no-name`` (``--no_name`` is accepted too)."""
    parser.add_argument(f"--{name}", f"--no-{name}", f"--no_{name}", dest=name,
                        default=default, action=BoolFlag, help=help)


class BoolFlag(argparse.Action):
    """A switch: the ``--no-`` / ``--no_`` spellings store False, the plain one True."""

    def __init__(self, option_strings, dest, default=False, help=None, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        negative = option_string.startswith(("--no-", "--no_"))
        setattr(namespace, self.dest, not negative)


class SharedConfigs:
    """The shared flags of every script (training.md §1.2) plus the per-task groups (§1.3)."""

    def __init__(self, desc: str = "hero"):
        self.parser = argparse.ArgumentParser(description=desc)
        p = self.parser
        p.add_argument("--model_config", type=str, default=None,
                       help="model-architecture JSON")
        p.add_argument("--checkpoint", type=str, default=None,
                       help="state dict to start from")
        p.add_argument("--train_batch_size", type=int, default=16)
        p.add_argument("--val_batch_size", type=int, default=20)
        p.add_argument("--gradient_accumulation_steps", type=int, default=16)
        p.add_argument("--learning_rate", type=float, default=3e-5)
        p.add_argument("--valid_steps", type=int, default=1000)
        p.add_argument("--save_steps", type=int, default=500)
        p.add_argument("--optim", default="adam",
                       choices=["adam", "adamax", "adamw", "adamw_torch"])
        p.add_argument("--betas", type=float, nargs="+", default=[0.9, 0.98])
        p.add_argument("--dropout", type=float, default=0.1)
        p.add_argument("--weight_decay", type=float, default=0.0)
        p.add_argument("--grad_norm", type=float, default=0.25)
        p.add_argument("--warmup_steps", type=int, default=4000)
        p.add_argument("--lr_mul", type=float, default=1.0)
        p.add_argument("--num_train_steps", type=int, default=100000)
        p.add_argument("--output_dir", type=str, default=None)
        p.add_argument("--sub_ctx_len", type=int, default=0,
                       help="previous subtitles prepended to each segment (backward only)")
        p.add_argument("--max_clip_len", type=int, default=100)
        p.add_argument("--max_txt_len", type=int, default=60)
        p.add_argument("--vfeat_version", type=str, default="resnet_slowfast")
        p.add_argument("--vfeat_interval", type=float, default=1.5)
        add_bool(p, "compressed_db", help="use the *_compressed video LMDB")
        p.add_argument("--seed", type=int, default=42)
        p.add_argument("--n_workers", type=int, default=4)
        add_bool(p, "pin_mem")
        add_bool(p, "fp16", help="torch.amp autocast fp16 + GradScaler")
        add_bool(p, "bf16", help="torch.amp autocast bf16 (no scaler)")
        p.add_argument("--config", type=str, default=None, help="JSON config file")

    def _vsm_args(self) -> None:
        p = self.parser
        p.add_argument("--drop_svmr_prob", type=float, default=0)
        p.add_argument("--lw_neg_q", type=float, default=0)
        p.add_argument("--lw_neg_ctx", type=float, default=0)
        p.add_argument("--lw_st_ed", type=float, default=1)
        p.add_argument("--ranking_loss_type", default="hinge", choices=["hinge", "lse"])
        p.add_argument("--margin", type=float, default=0.1)
        p.add_argument("--hard_pool_size", type=int, nargs="+", default=[20])
        p.add_argument("--hard_neg_weights", type=float, nargs="+", default=[10])
        p.add_argument("--hard_negtiave_start_step", type=int, nargs="+", default=[10000],
                       help="(sic, upstream spelling) update at which each stage starts")
        p.add_argument("--train_span_start_step", type=int, default=-1)
        add_bool(p, "use_all_neg")

    def get_pretrain_args(self, argv=None):
        p = self.parser
        p.add_argument("--txt_db", type=str, default=None)
        p.add_argument("--img_db", type=str, default=None)
        p.add_argument("--targets_ratio", type=int, nargs="+", default=None)
        add_bool(p, "load_partial_pretrained")
        add_bool(p, "skip_layer_loading")
        p.add_argument("--mask_prob", type=float, default=0.15)
        self._vsm_args()
        opts = parse_with_config(p, argv)
        if not getattr(opts, "targets", None):
            raise ConfigError("pretraining needs 'targets' in the JSON config (--config)")
        if opts.targets_ratio is None:
            opts.targets_ratio = [1] * len(opts.targets)
        _check_hard_negative_lists(opts)
        return opts

    def _task_args(self, choices, default):
        self.parser.add_argument("--task", default=default, choices=choices)
        for key in ("sub_txt_db", "vfeat_db", "train_query_txt_db", "val_query_txt_db",
                    "test_query_txt_db"):
            self.parser.add_argument(f"--{key}", type=str, default=None)

    def get_vcmr_args(self, argv=None):
        p = self.parser
        self._task_args(["tvr", "didemo_video_sub", "how2r", "didemo_video_only"], "tvr")
        p.add_argument("--vcmr_eval_video_batch_size", type=int, default=40)
        p.add_argument("--vcmr_eval_q_batch_size", type=int, default=80)
        self._vsm_args()
        add_bool(p, "eval_with_query_type")
        p.add_argument("--max_before_nms", type=int, default=200)
        p.add_argument("--max_after_nms", type=int, default=100)
        add_bool(p, "distributed_eval")
        p.add_argument("--nms_thd", type=float, default=0.5)
        p.add_argument("--q2c_alpha", type=float, default=20)
        p.add_argument("--max_vcmr_video", type=int, default=100)
        p.add_argument("--full_eval_tasks", type=str, nargs="+",
                       choices=["VCMR", "SVMR", "VR"], default=["VCMR", "SVMR", "VR"])
        p.add_argument("--min_pred_l", type=int, default=2)
        p.add_argument("--max_pred_l", type=int, default=16)
        p.add_argument("--max_vr_video", type=int, default=100)
        p.add_argument("--vr_eval_video_batch_size", type=int, default=40)
        p.add_argument("--vr_eval_q_batch_size", type=int, default=80)
        opts = parse_with_config(p, argv)
        _check_hard_negative_lists(opts)
        return opts

    def get_vr_args(self, argv=None):
        """Upstream's train_vr uses the VCMR parser (training.md §4.3); so does this one."""
        return self.get_vcmr_args(argv)

    def get_videoQA_args(self, argv=None):  # noqa: N802 - upstream name
        self._task_args(["tvqa", "how2qa"], "tvqa")
        self.parser.add_argument("--lw_st_ed", type=float, default=1)
        return parse_with_config(self.parser, argv)

    def get_violin_args(self, argv=None):
        self._task_args(["violin"], "violin")
        return parse_with_config(self.parser, argv)


def _check_hard_negative_lists(opts) -> None:
    if len(opts.hard_negtiave_start_step) != len(opts.hard_neg_weights):
        raise ConfigError(
            f"hard_negtiave_start_step {opts.hard_negtiave_start_step} and hard_neg_weights "
            f"{opts.hard_neg_weights} must have the same length")


def explicit_flags(argv) -> set:
    """Flag names given on the command line (``--no-x``/``--no_x`` count as ``x``)."""
    names = set()
    for tok in argv:
        if not tok.startswith("--"):
            continue
        name = tok[2:].split("=", 1)[0]
        names.add(name)
        for prefix in ("no-", "no_"):
            if name.startswith(prefix):
                names.add(name[len(prefix):])
    return names


def load_json_config(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return cfg


def parse_with_config(parser, argv=None):
    """Parse ``argv`` then overlay the ``--config`` JSON on every non-explicit key."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.config is not None:
        cfg = load_json_config(args.config)
        explicit = explicit_flags(argv)
        actions = {a.dest: a for a in parser._actions}
        unknown = sorted(k for k in cfg if k not in actions)
        if unknown:
            LOGGER.info("%s: keys not declared by this script, kept as-is: %s",
                        args.config, ", ".join(unknown))
        for key, value in cfg.items():
            if key in explicit:
                continue
            if key in actions:
                _check_type(args.config, key, value, actions[key])
            setattr(args, key, value)
    del args.config
    accum = getattr(args, "gradient_accumulation_steps", 1)
    if accum < 1:
        raise ConfigError(f"gradient_accumulation_steps must be >= 1, got {accum}")
    return args


def _kind_ok(value, typ) -> bool:
    if value is None:
        return True
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is str:
        return isinstance(value, str)
    return True


def _check_type(path, key, value, action) -> None:
    """Refuse a JSON value whose kind cannot be what the flag declares."""
    if isinstance(action, (BoolFlag, argparse._StoreTrueAction)):
        ok = isinstance(value, bool)
        expected = "a boolean"
    elif action.nargs in ("+", "*"):
        ok = isinstance(value, list) and all(_kind_ok(v, action.type) for v in value)
        expected = f"a list of {getattr(action.type, '__name__', 'values')}"
    else:
        ok = _kind_ok(value, action.type)
        expected = getattr(action.type, "__name__", "a value")
    if not ok:
        raise ConfigError(f"{path}: key '{key}' expects {expected}, got {value!r}")
