"""Checkpoints, training state and run metadata (training.md §3.10).

* ``ckpt/model_step_<N>.pt``: the model's ``state_dict()`` on CPU plus ``vocab_padded``, the
  layout upstream's evaluation scripts and released checkpoints use. Tensors are saved in the
  model's dtype (fp32 here, where upstream's apex O2 saved fp16); loaders cast either way.
* ``ckpt/train_state_<N>.pt``: what ``--resume`` needs to continue bit-for-bit: optimizer,
  grad scalers, step, meters, data position and the RNG states of *every* rank (upstream's
  ``restore.pt`` kept fp16 copies and no RNG or data position, so its resume was lossy).

Every file is written atomically (temporary file in the same folder, fsync, rename), so a
killed process leaves either the old file or the new one. A failed write (disk full, I/O error,
permission) removes its partial file and raises "cannot write PATH: REASON", earlier files
untouched (issue 13 item 6). A file that cannot be read is refused with its path named.
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from utils.distributed import all_gather_object, get_rank
from utils.errors import HeroError

MODEL_CKPT_RE = re.compile(r"model_step_(\d+)\.pt$")
STATE_RE = re.compile(r"train_state_(\d+)\.pt$")


class CheckpointError(HeroError, RuntimeError):
    """A checkpoint or training-state file is missing, truncated, not what was expected, or
    cannot be written (disk full, I/O error, permission)."""


class _ErrorKeepingWriter:
    """A file wrapper that remembers the first ``OSError`` of a write.

    Why: ``torch.save`` turns a failed ``write`` (ENOSPC, EIO, EFBIG ...) into its own
    ``RuntimeError("... inline_container.cc ... unexpected pos")``, losing the errno; the real
    cause is kept here so the message can say "No space left on device".
    """

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data):
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self):
        self.fh.flush()


def _atomic_write(path, write, mode: str) -> None:
    """``write(file)`` into a temporary file in the target folder, fsync, rename over ``path``.

    A failure leaves ``path`` (and every other file) as it was, removes the partial temporary
    file and raises :class:`CheckpointError` naming ``path`` and the OS's reason.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode) as fh:
            writer = _ErrorKeepingWriter(fh)
            try:
                write(writer)
                fh.flush()
                os.fsync(fh.fileno())
            except (OSError, RuntimeError):
                if writer.error is None:
                    raise
                raise writer.error from None
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except RuntimeError as exc:
        raise CheckpointError(f"cannot write {path}: {exc}") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_torch_save(obj, path) -> None:
    _atomic_write(path, lambda fh: torch.save(obj, fh), "wb")


def atomic_write_text(path, text: str) -> None:
    _atomic_write(path, lambda fh: fh.write(text), "w")


def load_checkpoint_file(path, map_location="cpu"):
    """``torch.load`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path attached
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): "
                              f"{exc}") from exc


def model_state_for_saving(model) -> dict:
    """CPU state dict + upstream's ``vocab_padded`` flag."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    vocab = [v for k, v in state.items()
             if "word_embeddings.weight" in k or k.endswith("decoder.weight")]
    state["vocab_padded"] = bool(vocab) and all(v.size(0) % 8 == 0 for v in vocab)
    return state


class ModelSaver:
    """Writes ``<output_dir>/ckpt/model_step_<N>[suffix].pt`` on rank 0."""

    def __init__(self, ckpt_dir):
        self.ckpt_dir = Path(ckpt_dir)

    def save(self, model, step: int, suffix: str = "") -> Path | None:
        path = self.ckpt_dir / f"model_step_{step}{suffix}.pt"
        if get_rank() == 0:
            atomic_torch_save(model_state_for_saving(model), path)
        return path


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(ckpt_dir, step: int, state: dict, local_rngs=None) -> Path:
    """Gather every rank's RNG state, then rank 0 writes ``train_state_<step>.pt``.

    ``local_rngs``: the states of the virtual ranks this process plays (default: its own);
    ``rng`` is saved as one list in global (virtual) rank order."""
    local = [rng_state()] if local_rngs is None else list(local_rngs)
    rngs = [s for part in all_gather_object(local) for s in part]
    path = Path(ckpt_dir) / f"train_state_{step}.pt"
    if get_rank() == 0:
        atomic_torch_save({**state, "global_step": step, "rng": rngs}, path)
    return path


def latest_training_state(ckpt_dir) -> Path | None:
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("train_state_*.pt")
             if (m := STATE_RE.search(p.name))]
    return max(found)[1] if found else None


def load_training_state(path, world_size: int, rank: int, per_rank: int = 1) -> dict:
    """The state; ``rng_local`` holds the RNG states of ranks ``rank .. rank + per_rank - 1``
    of ``world_size`` (virtual ranks with ``--virtual_world_size``), ``rng_this_rank`` the
    first of them."""
    try:
        state = load_checkpoint_file(path)
    except CheckpointError as exc:  # e.g. a run folder copied in part
        raise CheckpointError(f"{exc}. Move it out of {Path(path).parent} to resume from the "
                              "previous training state there, or start over with --overwrite"
                              ) from exc
    if not isinstance(state, dict) or "global_step" not in state or "rng" not in state:
        raise CheckpointError(f"{path} is not a training-state file (no global_step/rng)")
    if len(state["rng"]) != world_size:
        raise CheckpointError(f"{path} was written by {len(state['rng'])} ranks; this run has "
                              f"{world_size}. Resume with the same number of processes (and "
                              "--virtual_world_size).")
    state["rng_local"] = state["rng"][rank:rank + per_rank]
    state["rng_this_rank"] = state["rng_local"][0]
    return state


def git_info(repo_dir=".") -> dict:
    def run(*args):
        return subprocess.run(["git", *args], cwd=repo_dir, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        status = run("status", "--porcelain")
        return {"branch": run("rev-parse", "--abbrev-ref", "HEAD"), "is_dirty": bool(status),
                "status": status, "sha": run("rev-parse", "HEAD")}
    except (OSError, subprocess.SubprocessError):
        return {"error": "git unavailable"}


def save_training_meta(opts, output_dir) -> None:
    """Rank 0: ``log/hps.json`` (all options), ``log/model_config.json``, ``log/git_info.json``."""
    if get_rank() != 0:
        return
    log_dir = Path(output_dir) / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(log_dir / "hps.json", json.dumps(vars(opts), indent=4, default=str))
    model_config = getattr(opts, "model_config", None)
    if model_config:
        cfg = json.loads(Path(model_config).read_text())
        atomic_write_text(log_dir / "model_config.json", json.dumps(cfg, indent=4))
    atomic_write_text(log_dir / "git_info.json", json.dumps(git_info(), indent=4))
