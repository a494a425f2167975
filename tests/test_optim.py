"""Upstream AdamW, parameter groups and LR schedule (training.md §3.4-§3.5)."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from optim.adamw import AdamW
from optim.misc import build_optimizer, param_groups
from optim.sched import get_lr_sched, set_lr


def hand_adamw(p, grads, lr, b1, b2, eps, wd):
    """The spec's update, written out on python floats."""
    m = v = 0.0
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        p = p - step * m / (math.sqrt(v) + eps)
        p = p - lr * wd * p
    return p


@pytest.mark.parametrize("foreach", [True, False])
def test_adamw_matches_hand_written_update(foreach):
    grads = [0.5, -1.0, 0.25, 2.0]
    p = torch.tensor([1.5], dtype=torch.float64, requires_grad=True)
    opt = AdamW([p], lr=0.1, betas=(0.9, 0.98), weight_decay=0.01, foreach=foreach)
    for g in grads:
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
    expected = hand_adamw(1.5, grads, 0.1, 0.9, 0.98, 1e-6, 0.01)
    assert p.item() == pytest.approx(expected, rel=1e-12)


def test_foreach_equals_reference_and_differs_from_torch():
    torch.manual_seed(0)
    shapes = [(3, 4), (4,), (2, 2, 2)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    results = {}
    for name in ("foreach", "loop", "torch"):
        ps = [nn.Parameter(x.clone()) for x in init]
        if name == "torch":
            opt = torch.optim.AdamW(ps, lr=0.01, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
        else:
            opt = AdamW(ps, lr=0.01, betas=(0.9, 0.98), weight_decay=0.1,
                        foreach=name == "foreach")
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        results[name] = torch.cat([p.detach().flatten() for p in ps])
    torch.testing.assert_close(results["foreach"], results["loop"], rtol=0, atol=1e-7)
    assert not torch.allclose(results["foreach"], results["torch"], rtol=0, atol=1e-7)


def test_parameters_without_grad_are_skipped_and_keep_own_step():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = AdamW([a, b], lr=0.1)
    a.grad = torch.ones(2)
    opt.step()
    assert b not in opt.state or not opt.state[b]
    b.grad = torch.ones(2)
    opt.step()
    assert opt.state[a]["step"] == 2 and opt.state[b]["step"] == 1


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.v_encoder = nn.ModuleDict({
            "dense": nn.Linear(2, 2),
            "img_LayerNorm": nn.LayerNorm(2),
            "feat_regress": nn.Sequential(nn.Linear(2, 2), nn.GELU(), nn.LayerNorm(2)),
        })
        self.qa_pool = nn.Linear(2, 1, bias=False)
        self.head_LayerNorm = nn.LayerNorm(2)


def test_param_groups_follow_upstream_partition():
    model = _Toy()
    groups = param_groups(model, learning_rate=1.0, weight_decay=0.01, lr_mul=10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    got = [sorted(names[id(p)] for p in g["params"]) for g in groups]
    assert got[0] == ["qa_pool.weight"]
    assert got[1] == ["head_LayerNorm.bias", "head_LayerNorm.weight"]
    assert got[2] == ["v_encoder.dense.weight", "v_encoder.feat_regress.0.weight",
                      "v_encoder.feat_regress.2.weight"]
    assert "v_encoder.img_LayerNorm.weight" in got[3]
    assert [g["lr"] for g in groups] == [10.0, 10.0, 1.0, 1.0]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0, 0.01, 0.0]


def test_build_optimizer_choices():
    opts = SimpleNamespace(learning_rate=1e-3, weight_decay=0.0, lr_mul=1.0, betas=[0.9, 0.98],
                           optim="adamw")
    assert isinstance(build_optimizer(_Toy(), opts), AdamW)
    opts.optim = "adamw_torch"
    assert isinstance(build_optimizer(_Toy(), opts), torch.optim.AdamW)
    opts.optim = "sgd"
    with pytest.raises(ValueError, match="sgd"):
        build_optimizer(_Toy(), opts)


def test_lr_schedule_warmup_decay_and_floor():
    opts = SimpleNamespace(learning_rate=1e-4, warmup_steps=10, num_train_steps=110)
    assert get_lr_sched(1, opts) == pytest.approx(1e-5)
    assert get_lr_sched(10, opts) == pytest.approx(1e-4)
    assert get_lr_sched(60, opts) == pytest.approx(5e-5)
    assert get_lr_sched(110, opts) == 1e-8
    assert get_lr_sched(200, opts) == 1e-8


def test_lr_schedule_warmup_as_long_as_training_ends_at_floor():
    opts = SimpleNamespace(learning_rate=1e-4, warmup_steps=10, num_train_steps=10)
    assert [get_lr_sched(s, opts) for s in (1, 9)] == pytest.approx([1e-5, 9e-5])
    assert get_lr_sched(10, opts) == get_lr_sched(11, opts) == 1e-8
    opts.warmup_steps = opts.num_train_steps = 0
    assert get_lr_sched(0, opts) == get_lr_sched(1, opts) == 1e-8


def test_set_lr_applies_lr_mul_to_heads_only():
    opt = build_optimizer(_Toy(), SimpleNamespace(learning_rate=1.0, weight_decay=0.0,
                                                  lr_mul=1.0, betas=[0.9, 0.98], optim="adamw"))
    set_lr(opt, 0.5, lr_mul=8.0)
    assert [g["lr"] for g in opt.param_groups] == [4.0, 4.0, 0.5, 0.5]
    opt.add_param_group({"params": [nn.Parameter(torch.ones(1))]})
    with pytest.raises(ValueError, match="parameter groups"):
        set_lr(opt, 0.5)
