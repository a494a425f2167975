"""The ``train`` benchmark: speed of the pre-training loop and the engine's own overhead.

Runs ``pretrain.py``'s task (``--train_config``, default the demo config: MLM, MFM-NCE, FOM and
VSM mixed 2:2:1:2) through :class:`utils.engine.Trainer` on a toy corpus and reports

* ``loop``: updates/s and videos/s of the real loop, data loading included;
* ``pure`` vs ``engine``: ms per update on the *same* cached batches, once as the minimal loop
  (forward, backward, clip, AdamW step, zero grads) and once through ``Trainer.train`` (which
  adds the schedule hooks, running meters, TensorBoard and JSON-lines logging, LR setting,
  progress bar); rounds alternate so machine-load drift hits both alike;
* ``engine_overhead`` = engine / pure - 1 (goal < 0.05).

Validation and checkpoints are off during timing (``valid_steps`` huge, ``save_steps`` 0).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from itertools import islice

import torch


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train_config", default="config/pretrain-demo.json",
                        help="pre-training JSON config (its txt_db/img_db are replaced)")
    parser.add_argument("--train_steps", type=int, default=10, help="timed updates per round")
    parser.add_argument("--train_rounds", type=int, default=3,
                        help="alternating pure/engine rounds for the overhead figure")
    parser.add_argument("--train_warmup", type=int, default=3, help="untimed first updates")
    parser.add_argument("--train_workers", type=int, default=None,
                        help="DataLoader workers (default: the config's n_workers)")


class ReplayLoader:
    """Yields cached ``(task, batch)`` pairs forever with MetaLoader's ``step`` counter."""

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


def engine_updates(trainer, n: int) -> float:
    """Seconds for ``n`` more updates through ``Trainer.train``."""
    trainer.opts.num_train_steps = trainer.global_step + n
    _sync(trainer.device)
    start = time.perf_counter()
    trainer.train()
    _sync(trainer.device)
    elapsed = time.perf_counter() - start
    trainer.pbar.close()
    return elapsed


def pure_updates(trainer, batches) -> float:
    """Seconds for the minimal loop over ``batches`` (same model, optimizer and loss)."""
    model, optimizer, opts = trainer.model, trainer.optimizer, trainer.opts
    params = [p for g in optimizer.param_groups for p in g["params"]]
    _sync(trainer.device)
    start = time.perf_counter()
    for i, (name, batch) in enumerate(batches):
        loss, _ = trainer.task.compute_loss(model, name, batch)
        loss.backward()
        if (i + 1) % opts.gradient_accumulation_steps == 0:
            torch.nn.utils.clip_grad_norm_(params, opts.grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
    _sync(trainer.device)
    return time.perf_counter() - start


def measure(trainer, opts) -> dict:
    accum = trainer.opts.gradient_accumulation_steps
    engine_updates(trainer, opts.train_warmup)
    loop_s = engine_updates(trainer, opts.train_steps * opts.train_rounds)
    n_micro = opts.train_steps * accum
    cached = list(islice(iter(trainer.meta_loader), n_micro))
    trainer.meta_loader = ReplayLoader(cached)
    pure_updates(trainer, cached)  # untimed: first pass over these batch shapes
    pure_s = engine_s = 0.0
    for r in range(opts.train_rounds):  # alternate the order so drift hits both alike
        if r % 2:
            engine_s += engine_updates(trainer, opts.train_steps)
        pure_s += pure_updates(trainer, cached)
        if not r % 2:
            engine_s += engine_updates(trainer, opts.train_steps)
    n_updates = opts.train_steps * opts.train_rounds
    return {"loop_s": loop_s, "pure_s": pure_s, "engine_s": engine_s, "n_updates": n_updates,
            "videos": n_updates * accum * trainer.opts.train_batch_size}


def run_train_bench(opts, corpus_dir, result) -> list:
    with corpus_dir(opts.corpus) as root, tempfile.TemporaryDirectory() as out_dir:
        trainer = build_trainer(opts, root, out_dir)
        try:
            m = measure(trainer, opts)
        finally:
            trainer.close()
        bs = trainer.opts.train_batch_size
    tag = f"train/pretrain/bs={bs}"
    return [result(f"{tag}/loop/steps_per_s", m["n_updates"] / m["loop_s"], "updates/s"),
            result(f"{tag}/loop/samples_per_s", m["videos"] / m["loop_s"], "videos/s"),
            result(f"{tag}/pure/ms_per_step", 1000 * m["pure_s"] / m["n_updates"], "ms"),
            result(f"{tag}/engine/ms_per_step", 1000 * m["engine_s"] / m["n_updates"], "ms"),
            result(f"{tag}/engine_overhead", m["engine_s"] / m["pure_s"] - 1, "fraction")]
