"""Mixed precision in utils/engine.py on the toy task of test_engine.py, with checks that fail
when the engine gets it wrong: an fp16 overflow skips the update and halves the loss scale
without touching the weights; gradients are unscaled before they are clipped; the forward
really runs under autocast in the requested dtype.

The toy loss is multiplied by 0.01 in the fp16 runs: with the full loss, dL/dpred × 2^16 is
past fp16's range (65504), so every update would overflow naturally and hide the forced one.
"""
from __future__ import annotations

import json

import pytest
import torch
from test_engine import BASE, ToyModel, ToyTask, hand_adamw, record_scalars, toy_args

from utils.engine import Trainer

MUL, CLIP = 0.01, 0.005  # loss multiplier; clip far below the ~0.05 norm: clipping is active


def train(tmp_path, *extra, out="out"):
    """Run the toy to the end; returns the Trainer (model, optimizer, scalers stay readable)."""
    opts = toy_args(BASE + ["--output_dir", str(tmp_path / out), *extra])
    trainer = Trainer(ToyTask(opts), opts)
    trainer.run()
    return trainer


def logged_grad_norms(run_dir):
    lines = (run_dir / "log" / "metrics.jsonl").read_text().splitlines()
    return [rec["grad_norm"] for rec in map(json.loads, lines) if "grad_norm" in rec]


def params(path):
    return {k: v for k, v in torch.load(path).items() if torch.is_tensor(v)}


def test_fp16_overflow_skips_update_halves_scale_keeps_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TOY_NAN_GRAD_AT", "2")  # finite loss, NaN gradient at update 2 only
    scalars = record_scalars(monkeypatch)
    trainer = train(tmp_path, "--fp16", "--toy_loss_mul", str(MUL), "--num_train_steps", "3",
                    "--valid_steps", "1")
    assert [v for k, v in scalars if k == "loss_scale/a"] == [2.0 ** 16, 2.0 ** 15, 2.0 ** 15]
    assert dict(trainer.overflows) == {"a": 1}
    ckpt = tmp_path / "out" / "ckpt"
    step1, step2, step3 = (params(ckpt / f"model_step_{n}.pt") for n in (1, 2, 3))
    torch.manual_seed(1)
    init = ToyModel(0, 0.0).state_dict()
    assert not torch.equal(step1["bias"], init["bias"])  # update 1 was applied
    for key in step1:
        assert torch.equal(step1[key], step2[key]), key  # update 2 skipped: bit-identical
    assert not torch.equal(step2["bias"], step3["bias"])  # update 3 applied again
    assert all(torch.isfinite(v).all() for v in step3.values())
    steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert steps == {2}  # Adam never saw the skipped update (its moments were not advanced)


def test_fp16_unscales_before_clipping(tmp_path):
    """With active clipping the logged norm is the unscaled one (a clip of the scaled
    gradients would log 2^16 times more and shrink the step to ~nothing), and the
    update matches fp32 up to fp16 rounding of the forward."""
    common = ("--no-toy_shuffle", "--toy_loss_mul", str(MUL), "--grad_norm", str(CLIP))
    fp16 = train(tmp_path, *common, "--fp16", out="fp16")
    fp32 = train(tmp_path, *common, out="fp32")
    assert fp16.overflows == {} and fp16.scalers["a"].get_scale() == 2.0 ** 16
    torch.manual_seed(1)
    init = ToyModel(0, 0.0)
    w0 = init.v_encoder[0].weight.detach()[0].clone()
    _, hand = hand_adamw(w0, torch.zeros(1), 0.1, 1.0, 1, 10)  # update 1 grads: initial weights
    norms16, norms32 = logged_grad_norms(tmp_path / "fp16"), logged_grad_norms(tmp_path / "fp32")
    assert norms16[0] == pytest.approx(MUL * hand[0], rel=1e-3)
    assert norms32[0] == pytest.approx(MUL * hand[0], rel=1e-5)
    assert min(norms16) > 5 * CLIP  # clipping was active at every update
    assert norms16 == pytest.approx(norms32, rel=1e-3)
    for p16, p32 in zip(fp16.model.parameters(), fp32.model.parameters()):
        assert p16.dtype == torch.float32  # the weights stay the fp32 master copy
        torch.testing.assert_close(p16, p32, rtol=0, atol=2e-5)
    moved = [(p32 - p0).abs().max() for p32, p0 in zip(fp32.model.parameters(),
                                                       init.parameters())]
    assert max(moved) > 1e-2  # the tolerance above is small next to the update


def autocast_spy(monkeypatch):
    """Record (autocast on?, autocast dtype, encoder output dtype) at every toy forward."""
    seen = []

    def hook(module, args, output):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                     output.dtype))

    build = ToyTask.build_model

    def build_with_hook(self):
        model = build(self)
        model.v_encoder.register_forward_hook(hook)
        return model

    monkeypatch.setattr(ToyTask, "build_model", build_with_hook)
    return seen


@pytest.mark.parametrize("flag,dtype", [("--bf16", torch.bfloat16), ("--fp16", torch.float16),
                                        (None, torch.float32)])
def test_forward_runs_under_autocast_of_the_requested_dtype(tmp_path, monkeypatch, flag, dtype):
    seen = autocast_spy(monkeypatch)
    scalars = record_scalars(monkeypatch)
    extra = [flag] if flag else []
    trainer = train(tmp_path, *extra, "--toy_hidden", "4", "--toy_loss_mul", str(MUL))
    assert len(seen) == 4  # 2 updates x 2 micro-batches
    if flag is None:
        assert {(on, out) for on, _, out in seen} == {(False, torch.float32)}
    else:
        assert set(seen) == {(True, dtype, dtype)}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert any(k.startswith("loss_scale/") for k, _ in scalars) == (flag == "--fp16")
