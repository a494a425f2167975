"""Finite-value checks behind the engine's rule "nothing non-finite is applied or saved"
(issue 13 item 3)."""
from __future__ import annotations

from pathlib import Path

import torch

from utils.save import latest_training_state


def non_finite_tensors(model, optimizer=None) -> list:
    """Names of the parameters (and optimizer moments) holding NaN/inf; one device sync."""
    named = dict(model.named_parameters())
    if optimizer is not None:
        for i, state in enumerate(optimizer.state.values()):
            named.update({f"optimizer state {i} {k}": v for k, v in state.items()
                          if torch.is_tensor(v) and v.is_floating_point()})
    if not named:
        return []
    flags = torch.stack([torch.isfinite(t).all() for t in named.values()]).tolist()
    return [k for k, ok in zip(named, flags) if not ok]


def newest_good_files(ckpt_dir) -> str:
    """The newest training state and model checkpoint in ``ckpt_dir``, for error messages
    (only finite ones are ever written, so these are good)."""
    ckpt = Path(ckpt_dir)
    state = latest_training_state(ckpt) if ckpt.is_dir() else None
    models = sorted(ckpt.glob("model_step_*.pt"), key=lambda p: p.stat().st_mtime)
    return (f"newest good training state: {state or 'none'}; newest model checkpoint: "
            f"{models[-1] if models else 'none'}")
