"""Shared plumbing of the evaluation scripts (training.md §1.4).

Every eval script (``eval_vcmr.py``, ``eval_vr.py``, ``eval_videoQA.py``, ``eval_violin.py``)
reads the training run's ``{output_dir}/log/hps.json`` (model hyper-parameters) and
``log/model_config.json`` (architecture), resolves ``--checkpoint`` as a file path or a step,
checks that ``--split`` occurs in the query DB path, builds the task model with
``max_frm_seq_len`` taken from the checkpoint (the key must be present, as upstream asserts),
dropout off, eval mode, and writes its results JSON atomically.

The checkpoint is loaded strictly (issue 13): every learned weight of the task model must be in
it, since a missing head would stay at random init and its score would be written as a result.
A checkpoint of another task, a pretrained one, a training state, a file that is not a state
dict, or a tensor of another shape is an :class:`EvalSetupError` naming the file and what to pass.

Decisions:
- ``vfeat_dim`` is read from the checkpoint's ``img_linear`` weight when present (4352 for the
  released features), so models trained on other feature sizes evaluate without a flag.
- ``--fp16``/``--bf16`` use ``torch.autocast`` on fp32 weights instead of apex O2 fp16 weights
  (training.md §8 q3).
- The results file name uses the step when ``--checkpoint`` is a step (as upstream), and the
  file stem (e.g. ``model_step_4800``) when it is a path, so a path never creates folders.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from model.layers import set_dropout
from model.model import FRAME_POS_KEY, VFEAT_DIM, MissingWeightsError, WeightShapeError
from utils.errors import HeroError
from utils.save import atomic_write_text, load_checkpoint_file

LOGGER = logging.getLogger(__name__)
IMG_LINEAR_KEY = "v_encoder.f_encoder.img_embeddings.img_linear.weight"
# task model -> (task, the script that fine-tunes it, a key prefix only its checkpoints hold)
TASKS = {"HeroForVideoQA": ("TVQA / How2QA", "train_videoQA.py", "qa_pred_head."),
         "HeroForViolin": ("VIOLIN", "train_violin.py", "violin_pred_head."),
         "HeroForTvc": ("TVC", "train_tvc.py", "decoder."),
         "HeroForVcmr": ("VCMR (TVR / How2R / DiDeMo)", "train_vcmr.py", "video_query_linear."),
         "HeroForVr": ("VR (MSR-VTT)", "train_vr.py", "video_query_linear.")}
# head key prefix -> the kind of checkpoint holding it (model.md §11.3)
CHECKPOINT_KINDS = {"qa_pred_head.": "TVQA / How2QA", "violin_pred_head.": "VIOLIN",
                    "decoder.": "TVC", "video_query_linear.": "VCMR / VR or pretraining"}


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode inside, the previous train/eval mode restored after (training loops call
    validation mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class EvalSetupError(HeroError, ValueError):
    """An evaluation input (run folder, checkpoint, split, DB path) is missing or inconsistent."""


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise EvalSetupError(f"{what} not found: {path} (is --output_dir the training run "
                             "folder holding log/hps.json and log/model_config.json?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EvalSetupError(f"{what} {path} is not valid JSON: {exc}") from exc


def load_hps(output_dir) -> SimpleNamespace:
    """``{output_dir}/log/hps.json`` as a namespace (upstream's ``Struct``)."""
    hps = _read_json(Path(output_dir) / "log" / "hps.json", "hps.json")
    if not isinstance(hps, dict):
        raise EvalSetupError(f"{Path(output_dir) / 'log' / 'hps.json'} must hold a JSON object")
    return SimpleNamespace(**hps)


def load_model_config(output_dir) -> dict:
    """``{output_dir}/log/model_config.json`` (f_config / c_config / q_config [/ d_config])."""
    path = Path(output_dir) / "log" / "model_config.json"
    cfg = _read_json(path, "model_config.json")
    if not isinstance(cfg, dict) or "f_config" not in cfg:
        raise EvalSetupError(f"{path} is not a HERO model config (no 'f_config' key)")
    return cfg


def require_hps(hps, keys, output_dir="") -> None:
    """Raise naming every key of ``keys`` that hps.json lacks."""
    missing = [k for k in keys if not hasattr(hps, k)]
    if missing:
        raise EvalSetupError(f"{Path(output_dir) / 'log' / 'hps.json'} lacks {missing}; "
                             "was the run trained with this task's script?")


def resolve_checkpoint(checkpoint, output_dir) -> Path:
    """``--checkpoint`` as an existing path, else a step: ``ckpt/model_step_{N}.pt``."""
    if checkpoint is None:
        raise EvalSetupError("--checkpoint is required (a file path or a step number)")
    path = Path(str(checkpoint))
    if path.is_dir():
        raise EvalSetupError(f"--checkpoint {checkpoint!r} is a folder; pass a model checkpoint "
                             "file (ckpt/model_step_N.pt) or a step number")
    if path.exists():
        return path
    step_path = Path(output_dir) / "ckpt" / f"model_step_{checkpoint}.pt"
    if not step_path.is_file():
        raise EvalSetupError(f"--checkpoint {checkpoint!r} is neither an existing file nor a "
                             f"step with a checkpoint at {step_path}")
    return step_path


def checkpoint_tag(checkpoint) -> str:
    """Name used in result files: the step as given, or the stem of a checkpoint path."""
    text = str(checkpoint)
    if os.sep in text or text.endswith(".pt") or Path(text).exists():
        return Path(text).stem
    return text


def check_split(split: str, query_txt_db) -> None:
    """Upstream asserts ``split in query_txt_db``; the error says which flag to fix."""
    if split not in str(query_txt_db):
        raise EvalSetupError(f"--split {split!r} does not occur in --query_txt_db "
                             f"{query_txt_db!r}; pass the query DB of that split")


def get_device(device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def read_model_checkpoint(path: Path) -> dict:
    """The model state dict in ``path``; anything else is refused naming the file."""
    state_dict = load_checkpoint_file(path)
    if not isinstance(state_dict, dict):
        raise EvalSetupError(f"{path} holds a {type(state_dict).__name__}, not a model state "
                             "dict; pass a model checkpoint (ckpt/model_step_N.pt of a run)")
    if "global_step" in state_dict and "rng" in state_dict:
        raise EvalSetupError(f"{path} is a training state (what --resume reads), not model "
                             "weights; pass the model checkpoint ckpt/model_step_N.pt")
    if not torch.is_tensor(state_dict.get(FRAME_POS_KEY)):
        raise EvalSetupError(f"{path} has no {FRAME_POS_KEY}; evaluation takes "
                             "max_frm_seq_len from it (training.md P20). Is it a HERO "
                             "model checkpoint? Pass ckpt/model_step_N.pt of a training run")
    return state_dict


def checkpoint_kind(state_dict) -> str | None:
    """The head key prefix of a checkpoint (a ``CHECKPOINT_KINDS`` key), None if it has none."""
    for prefix in CHECKPOINT_KINDS:
        if any(str(k).startswith(prefix) for k in state_dict):
            return prefix
    return None


def missing_weights_message(model_cls, ckpt_path, state_dict, missing) -> str:
    """One message: the file, the missing keys (short list + count), what it is, what to do."""
    task, script, head = TASKS.get(model_cls.__name__,
                                   (model_cls.__name__, "its training script", None))
    shown = ", ".join(missing[:6]) + (f", ... (+{len(missing) - 6} more)"
                                      if len(missing) > 6 else "")
    kind = checkpoint_kind(state_dict)
    guess = (f"It looks like a checkpoint of {CHECKPOINT_KINDS[kind]}" if kind not in (None, head)
             else "It may be a checkpoint of another task or model config")
    return (f"{ckpt_path} lacks {len(missing)} weight(s) that {model_cls.__name__} needs "
            f"({shown}): they would stay at random init, so the model is not evaluated. "
            f"{guess}: pass a checkpoint fine-tuned for {task} (ckpt/model_step_N.pt of a "
            f"{script} run)")


def load_eval_weights(model_cls, output_dir, ckpt_path, state_dict, **kwargs):
    """``model_cls`` from the run's model_config.json with every weight from the checkpoint
    (strict: ``allowed_missing=()``; only training starts a head at random init)."""
    config = load_model_config(output_dir)
    try:
        return model_cls.from_pretrained(config, state_dict, allowed_missing=(),
                                         source=str(ckpt_path), **kwargs)
    except MissingWeightsError as exc:
        raise EvalSetupError(missing_weights_message(model_cls, ckpt_path, state_dict,
                                                     exc.missing)) from exc
    except WeightShapeError as exc:
        raise EvalSetupError(f"{exc}\nThe checkpoint does not fit the model of "
                             f"{Path(output_dir) / 'log' / 'model_config.json'}: pass a "
                             "checkpoint of this run, or as --output_dir the run that wrote "
                             "it") from exc


def build_eval_model(model_cls, output_dir, checkpoint, device=None, **model_kwargs):
    """Load ``checkpoint`` into ``model_cls`` built from the run's model_config.json.

    ``max_frm_seq_len`` comes from the checkpoint's frame position table (required); every
    weight must be present (:func:`load_eval_weights`). Dropout is set to 0 and the model is
    put in eval mode on ``device``. Returns ``(model, ckpt_path)``.
    """
    ckpt_path = resolve_checkpoint(checkpoint, output_dir)
    state_dict = read_model_checkpoint(ckpt_path)
    max_frm_seq_len = int(state_dict[FRAME_POS_KEY].shape[0])
    img_linear = state_dict.get(IMG_LINEAR_KEY)
    vfeat_dim = int(img_linear.shape[1]) if torch.is_tensor(img_linear) else VFEAT_DIM
    model = load_eval_weights(model_cls, output_dir, ckpt_path, state_dict, vfeat_dim=vfeat_dim,
                              max_frm_seq_len=max_frm_seq_len, **model_kwargs)
    set_dropout(model, 0.0)
    model.to(get_device(device)).eval()
    LOGGER.info("loaded %s from %s (max_frm_seq_len %d)", model_cls.__name__, ckpt_path,
                max_frm_seq_len)
    return model, ckpt_path


def autocast(device, fp16: bool = False, bf16: bool = False):
    """``torch.autocast`` for ``--fp16``/``--bf16`` (fp16 wins if both), else a no-op."""
    if not (fp16 or bf16):
        return contextlib.nullcontext()
    device = torch.device(device) if not isinstance(device, torch.device) else device
    return torch.autocast(device.type, dtype=torch.float16 if fp16 else torch.bfloat16)


def write_json_atomic(path, obj, indent=None) -> Path:
    """Write ``obj`` as JSON via a temporary file + rename (no half-written results)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(obj, indent=indent))
    return path


def results_file(output_dir, split: str, checkpoint, suffix: str = "all") -> Path:
    """``{output_dir}/results_{split}/results_{checkpoint}_{suffix}.json``."""
    return (Path(output_dir) / f"results_{split}"
            / f"results_{checkpoint_tag(checkpoint)}_{suffix}.json")


def init_distributed():
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1); returns the
    device of this rank. Single-process runs need nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return get_device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
