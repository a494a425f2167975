"""Upstream's AdamW (the 2019 HuggingFace variant), vectorised over parameters.

The update differs from ``torch.optim.AdamW`` in two ways that change numbers
(training.md §3.4, P12): eps is added to ``sqrt(v)`` *outside* the bias correction (the bias
correction is folded into the step size), and the decoupled weight decay is applied *after*
the Adam update, to the already-updated weights. Default eps is 1e-6 as upstream builds it.

``foreach=True`` (default) runs the maths with ``torch._foreach_*`` kernels over all parameters
of a group that share a step count; ``foreach=False`` is the plain per-parameter reference
loop, kept so tests can check the fast path against it.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch.optim import Optimizer


class AdamW(Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 correct_bias=True, foreach=True):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if eps < 0:
            raise ValueError(f"invalid eps {eps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        correct_bias=correct_bias)
        super().__init__(params, defaults)
        self.foreach = foreach

    def _init_state(self, p):
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        return state

    @staticmethod
    def _step_size(group, step):
        b1, b2 = group["betas"]
        if not group["correct_bias"]:
            return group["lr"]
        return group["lr"] * math.sqrt(1.0 - b2 ** step) / (1.0 - b1 ** step)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("AdamW does not support sparse gradients")
            by_step = defaultdict(list)
            for p in params:
                by_step[self._init_state(p)["step"]].append(p)
            for step, ps in by_step.items():
                if self.foreach:
                    self._update_foreach(group, step, ps)
                else:
                    for p in ps:
                        self._update_one(group, step, p)
        return loss

    def _update_one(self, group, step, p):
        """Reference: the update written out for one parameter."""
        b1, b2 = group["betas"]
        state = self.state[p]
        m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
        m.mul_(b1).add_(g, alpha=1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        denom = v.sqrt().add_(group["eps"])
        p.addcdiv_(m, denom, value=-self._step_size(group, step))
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    def _update_foreach(self, group, step, ps):
        b1, b2 = group["betas"]
        grads = [p.grad for p in ps]
        ms = [self.state[p]["exp_avg"] for p in ps]
        vs = [self.state[p]["exp_avg_sq"] for p in ps]
        torch._foreach_mul_(ms, b1)
        torch._foreach_add_(ms, grads, alpha=1.0 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, value=1.0 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(ps, ms, denom, value=-self._step_size(group, step))
        if group["weight_decay"] > 0.0:
            torch._foreach_add_(ps, ps, alpha=-group["lr"] * group["weight_decay"])
