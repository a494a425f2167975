"""Optimizer construction with upstream's four parameter groups (training.md §3.4).

Groups, in order: (0) outside ``v_encoder``, decayed; (1) outside, not decayed; (2) inside
``v_encoder``, decayed; (3) inside, not decayed. "Not decayed" is a *substring* match on
``bias`` / ``LayerNorm.bias`` / ``LayerNorm.weight``, so ``img_LayerNorm.weight`` is not
decayed while ``feat_regress.net.2.weight`` (a LayerNorm named by index) is, exactly as
upstream. Tied parameters appear once (``named_parameters`` de-duplicates them).

``optim`` choices: ``adamw`` (upstream's update, :mod:`optim.adamw`), ``adam`` / ``adamax``
(torch classes with torch defaults, as upstream), and ``adamw_torch``: ``torch.optim.AdamW``
(fused kernel on CUDA) — faster, but eps sits inside the bias correction and decay comes
first, so numbers differ slightly from upstream's.
"""
from __future__ import annotations

import torch

from optim.adamw import AdamW

NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")


def param_groups(model, learning_rate: float, weight_decay: float, lr_mul: float = 1.0):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    top = [(n, p) for n, p in named if "v_encoder" not in n]
    enc = [(n, p) for n, p in named if "v_encoder" in n]

    def split(items, lr):
        decay = [p for n, p in items if not any(nd in n for nd in NO_DECAY)]
        no_decay = [p for n, p in items if any(nd in n for nd in NO_DECAY)]
        return [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                {"params": no_decay, "lr": lr, "weight_decay": 0.0}]

    return split(top, lr_mul * learning_rate) + split(enc, learning_rate)


def build_optimizer(model, opts):
    groups = param_groups(model, opts.learning_rate, opts.weight_decay,
                          getattr(opts, "lr_mul", 1.0))
    betas = tuple(opts.betas)
    if opts.optim == "adamw":
        return AdamW(groups, lr=opts.learning_rate, betas=betas)
    if opts.optim == "adamw_torch":
        fused = torch.cuda.is_available()
        return torch.optim.AdamW(groups, lr=opts.learning_rate, betas=betas, fused=fused)
    if opts.optim == "adam":
        return torch.optim.Adam(groups, lr=opts.learning_rate, betas=betas)
    if opts.optim == "adamax":
        return torch.optim.Adamax(groups, lr=opts.learning_rate, betas=betas)
    raise ValueError(f"--optim {opts.optim!r} is not one of adam, adamax, adamw, adamw_torch")
