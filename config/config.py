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
  (training.md §8 question 8) with the defaults the released configs rely on;
* (issue 13) a JSON key that is not an option but close to one (``learnig_rate``) is refused
  with a "did you mean" instead of being kept; the other undeclared keys are kept as upstream
  and reported by :func:`config_warnings`, which the engine logs at WARNING once ``log.txt`` is
  open. Known upstream leftovers (``rank``, ``vcmr_eval_batch_size``, training.md P1) are never
  typos; keys a script reads from JSON only (pre-training's ``targets``) are not warned about;
* command-line flags must be spelt in full (no argparse prefix abbreviations): an abbreviation
  such as ``--learning 1`` is not seen by the CLI-beats-JSON rule (the JSON value would win
  silently), and a prefix that is unique today becomes ambiguous when a flag is added. An
  unknown flag is refused with the closest flag suggested;
* where each option came from (flag, JSON file, default) is kept on the parsed namespace outside
  ``vars(opts)`` (so ``hps.json`` and the resume comparison are unchanged), for error messages:
  :func:`check_required_keys`, :func:`describe_origin`.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from utils.errors import HeroError

TYPO_CUTOFF = 0.85  # difflib ratio; released keys and other scripts' options stay below it
UPSTREAM_INERT_KEYS = ("rank", "vcmr_eval_batch_size")  # set by the released configs, never read


class ConfigError(HeroError, ValueError):
    """A configuration value is missing, malformed, or inconsistent."""


@dataclass(frozen=True)
class ConfigOrigin:
    """Where the options of one parse came from (kept for messages, not saved)."""

    path: str | None  # the --config file, None when not given
    json_keys: frozenset = frozenset()  # keys of that file
    explicit: frozenset = frozenset()  # flag names given on the command line
    undeclared: tuple = ()  # JSON keys that are not options and not read by the script
    flags: frozenset = frozenset()  # the options the script declares


class Options(argparse.Namespace):
    """The parsed options; ``_origin`` is a slot, so it is not in ``vars(opts)``/hps.json."""

    __slots__ = ("_origin",)


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
        self.parser = argparse.ArgumentParser(description=desc, allow_abbrev=False)
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
        p.add_argument("--virtual_world_size", type=int, default=None,
                       help="compute what this many ranks would (each process plays N/W "
                       "of them, one after another); default: the number of processes")
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
        opts = parse_with_config(p, argv, json_only=("targets",))
        check_required_keys(opts, ("targets",))  # the corpora and tasks; JSON only, as upstream
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


def parse_with_config(parser, argv=None, json_only=()):
    """Parse ``argv`` then overlay the ``--config`` JSON on every non-explicit key.

    ``json_only``: undeclared keys the script reads from the JSON (kept without a warning).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser.allow_abbrev = False  # see the module doc: abbreviations defeat CLI-beats-JSON
    args, extra = parser.parse_known_args(argv, namespace=Options())
    if extra:
        parser.error(unrecognized_message(parser, extra))
    explicit, path = explicit_flags(argv), args.config
    cfg = load_json_config(path) if path is not None else {}
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    undeclared = _undeclared_keys(path, cfg, actions, json_only)
    for key, value in cfg.items():
        if key in explicit:
            continue
        if key in actions:
            _check_type(path, key, value, actions[key])
        setattr(args, key, value)
    del args.config
    args._origin = ConfigOrigin(path, frozenset(cfg), frozenset(explicit),
                                tuple(k for k in undeclared if k not in json_only),
                                frozenset(actions))
    accum = getattr(args, "gradient_accumulation_steps", 1)
    if accum < 1:
        raise ConfigError(f"gradient_accumulation_steps must be >= 1, got {accum}")
    return args


def unrecognized_message(parser, extra) -> str:
    """argparse's "unrecognized arguments", with the closest declared flag for each."""
    flags = [o[2:] for a in parser._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for tok in extra:
        name = tok[2:].split("=", 1)[0] if tok.startswith("--") else ""
        match = [f for f in flags if name and f.startswith(name)][:3] or \
            difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
        if match:
            hints.append(f"{tok.split('=', 1)[0]}: did you mean "
                         + " or ".join(f"--{m}" for m in match) + "?")
    msg = "unrecognized arguments: " + " ".join(extra)
    return msg + ("; " + "; ".join(hints) + " (flags must be spelt in full)" if hints else "")


def _typo_of(key: str, declared) -> str | None:
    """The declared option ``key`` is most likely a misspelling of, if any (issue 13)."""
    if key in UPSTREAM_INERT_KEYS:
        return None
    lower = {d.lower(): d for d in declared}
    match = difflib.get_close_matches(key.lower(), list(lower), n=1, cutoff=TYPO_CUTOFF)
    if match:
        return lower[match[0]]
    for d in declared:  # two neighbouring letters swapped ("tsak"), missed by the ratio
        diff = [i for i, (a, b) in enumerate(zip(key, d)) if a != b]
        if len(key) == len(d) and len(diff) == 2 and diff[1] == diff[0] + 1 \
                and key[diff[0]] == d[diff[1]] and key[diff[1]] == d[diff[0]]:
            return d
    return None


def _undeclared_keys(path, cfg: dict, actions: dict, json_only=()) -> list:
    """JSON keys that are not options; one that looks like a misspelt option is refused."""
    undeclared = sorted(k for k in cfg if k not in actions)
    typos = {key: _typo_of(key, actions) for key in undeclared if key not in json_only}
    found = [f"key '{key}' is not an option of this script; did you mean '{typo}'?"
             for key, typo in typos.items() if typo]
    if found:
        raise ConfigError(f"{path}: {' '.join(found)} Correct the key in {path}" if
                          len(found) == 1 else f"{path}: {' '.join(found)} Correct the keys "
                          f"in {path}")
    return undeclared


def config_origin(opts) -> ConfigOrigin:
    """The :class:`ConfigOrigin` of ``opts``; an empty one for options not parsed here."""
    return getattr(opts, "_origin", None) or ConfigOrigin(None)


def config_warnings(opts) -> list:
    """Messages about the parse worth a WARNING in the run's log (issue 13): the JSON keys that
    are not options of the script, kept as attributes as upstream does."""
    origin = config_origin(opts)
    if not origin.undeclared:
        return []
    inert = [k for k in origin.undeclared if k in UPSTREAM_INERT_KEYS]
    note = f" ({', '.join(inert)}: set by the released configs but read by no script)" \
        if inert else ""
    return [f"{origin.path}: key(s) not declared by this script, kept but not read by it: "
            f"{', '.join(origin.undeclared)}{note}; check the spelling if one was meant to "
            "set an option"]


def describe_origin(opts, key: str) -> str:
    """Where ``key`` (or the option ``targets[tv].vfeat_db`` is built from) was set: ``from
    --key``, ``from key 'key' of FILE``, ``default of --key``, or "" when not known."""
    origin, base = config_origin(opts), key.split("[", 1)[0].split(".", 1)[0]
    if base in origin.explicit:
        return f"from --{base}"
    if base in origin.json_keys:
        return f"from key '{base}' of {origin.path}"
    return f"default of --{base}" if base in origin.flags else ""


def check_required_keys(opts, keys) -> None:
    """Raise one :class:`ConfigError` naming every key of ``keys`` that is missing, null or
    empty, the config file, and how to set it (issue 13)."""
    missing = [k for k in keys if getattr(opts, k, None) in (None, "", [])]
    if not missing:
        return
    origin = config_origin(opts)
    causes = {}
    for k in missing:
        cause = "empty" if k in origin.explicit else "null" if k in origin.json_keys \
            else "missing"
        causes.setdefault(cause, []).append(f"'{k}'")
    if len(missing) == 1:
        what, them = f"required key {missing[0]!r} is {next(iter(causes))}", "it"
    else:
        what, them = "required keys not set (" + "; ".join(
            f"{cause}: {', '.join(keys)}" for cause, keys in causes.items()) + ")", "them"
    flags = " ".join(f"--{k} VALUE" for k in missing if k in origin.flags)
    cli = f" or pass {flags}" if flags else ""
    if origin.path is None:
        raise ConfigError(f"no --config given: {what}; pass a --config JSON file that sets "
                          f"{them}{cli}")
    hint = (f" (its keys {', '.join(origin.undeclared)} are not options of this script)"
            if origin.undeclared else "")
    raise ConfigError(f"{origin.path}: {what}{hint}; set {them} in {origin.path}{cli}")


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
