"""Training loaders whose position can be saved and restored exactly (``--resume``).

Three pieces:

* :class:`ResumableSampler` yields ``(epoch, index)`` pairs; the shuffle order of an epoch is a
  function of ``(seed, epoch)`` only (its own ``torch.Generator``, so the global torch RNG is not
  consumed), and an epoch can start at any position.
* :class:`SeededItems` wraps a dataset: item ``index`` of ``epoch`` is built with Python
  ``random`` seeded from ``(seed, name, rank, epoch, index)``, then the caller's ``random``
  state is put back. Masks (MLM/MFM/FOM/VSM sampling) therefore do not depend on the number of
  DataLoader workers, on prefetching, or on a resume.
  **Deliberate deviation**: upstream's workers keep PyTorch's per-worker seeds, so its masks
  are not bit-reproducible anyway (data.md §11.5); the mask *distribution* is unchanged.
* :class:`ResumableLoader` owns the DataLoader and counts the batches the training loop has
  actually received (not those prefetched by workers): ``state_dict()`` is ``{epoch,
  consumed}``; re-iterating after exhaustion starts the next epoch, as upstream's MetaLoader
  expects of a plain DataLoader. Device prefetching (:class:`data.loader.PrefetchLoader`) sits
  *inside* the counter, so a prefetched batch is never counted as consumed.
"""
from __future__ import annotations

import random
import zlib

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.loader import (
    PrefetchLoader,
    ignore_stop_signals,
    prepare_worker_signals,
    shutdown_workers,
)
from utils.distributed import data_rank


def item_seed(*parts) -> int:
    """A 63-bit seed from integers (or strings) via NumPy's SeedSequence hashing."""
    ints = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(2, np.uint64)[0] >> 1)


class ResumableSampler(Sampler):
    """Indices ``0..n-1`` as ``(epoch, index)``, shuffled per epoch from ``(seed, epoch)``."""

    def __init__(self, num_items: int, seed: int, shuffle: bool = True):
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> list:
        if not self.shuffle:
            return list(range(self.num_items))
        gen = torch.Generator()
        gen.manual_seed(item_seed(self.seed, epoch))
        return torch.randperm(self.num_items, generator=gen).tolist()

    def __iter__(self):
        epoch = self.epoch
        for index in self.order(epoch)[self.start:]:
            yield epoch, index

    def __len__(self):
        return max(0, self.num_items - self.start)


class SeededItems(Dataset):
    """``dataset[index]`` built under a Python ``random`` seeded from the item's identity."""

    def __init__(self, dataset, seed: int, name: str = "", rank: int | None = None):
        self.dataset, self.seed, self.name = dataset, seed, name
        self.rank = data_rank()[0] if rank is None else rank

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        saved = random.getstate()
        random.seed(item_seed(self.seed, self.name, self.rank, epoch, index))
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved)


class ResumableLoader:
    """Re-iterable training loader with a saveable ``(epoch, consumed batches)`` position."""

    def __init__(self, dataset, collate_fn, batch_size: int, seed: int, name: str = "",
                 shuffle: bool = True, n_workers: int = 0, pin_mem: bool = False,
                 device=None):
        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = ResumableSampler(len(dataset), seed, shuffle)
        if n_workers:
            prepare_worker_signals()
        gen = torch.Generator()
        gen.manual_seed(item_seed(seed, name, "loader"))
        self.loader = DataLoader(SeededItems(dataset, seed, name), batch_size=batch_size,
                                 sampler=self.sampler, collate_fn=collate_fn,
                                 num_workers=n_workers, persistent_workers=n_workers > 0,
                                 pin_memory=pin_mem and torch.cuda.is_available(),
                                 generator=gen,
                                 worker_init_fn=ignore_stop_signals if n_workers else None)
        use_device = device is not None and torch.device(device).type == "cuda"
        self.batches = PrefetchLoader(self.loader, device) if use_device else self.loader
        self.epoch, self.consumed = 0, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.sampler.set_position(self.epoch, self.consumed * self.batch_size)
        for batch in self.batches:
            self.consumed += 1
            yield batch
        self.epoch, self.consumed = self.epoch + 1, 0

    def close(self) -> None:
        """Stop the worker processes (the engine calls this when a run ends, error or not)."""
        shutdown_workers(self.loader)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


def build_resumable_loader(dataset, collate_fn, opts, name: str, is_train: bool = True,
                           device=None) -> ResumableLoader:
    """Training loader with upstream's settings (data.md §11.1) plus an exact-resume position."""
    batch_size = opts.train_batch_size if is_train else opts.val_batch_size
    return ResumableLoader(dataset, collate_fn, batch_size, opts.seed, name, shuffle=is_train,
                           n_workers=getattr(opts, "n_workers", 0),
                           pin_mem=bool(getattr(opts, "pin_mem", False)), device=device)


def loaders_state_dict(name2loader: dict) -> dict:
    """Positions of every loader that can report one (name -> state)."""
    return {name: loader.state_dict() for name, loader in name2loader.items()
            if hasattr(loader, "state_dict")}


def load_loaders_state(name2loader: dict, state: dict) -> list:
    """Restore positions; returns the names that had no saved position (for a warning)."""
    missing = []
    for name, loader in name2loader.items():
        if name in state and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(state[name])
        else:
            missing.append(name)
    return missing
