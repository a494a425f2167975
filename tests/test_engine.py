"""utils/engine.py on a toy task: optimizer-step semantics by hand, output-dir policy, errors.

The toy task lives here and is also runnable as a script (``python tests/test_engine.py ...``,
also under torchrun), so test_ddp.py and test_resume.py drive real training processes with it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from config.config import ConfigError, SharedConfigs, add_bool, parse_with_config  # noqa: E402
from data.resumable import build_resumable_loader  # noqa: E402
from utils import engine as engine_mod  # noqa: E402
from utils.dist_setup import unwrap_model  # noqa: E402
from utils.distributed import shard  # noqa: E402
from utils.engine import NonFiniteLossError, Trainer, TrainTask, add_run_args  # noqa: E402
from utils.errors import run_main  # noqa: E402

N_ITEMS, DIM = 8, 3


def toy_items(emulate_world: int = 0, batch_size: int = 2) -> list:
    """Fixed regression items; ``emulate_world`` orders them as W ranks' shards interleaved."""
    gen = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(N_ITEMS, DIM, generator=gen), torch.randn(N_ITEMS, generator=gen)
    items = [(f"item{i}", xs[i], ys[i]) for i in range(N_ITEMS)]
    if emulate_world <= 1:
        return items
    shards = [items[r::emulate_world] for r in range(emulate_world)]
    return [it for t in range(0, len(shards[0]), batch_size) for s in shards
            for it in s[t:t + batch_size]]


class ToyDataset(torch.utils.data.Dataset):
    """Items sharded by rank like upstream's datasets; optional Python-random input noise."""

    def __init__(self, items, noise: float, sharded: bool):
        self.items = shard(items) if sharded else items
        self.noise = noise

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        vid, x, y = self.items[i]
        return vid, x + self.noise * random.gauss(0, 1), y


def toy_collate(inputs):
    vids, xs, ys = zip(*inputs)
    return {"vids": list(vids), "x": torch.stack(xs), "y": torch.stack(ys)}


class ToyModel(nn.Module):
    """``v_encoder`` (groups 2-3) + a top bias and a head used by task ``b`` only."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        layers = [nn.Linear(DIM, 1, bias=False)] if hidden == 0 else [
            nn.Linear(DIM, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, 1)]
        self.v_encoder = nn.Sequential(*layers)
        self.bias = nn.Parameter(torch.zeros(1))
        self.b_head = nn.Parameter(torch.ones(1))

    def forward(self, batch, task, compute_loss=True):
        pred = self.v_encoder(batch["x"]).squeeze(-1) + self.bias
        if task == "b":
            pred = pred * self.b_head
        return ((pred - batch["y"]) ** 2).mean()


class ToyTask(TrainTask):
    def build_model(self):
        torch.manual_seed(1)
        return ToyModel(self.opts.toy_hidden, self.opts.dropout)

    def _loader(self, name):
        emulate = self.opts.toy_emulate_world
        ds = ToyDataset(toy_items(emulate, self.opts.train_batch_size), self.opts.toy_noise,
                        sharded=emulate <= 1)
        loader = build_resumable_loader(ds, toy_collate, self.opts, name, device=self.device)
        loader.sampler.shuffle = self.opts.toy_shuffle
        return loader

    def build_train_loaders(self):
        return {name: (self._loader(name), 1) for name in self.opts.toy_tasks}

    def compute_loss(self, model, task, batch):
        update = self.step_seen + 1
        kill_at = int(os.environ.get("TOY_KILL_AT", "0"))
        if kill_at and update == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self._maybe_signal(update)
        if update == int(os.environ.get("TOY_HANG_AT", "0")):
            time.sleep(600)  # a stuck update (e.g. a collective whose peer is gone)
        loss = model(batch, task) * self.opts.toy_loss_mul
        if update == int(os.environ.get("TOY_NAN_GRAD_AT", "0")):
            # finite loss (adds 0), NaN gradient: d sqrt(0 * b) / db = 0 * inf
            loss = loss + 0 * torch.sqrt(0 * unwrap_model(model).bias).sum()
        return loss, {"double": 2 * loss.item()}

    def _maybe_signal(self, update: int) -> None:
        """``TOY_SIGNAL_AT=N``: send ``TOY_SIGNAL`` (TERM/INT) ``TOY_SIGNAL_COUNT`` times at the
        first micro-batch of update N, from rank ``TOY_SIGNAL_RANK``, to the process (or, with
        ``TOY_SIGNAL_GROUP=1``, its whole process group, DataLoader workers included)."""
        env = os.environ
        if update != int(env.get("TOY_SIGNAL_AT", "0")) or getattr(self, "signalled", False):
            return
        if int(env.get("RANK", "0")) != int(env.get("TOY_SIGNAL_RANK", "0")):
            return
        self.signalled = True
        sig = getattr(signal, "SIG" + env.get("TOY_SIGNAL", "TERM"))
        for _ in range(int(env.get("TOY_SIGNAL_COUNT", "1"))):
            if env.get("TOY_SIGNAL_GROUP") == "1":
                os.killpg(os.getpgid(0), sig)
            else:
                os.kill(os.getpid(), sig)

    def schedule(self, model, global_step):
        self.step_seen = global_step

    def validate(self, model, global_step, final=False):
        random.random()  # validation may consume RNG; training must not notice
        torch.rand(3)
        return {"valid/toy_bias": model.bias.item()}


def toy_args(argv):
    cfg = SharedConfigs("toy")
    add_run_args(cfg.parser)
    p = cfg.parser
    p.add_argument("--toy_hidden", type=int, default=0)
    p.add_argument("--toy_noise", type=float, default=0.0)
    p.add_argument("--toy_tasks", nargs="+", default=["a"])
    p.add_argument("--toy_emulate_world", type=int, default=0)
    p.add_argument("--toy_loss_mul", type=float, default=1.0)
    add_bool(p, "toy_shuffle", default=True)
    return parse_with_config(p, argv)


BASE = ["--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--optim", "adamw",
        "--learning_rate", "0.1", "--warmup_steps", "10", "--num_train_steps", "2",
        "--valid_steps", "100", "--save_steps", "100", "--grad_norm", "0.05", "--n_workers",
        "0", "--seed", "3", "--dropout", "0.0", "--log_steps", "1"]


def run_toy(tmp_path, *extra, out="out"):
    opts = toy_args(BASE + ["--output_dir", str(tmp_path / out), *extra])
    task = ToyTask(opts)
    return Trainer(task, opts).run(), opts


def record_scalars(monkeypatch):
    seen = []
    monkeypatch.setattr(engine_mod.TB_LOGGER, "add_scalar",
                        lambda key, value, step=None: seen.append((key, float(value))))
    return seen


def hand_adamw(w, b, lr_base, clip, steps, warmup, betas=(0.9, 0.98), eps=1e-6):
    """Two reference updates: summed (not averaged) micro-batch grads, clip, upstream AdamW."""
    xs = torch.stack([x for _, x, _ in toy_items()]).double()
    ys = torch.stack([y for _, _, y in toy_items()]).double()
    params = [w.double().clone(), b.double().clone()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    norms = []
    for t in range(1, steps + 1):
        sel = slice(4 * (t - 1), 4 * t)  # micro-batches {4t-4, 4t-3} and {4t-2, 4t-1}
        r = xs[sel] @ params[0] + params[1] - ys[sel]
        # d/dw of mean-of-2 squared errors is X_b^T r_b; summed over the 2 micro-batches
        grads = [xs[sel].t() @ r, r.sum(0, keepdim=True)]
        norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
        norms.append(norm)
        grads = [g * min(1.0, clip / (norm + 1e-6)) for g in grads]
        lr = lr_base * t / warmup
        for i, g in enumerate(grads):
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            step = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
            params[i] = params[i] - step * m[i] / (v[i].sqrt() + eps)
    return params, norms


def test_accumulation_sum_clipping_and_lr_match_hand_computation(tmp_path, monkeypatch):
    scalars = record_scalars(monkeypatch)
    torch.manual_seed(1)
    w0 = ToyModel(0, 0.0).v_encoder[0].weight.detach()[0].clone()
    model, _ = run_toy(tmp_path, "--no-toy_shuffle")
    (w_ref, b_ref), norms = hand_adamw(w0, torch.zeros(1), 0.1, 0.05, 2, 10)
    logged = [v for k, v in scalars if k == "grad_norm"]
    assert logged == [pytest.approx(n, rel=1e-5) for n in norms]
    assert norms[0] > 0.05 * 5  # clipping is active, so the gradient scale matters
    torch.testing.assert_close(model.v_encoder[0].weight.detach()[0].double(), w_ref,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bias.detach().double(), b_ref, rtol=1e-5, atol=1e-6)
    assert [v for k, v in scalars if k == "lr"] == pytest.approx([0.01, 0.02], rel=1e-12)
    assert (tmp_path / "out" / "ckpt" / "model_step_2.pt").is_file()
    hps = json.loads((tmp_path / "out" / "log" / "hps.json").read_text())
    assert hps["n_gpu"] == 1 and hps["grad_norm"] == 0.05


def test_output_dir_policy_and_hps_mismatch(tmp_path, caplog):
    """Same options: a finished run is returned, not retrained; other options are refused
    naming the keys; --overwrite sets the run (its finished marker too) aside."""
    out = tmp_path / "out"
    first, _ = run_toy(tmp_path)
    marker = out / "log" / "finished.json"
    assert json.loads(marker.read_text())["final_checkpoint"] == "ckpt/model_step_2.pt"
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with caplog.at_level(logging.INFO):
        again, _ = run_toy(tmp_path)
    assert f"output_dir {out} holds a finished run (update 2 of 2" in caplog.text
    assert "nothing to do; pass --overwrite to train again" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 again.state_dict().values()))
    with pytest.raises(ConfigError, match="in keys: grad_norm, learning_rate") as info:
        run_toy(tmp_path, "--resume", "--learning_rate", "0.2", "--grad_norm", "1")
    assert "learning_rate: 0.1 in that run, 0.2 now" in str(info.value)
    with pytest.raises(ConfigError, match="holds a run whose options differ from this command"):
        run_toy(tmp_path, "--learning_rate", "0.2")
    model, _ = run_toy(tmp_path, "--overwrite")
    assert model is not None and marker.is_file()
    previous = list(out.glob("previous-*"))
    assert len(previous) == 1 and (previous[0] / "log" / "finished.json").is_file()


def test_non_finite_loss_names_step_task_and_batch(tmp_path):
    model = None
    try:
        model, _ = run_toy(tmp_path, "--toy_loss_mul", "nan")
    except NonFiniteLossError as exc:
        msg = str(exc)
        assert "update 1" in msg and "task a" in msg and "item" in msg and "vids" in msg
    assert model is None
    assert not list((tmp_path / "out").glob("ckpt/*.pt"))  # nothing broken was saved


def test_missing_model_config_path_is_named(tmp_path):
    try:
        run_toy(tmp_path, "--model_config", str(tmp_path / "nope.json"))
    except (ConfigError, FileNotFoundError) as exc:
        assert "nope.json" in str(exc)
    else:
        raise AssertionError("a missing --model_config must raise")


def test_fp16_and_bf16_on_cpu_with_two_tasks(tmp_path, monkeypatch):
    scalars = record_scalars(monkeypatch)
    model, _ = run_toy(tmp_path, "--fp16", "--toy_tasks", "a", "b", "--toy_hidden", "4",
                       "--num_train_steps", "4")
    scales = [k for k, _ in scalars if k.startswith("loss_scale/")]
    assert scales and set(scales) <= {"loss_scale/a", "loss_scale/b"}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model, _ = run_toy(tmp_path, "--bf16", "--toy_hidden", "4", out="bf16")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def main(argv=None):
    opts = toy_args(sys.argv[1:] if argv is None else argv)
    model = Trainer(ToyTask(opts), opts).run()
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                   Path(opts.output_dir) / "final_params.pt")


if __name__ == "__main__":
    run_main(main)
