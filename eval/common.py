"""Shared plumbing of the evaluation scripts (training.md §1.4).

Every eval script (``eval_vcmr.py``, ``eval_vr.py``, ``eval_videoQA.py``, ``eval_violin.py``)
reads the training run's ``{output_dir}/log/hps.json`` (model hyper-parameters) and
``log/model_config.json`` (architecture), resolves ``--checkpoint`` as a file path or a step,
checks that ``--split`` occurs in the query DB path, builds the task model with
``max_frm_seq_len`` taken from the checkpoint (the key must be present, as upstream asserts),
dropout off, eval mode, and writes its results JSON atomically.

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
from model.model import FRAME_POS_KEY, VFEAT_DIM
from utils.save import atomic_write_text, load_checkpoint_file

LOGGER = logging.getLogger(__name__)
IMG_LINEAR_KEY = "v_encoder.f_encoder.img_embeddings.img_linear.weight"


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


class EvalSetupError(ValueError):
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


def build_eval_model(model_cls, output_dir, checkpoint, device=None, **model_kwargs):
    """Load ``checkpoint`` into ``model_cls`` built from the run's model_config.json.

    ``max_frm_seq_len`` comes from the checkpoint's frame position table (required). Dropout is
    set to 0 and the model is put in eval mode on ``device``. Returns ``(model, ckpt_path)``.
    """
    ckpt_path = resolve_checkpoint(checkpoint, output_dir)
    state_dict = load_checkpoint_file(ckpt_path)
    if not isinstance(state_dict, dict) or FRAME_POS_KEY not in state_dict:
        raise EvalSetupError(f"{ckpt_path} has no {FRAME_POS_KEY}; evaluation takes "
                             "max_frm_seq_len from it (training.md P20). Is it a model "
                             "checkpoint (ckpt/model_step_N.pt), not a training state?")
    max_frm_seq_len = int(state_dict[FRAME_POS_KEY].shape[0])
    img_linear = state_dict.get(IMG_LINEAR_KEY)
    vfeat_dim = int(img_linear.shape[1]) if torch.is_tensor(img_linear) else VFEAT_DIM
    model = model_cls.from_pretrained(load_model_config(output_dir), state_dict,
                                      vfeat_dim=vfeat_dim, max_frm_seq_len=max_frm_seq_len,
                                      **model_kwargs)
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
