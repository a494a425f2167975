"""Learning-rate schedule (training.md §3.5): linear warm-up then linear decay.

``global_step`` is incremented *before* the rate is computed, so the first update uses step 1
and starts at ``learning_rate / warmup_steps`` (not 0); a non-positive rate becomes 1e-8.
"""
from __future__ import annotations

MIN_LR = 1e-8


def warmup_linear(step: int, warmup_steps: int, total_steps: int) -> float:
    """Upstream's factor, except that ``warmup_steps == total_steps`` (where upstream divides
    by zero) has an empty decay: 0 from the last warm-up step on, so the final update gets the
    1e-8 floor as in every other run."""
    if step < warmup_steps:
        return step / warmup_steps
    if total_steps == warmup_steps:
        return 0.0
    return max(0.0, (total_steps - step) / (total_steps - warmup_steps))


def get_lr_sched(global_step: int, opts) -> float:
    lr = opts.learning_rate * warmup_linear(global_step, opts.warmup_steps,
                                            opts.num_train_steps)
    return MIN_LR if lr <= 0 else lr


def set_lr(optimizer, lr: float, lr_mul: float = 1.0) -> None:
    """Groups 0-1 (task heads, outside ``v_encoder``) get ``lr × lr_mul``, groups 2-3 ``lr``.

    pretrain / vcmr / vr call this with ``lr_mul=1`` (upstream ignores their ``lr_mul``,
    P3); videoQA / violin / tvc pass the configured multiplier.
    """
    for i, group in enumerate(optimizer.param_groups):
        if i > 3:
            raise ValueError(f"optimizer has {len(optimizer.param_groups)} parameter groups; "
                             "the schedule knows 4 (heads/decay, heads/no-decay, "
                             "v_encoder/decay, v_encoder/no-decay)")
        group["lr"] = lr * lr_mul if i < 2 else lr
