"""DataLoader construction, multi-task mixing and GPU prefetching (data.md §11).

* :func:`build_dataloader` – upstream's plain ``DataLoader`` settings (no sampler, no
  drop_last), plus per-worker seeding of Python ``random``/NumPy and persistent workers.
* :class:`MetaLoader` – infinite ``(task, batch)`` stream; one task per accumulation cycle,
  drawn with Python ``random`` from a pool holding each task ``ratio`` times; rank 0's draw is
  broadcast so every rank runs the same task.
* :class:`PrefetchLoader` – keeps the next batch's host->device copy in flight on a side CUDA
  stream; a pass-through on CPU.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import random
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader

from utils.distributed import broadcast_object


class _ExitFlag:
    """Set (shared memory, inherited by forked workers) once the main process is exiting."""

    value = None

    @classmethod
    def get(cls):
        if cls.value is None:
            cls.value = multiprocessing.Value("b", 0, lock=False)
            atexit.register(cls.mark)  # runs before multiprocessing terminates its workers
        return cls.value

    @classmethod
    def mark(cls) -> None:
        if cls.value is not None:
            cls.value.value = 1


def _worker_sigterm(signum, frame) -> None:
    flag = _ExitFlag.value
    if flag is None or flag.value:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """In a DataLoader worker: ignore SIGINT, and SIGTERM until the main process exits.

    Why (issue 13 item 7): Ctrl-C and SLURM signal every process of the job, workers included,
    while the main process must still fetch the batches of the update it finishes before it
    saves. A worker still ends with its parent (PyTorch's watchdog) and obeys the SIGTERM that
    ``multiprocessing`` sends at the parent's exit (the flag is set by then). Call
    :func:`prepare_worker_signals` in the main process before the workers start.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


def prepare_worker_signals() -> None:
    """Create the exit flag in the main process (forked workers inherit it)."""
    _ExitFlag.get()


def shutdown_workers(loader) -> None:
    """Stop a DataLoader's persistent workers now (PyTorch does it only when the loader is
    garbage collected; after an error, a traceback can keep it alive until interpreter exit,
    where ``multiprocessing`` SIGTERMs the workers and PyTorch reports "worker killed")."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if hasattr(loader, "_iterator"):
        loader._iterator = None


def worker_init_fn(worker_id: int) -> None:
    """Seed Python ``random`` and NumPy from the worker's torch seed (distinct per worker).

    Dataset masking uses Python ``random``; without this, NumPy would repeat across workers.
    """
    ignore_stop_signals()
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_dataloader(dataset, collate_fn, is_train: bool, opts) -> DataLoader:
    """Loader with ``train_batch_size``/``val_batch_size`` items, shuffled only for training.

    ``pin_memory`` follows ``opts.pin_mem`` but only when CUDA is available (pinning without a
    GPU only warns); workers persist across epochs so MetaLoader's re-iteration is cheap.
    """
    batch_size = opts.train_batch_size if is_train else opts.val_batch_size
    n_workers = getattr(opts, "n_workers", 0)
    if n_workers > 0:
        prepare_worker_signals()
    return DataLoader(dataset, batch_size=batch_size, shuffle=is_train,
                      num_workers=n_workers,
                      pin_memory=bool(getattr(opts, "pin_mem", False))
                      and torch.cuda.is_available(),
                      collate_fn=collate_fn, persistent_workers=n_workers > 0,
                      worker_init_fn=worker_init_fn if n_workers > 0 else None)


class MetaLoader:
    """Mix several loaders; ``loaders`` maps name -> loader or name -> (loader, int ratio).

    The same task is used for every micro-step of an accumulation cycle (the per-task loss
    scaler needs it). An exhausted loader is re-iterated (a new shuffled epoch) and its first
    batch returned. Iteration never ends. A ratio of 0 keeps the task out of the pool (as
    upstream's ``[name] * 0``), which is how a config switches a task off.
    """

    def __init__(self, loaders, accum_steps: int = 1, distributed: bool = False):
        if not loaders:
            raise ValueError("MetaLoader needs at least one loader")
        self.name2loader = {}
        self.name2iter = {}
        self.sampling_pools = []
        for name, value in loaders.items():
            loader, ratio = value if isinstance(value, tuple) else (value, 1)
            if not isinstance(ratio, int) or ratio < 0:
                raise ValueError(f"MetaLoader: ratio of task {name!r} must be an int >= 0, "
                                 f"got {ratio!r}")
            self.name2loader[name] = loader
            self.name2iter[name] = iter(loader)
            self.sampling_pools.extend([name] * ratio)
        if not self.sampling_pools:
            raise ValueError(f"MetaLoader: every task ratio is 0 ({list(loaders)}); "
                             "nothing to sample")
        self.accum_steps = accum_steps
        self.distributed = distributed
        self.step = 0

    def _next_batch(self, task):
        try:
            return next(self.name2iter[task])
        except StopIteration:
            self.name2iter[task] = iter(self.name2loader[task])
            return next(self.name2iter[task])

    def __iter__(self):
        task = self.sampling_pools[0]
        while True:
            if self.step % self.accum_steps == 0:
                task = random.choice(self.sampling_pools)
                if self.distributed:
                    task = broadcast_object(task)
            self.step += 1
            yield task, self._next_batch(task)


def move_to_device(batch, device, non_blocking: bool = True):
    """Recursively move tensors inside dicts/lists/tuples; other objects are returned as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [move_to_device(v, device, non_blocking) for v in batch]
        return type(batch)(moved) if isinstance(batch, list) else tuple(moved)
    return batch


def _record_stream(batch, stream) -> None:
    if isinstance(batch, torch.Tensor):
        if batch.is_cuda:
            batch.record_stream(stream)
    elif isinstance(batch, dict):
        for value in batch.values():
            _record_stream(value, stream)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            _record_stream(value, stream)


class PrefetchLoader:
    """Overlap the next batch's host->device copy with compute (data.md §11.4).

    ``device`` defaults to the current CUDA device; without CUDA, batches pass through
    untouched. ``len()`` and unknown attributes (e.g. ``.dataset``) come from the wrapped loader.
    """

    def __init__(self, loader, device=None):
        self.loader = loader
        self.device = device
        if device is None and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        use_cuda = self.device is not None and torch.device(self.device).type == "cuda"
        self.stream = torch.cuda.Stream(device=self.device) if use_cuda else None

    def __iter__(self):
        if self.stream is None:
            yield from self.loader
            return
        loader_it = iter(self.loader)
        pending = self._preload(loader_it)
        while pending is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            batch = pending
            _record_stream(batch, torch.cuda.current_stream(self.device))
            pending = self._preload(loader_it)
            yield batch

    def _preload(self, loader_it):
        try:
            batch = next(loader_it)
        except StopIteration:
            return None
        with torch.cuda.stream(self.stream):
            return move_to_device(batch, self.device)

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)
