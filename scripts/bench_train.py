"""The ``train`` benchmark: speed of the pre-training loop and the engine's own overhead.

Runs ``pretrain.py``'s task (``--train_config``, default the demo config: MLM, MFM-NCE, FOM and
VSM mixed 2:2:1:2) through :class:`utils.engine.Trainer` on a toy corpus and reports

* ``loop``: updates/s and videos/s of the real loop, data loading included;
* ``pure`` vs ``engine``: ms per update on the *same* cached batches, once as the minimal loop
  (schedule switches, forward, backward, LR, clip, optimizer step, zero grads, under the same
  autocast/scaler) and once through ``Trainer.train`` (which adds the running meters,
  TensorBoard and JSON-lines logging, progress bar and cadence checks);
* ``engine_overhead`` = engine / pure - 1 (goal < 0.05), the median over rounds of each
  round's ratio, from wall time and (``engine_overhead_cpu``) from this process's CPU time;
  on a shared machine their per-round spread can exceed the goal (an A/A run of the pure loop
  against itself spreads as much), so also
* ``engine_overhead_direct``: inside the engine rounds, the engine's own seconds (everything
  but the calls the pure loop also makes) over the seconds of those calls, clocked call by
  call, so load drift hits both alike (see :func:`pure_work_clock`);
* ``same_work``: 1 when every round of both paths produced the same per-update losses.

Why so careful: the two paths must do identical work or the ratio means nothing (a first
version reported -27%). Every round therefore starts from one snapshot (weights, optimizer,
scalers, schedule switches on the model, RNG, ``global_step``), so both paths draw the same
dropout masks and ``drop_svmr_prob`` span skips, see the same hard-negative/span schedule and
LR, and step the same parameters; rounds alternate pure-engine / engine-pure so load drift
hits both alike, and medians keep one disturbed round from moving the figure. Per-round values
are in each figure's ``rounds``. Validation and checkpoints are off (``valid_steps`` huge,
``save_steps`` 0).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path
from unittest import mock

import torch

LOSS_RTOL = 1e-5  # CUDA kernels may sum in another order between runs; CPU matches exactly


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train_config", default="config/pretrain-demo.json",
                        help="pre-training JSON config (its txt_db/img_db are replaced)")
    parser.add_argument("--train_steps", type=int, default=7, help="timed updates per round")
    parser.add_argument("--train_rounds", type=int, default=7,
                        help="alternating pure/engine rounds for the overhead figure")
    parser.add_argument("--train_warmup", type=int, default=3, help="untimed first updates")
    parser.add_argument("--train_workers", type=int, default=None,
                        help="DataLoader workers (default: the config's n_workers)")


class ReplayLoader:
    """Yields cached ``(task, [batch])`` items forever with MetaLoader's ``step`` counter."""

    def __init__(self, items):
        self.items, self.step = list(items), 0

    def __iter__(self):
        while True:
            item = self.items[self.step % len(self.items)]
            self.step += 1
            yield item


def build_trainer(opts, root: str, out_dir: str):
    from pretrain import PretrainTask, parse_args
    from utils.engine import Trainer
    argv = ["--config", opts.train_config, "--txt_db", os.path.join(root, "txt_db"),
            "--img_db", os.path.join(root, "video_db"), "--output_dir", out_dir,
            "--valid_steps", "1000000000", "--save_steps", "0", "--log_steps", "1000000000"]
    if opts.train_workers is not None:
        argv += ["--n_workers", str(opts.train_workers)]
    popts = parse_args(argv)
    trainer = Trainer(PretrainTask(popts), popts)
    trainer.setup()
    return trainer


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn, *args):
    """``(wall seconds, process CPU seconds, fn's result)``, device work included."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def engine_updates(trainer, n: int) -> float:
    """Seconds for ``n`` more updates through ``Trainer.train``."""
    trainer.opts.num_train_steps = trainer.global_step + n
    wall, _, _ = timed(trainer.device, trainer.train)
    trainer.pbar.close()
    return wall


# ------------------------------------------------------------------ one round of each path
def model_switches(model) -> list:
    """Every module's scalar attributes: train/eval mode and the schedule's switches."""
    return [{k: v for k, v in vars(m).items()
             if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}
            for m in model.modules()]


class Snapshot:
    """The training state a round starts from; :meth:`restore` puts it back exactly."""

    def __init__(self, trainer):
        from utils.save import rng_state
        self.trainer, self.step = trainer, trainer.global_step
        self.state = copy.deepcopy({
            "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "scalers": {k: s.state_dict() for k, s in trainer.scalers.items()},
            "rng": rng_state()})
        self.switches = model_switches(trainer.model)
        self.with_grad = [p.grad is not None for p in trainer.model.parameters()]

    def restore(self) -> None:
        from utils.save import set_rng_state
        tr, state = self.trainer, copy.deepcopy(self.state)  # load_state_dict aliases tensors
        tr.model.load_state_dict(state["model"])
        tr.optimizer.load_state_dict(state["optimizer"])
        for name, scaler_state in state["scalers"].items():
            tr.scalers[name].load_state_dict(scaler_state)
        for module, attrs in zip(tr.model.modules(), self.switches):
            for key, value in attrs.items():
                setattr(module, key, value)
        for p, had in zip(tr.model.parameters(), self.with_grad):  # AdamW steps these only
            p.grad = torch.zeros_like(p) if had else None
        tr.global_step, tr.meta_loader.step = self.step, 0
        set_rng_state(state["rng"])


def engine_losses(trainer, n: int) -> list:
    """The last ``n`` per-update losses the engine logged to ``log/metrics.jsonl``."""
    path = Path(trainer.opts.output_dir) / "log" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r][-n:]


def pure_round(trainer, batches) -> list:
    """The minimal loop over ``batches``; the loss tensors of each update (no syncs)."""
    model, task, accum = trainer.ddp, trainer.task, trainer.opts.gradient_accumulation_steps
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    trainer.model.train()
    step, losses = trainer.global_step, []
    for i, (name, batch) in enumerate(batches):
        task.schedule(trainer.model, step)
        with trainer._autocast():
            loss, _ = task.compute_loss(model, name, batch)
        scaler = trainer.scalers.get(name)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        losses.append(loss.detach())
        if (i + 1) % accum == 0:
            step += 1
            _pure_update(trainer, params, scaler, step)
    return [losses[i:i + accum] for i in range(0, len(losses), accum)]


def _pure_update(trainer, params, scaler, step: int) -> None:
    from optim.sched import get_lr_sched, set_lr
    opts, optimizer = trainer.opts, trainer.optimizer
    set_lr(optimizer, get_lr_sched(step, opts), opts.lr_mul if trainer.task.honour_lr_mul
           else 1.0)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if opts.grad_norm != -1:
        torch.nn.utils.clip_grad_norm_(params, opts.grad_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=False)


def update_means(groups) -> list:
    """Per-update mean micro-batch loss, summed in the engine's order."""
    means = []
    for group in groups:
        values = [t.item() for t in group]
        means.append(sum(values) / len(values))
    return means


# ------------------------------------------------------------------ measurement
def measure(trainer, opts) -> dict:
    accum = trainer.opts.gradient_accumulation_steps
    engine_updates(trainer, opts.train_warmup)
    loop_s = engine_updates(trainer, opts.train_steps * opts.train_rounds)
    cached = list(islice(iter(trainer.meta_loader), opts.train_steps * accum))
    trainer.meta_loader = ReplayLoader(cached)
    cached = [(name, batches[0]) for name, batches in cached]  # one rank: one batch each
    pure_round(trainer, cached)  # untimed: first pass over these shapes, grads allocated
    engine_updates(trainer, opts.train_steps)
    snapshot = Snapshot(trainer)
    rounds = {"pure": [], "engine": []}
    for r in range(opts.train_rounds):
        for name in (("pure", "engine") if r % 2 == 0 else ("engine", "pure")):
            rounds[name].append(timed_round(trainer, snapshot, name, cached, opts.train_steps))
    return {"loop_s": loop_s, "rounds": rounds, "n_updates": opts.train_steps * opts.train_rounds,
            "videos": opts.train_steps * opts.train_rounds * accum
            * trainer.opts.train_batch_size}


def timed_round(trainer, snapshot: Snapshot, path: str, batches, n: int) -> dict:
    """One round of ``path`` from ``snapshot``: wall and CPU seconds, per-update losses."""
    snapshot.restore()
    trainer.opts.num_train_steps = trainer.global_step + n  # the same LR schedule for both
    if path == "pure":
        wall, cpu, groups = timed(trainer.device, pure_round, trainer, batches)
        return {"wall": wall, "cpu": cpu, "losses": update_means(groups)}
    with pure_work_clock(trainer) as spent:
        wall, cpu, _ = timed(trainer.device, trainer.train)
    trainer.pbar.close()
    return {"wall": wall, "cpu": cpu, "losses": engine_losses(trainer, n),
            "own": (wall - spent[0]) / spent[0]}


@contextlib.contextmanager
def pure_work_clock(trainer):
    """Inside ``Trainer.train``, add up the wall seconds of the calls the pure loop also makes.

    The rest is the engine's own work, measured call by call in the same round, so load drift
    cancels. On CUDA the pure work is only launched there and the engine's ``.item()`` waits
    for it, so the engine share is an upper bound.
    """
    spent = [0.0]

    def clocked(fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return call

    targets = ((trainer.task, "schedule"), (trainer.task, "compute_loss"),
               (torch.Tensor, "backward"), (torch.nn.utils, "clip_grad_norm_"),
               (trainer, "_optimizer_step"), (trainer.optimizer, "zero_grad"))
    with contextlib.ExitStack() as stack:
        for obj, name in targets:
            stack.enter_context(mock.patch.object(obj, name, clocked(getattr(obj, name))))
        yield spent


def same_losses(rounds) -> bool:
    first = rounds["pure"][0]["losses"]
    return all(len(r["losses"]) == len(first) and all(
        math.isclose(a, b, rel_tol=LOSS_RTOL) for a, b in zip(r["losses"], first))
        for path in rounds.values() for r in path)


def summarise(m: dict, tag: str, result) -> list:
    """Medians over rounds; each figure carries its per-round values in ``rounds``."""
    def figure(name, values, unit):
        return {**result(f"{tag}/{name}", statistics.median(values), unit),
                "rounds": [round(v, 4) for v in values]}

    steps = len(m["rounds"]["pure"][0]["losses"])
    ms = {p: [1000 * r["wall"] / steps for r in m["rounds"][p]] for p in ("pure", "engine")}
    ratio = {clock: [e[clock] / p[clock] - 1 for p, e in zip(m["rounds"]["pure"],
                                                             m["rounds"]["engine"])]
             for clock in ("wall", "cpu")}
    return [result(f"{tag}/loop/steps_per_s", m["n_updates"] / m["loop_s"], "updates/s"),
            result(f"{tag}/loop/samples_per_s", m["videos"] / m["loop_s"], "videos/s"),
            figure("pure/ms_per_step", ms["pure"], "ms"),
            figure("engine/ms_per_step", ms["engine"], "ms"),
            figure("engine_overhead", ratio["wall"], "fraction"),
            figure("engine_overhead_cpu", ratio["cpu"], "fraction"),
            figure("engine_overhead_direct", [r["own"] for r in m["rounds"]["engine"]],
                   "fraction"),
            result(f"{tag}/same_work", float(same_losses(m["rounds"])), "bool")]


def run_train_bench(opts, corpus_dir, result) -> list:
    with corpus_dir(opts.corpus) as root, tempfile.TemporaryDirectory() as out_dir:
        trainer = build_trainer(opts, root, out_dir)
        try:
            m = measure(trainer, opts)
        finally:
            trainer.close()
        bs = trainer.opts.train_batch_size
    return summarise(m, f"train/pretrain/bs={bs}", result)
