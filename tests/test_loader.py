"""MetaLoader task mixing, PrefetchLoader pass-through and build_dataloader (data.md §11)."""
from __future__ import annotations

import random
import signal
from collections import Counter
from itertools import islice
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import data.loader as loader_mod
from data.loader import MetaLoader, PrefetchLoader, build_dataloader, move_to_device


class _Epochs:
    """Re-iterable loader of ``n`` batches; counts how many epochs were started."""

    def __init__(self, name, n):
        self.name, self.n, self.epochs = name, n, 0
        self.dataset = f"{name}-dataset"

    def __iter__(self):
        self.epochs += 1
        return iter([(self.name, self.epochs, i) for i in range(self.n)])

    def __len__(self):
        return self.n


def test_meta_loader_ratio_statistics():
    random.seed(77)
    loaders = {"mlm": (_Epochs("mlm", 3), 2), "mfm": (_Epochs("mfm", 3), 2),
               "fom": (_Epochs("fom", 3), 1), "vsm": (_Epochs("vsm", 3), 2)}
    meta = MetaLoader(loaders, accum_steps=1)
    assert Counter(meta.sampling_pools) == {"mlm": 2, "mfm": 2, "fom": 1, "vsm": 2}
    counts = Counter(task for task, _ in islice(meta, 14000))
    for task, ratio in (("mlm", 2), ("mfm", 2), ("fom", 1), ("vsm", 2)):
        assert abs(counts[task] / 14000 - ratio / 7) < 0.015, (task, counts)


def test_meta_loader_same_task_within_accumulation_cycle():
    random.seed(0)
    meta = MetaLoader({"a": _Epochs("a", 5), "b": _Epochs("b", 7), "c": _Epochs("c", 2)},
                      accum_steps=3)
    tasks = [task for task, _ in islice(meta, 300)]
    cycles = [tasks[i:i + 3] for i in range(0, 300, 3)]
    assert all(len(set(cycle)) == 1 for cycle in cycles)
    assert len({cycle[0] for cycle in cycles}) == 3  # but tasks do change between cycles


def test_meta_loader_draws_with_python_random_per_cycle(monkeypatch):
    draws = iter(["b", "a", "b"])
    monkeypatch.setattr(loader_mod.random, "choice", lambda pool: next(draws))
    meta = MetaLoader({"a": _Epochs("a", 9), "b": _Epochs("b", 9)}, accum_steps=2)
    assert [task for task, _ in islice(meta, 6)] == ["b", "b", "a", "a", "b", "b"]


def test_meta_loader_recreates_exhausted_iterator():
    random.seed(1)
    single = _Epochs("only", 2)
    meta = MetaLoader({"only": single}, accum_steps=1)
    batches = [batch for _, batch in islice(meta, 5)]
    assert batches == [("only", 1, 0), ("only", 1, 1), ("only", 2, 0), ("only", 2, 1),
                       ("only", 3, 0)]
    assert single.epochs == 3


def test_meta_loader_broadcasts_rank0_choice(monkeypatch):
    calls = []

    def fake_broadcast(obj, src=0):
        calls.append(obj)
        return "rank0-task"

    monkeypatch.setattr(loader_mod, "broadcast_object", fake_broadcast)
    meta = MetaLoader({"a": _Epochs("a", 4), "rank0-task": _Epochs("rank0-task", 4)},
                      accum_steps=2, distributed=True)
    assert [task for task, _ in islice(meta, 4)] == ["rank0-task"] * 4
    assert len(calls) == 2  # one broadcast per accumulation cycle


def test_meta_loader_rejects_bad_ratio():
    with pytest.raises(ValueError, match="'x'"):
        MetaLoader({"x": (_Epochs("x", 1), -1)})
    with pytest.raises(ValueError, match="'x'"):
        MetaLoader({"x": (_Epochs("x", 1), 1.5)})
    with pytest.raises(ValueError, match="every task ratio is 0"):
        MetaLoader({"x": (_Epochs("x", 1), 0)})
    with pytest.raises(ValueError):
        MetaLoader({})


def test_meta_loader_ratio_zero_task_is_never_drawn():
    """Upstream's pool is ``[name] * ratio``: a 0 ratio switches the task off."""
    random.seed(3)
    meta = MetaLoader({"on": (_Epochs("on", 2), 1), "off": (_Epochs("off", 2), 0)})
    assert {task for task, _ in islice(meta, 50)} == {"on"}
    assert meta.sampling_pools == ["on"]


def test_prefetch_loader_passes_task_batches_through_on_cpu():
    batch = {"ids": torch.tensor([[1, 2]]), "vids": ["v1"], "nested": ([torch.ones(2)], 3)}
    source = [("mlm", batch), ("vsm", {"x": torch.zeros(1)})]
    inner = _Epochs("e", 2)
    prefetch = PrefetchLoader(source, device="cpu")
    out = list(prefetch)
    assert out[0][0] == "mlm" and out[0][1] is batch and out[1][0] == "vsm"
    wrapped = PrefetchLoader(inner, device="cpu")
    assert len(wrapped) == 2 and wrapped.dataset == "e-dataset"
    assert list(wrapped) == [("e", 1, 0), ("e", 1, 1)]
    with pytest.raises(AttributeError):
        wrapped.no_such_attribute  # noqa: B018


def test_prefetch_loader_wraps_an_infinite_meta_loader():
    random.seed(3)
    meta = MetaLoader({"a": _Epochs("a", 2)}, accum_steps=1)
    assert [task for task, _ in islice(PrefetchLoader(meta, device="cpu"), 5)] == ["a"] * 5


def test_move_to_device_keeps_structure_and_non_tensors():
    batch = {"t": torch.arange(3), "l": [torch.ones(1), "s"], "tup": (1, torch.zeros(2)),
             "n": None}
    moved = move_to_device(batch, torch.device("cpu"))
    assert moved["t"].tolist() == [0, 1, 2] and moved["l"][1] == "s"
    assert isinstance(moved["l"], list) and isinstance(moved["tup"], tuple)
    assert moved["tup"][0] == 1 and moved["n"] is None


class _RandomItems(Dataset):
    """Items that expose the worker's Python ``random`` and NumPy states."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return i, random.random(), float(np.random.rand())


def _collate(items):
    return items


def test_build_dataloader_settings_and_worker_seeding():
    opts = SimpleNamespace(train_batch_size=4, val_batch_size=3, n_workers=0, pin_mem=True)
    train = build_dataloader(_RandomItems(), _collate, True, opts)
    val = build_dataloader(_RandomItems(), _collate, False, opts)
    assert train.batch_size == 4 and val.batch_size == 3
    assert isinstance(train.sampler, torch.utils.data.RandomSampler)
    assert isinstance(val.sampler, torch.utils.data.SequentialSampler)
    assert train.pin_memory == torch.cuda.is_available()
    assert [i for batch in val for i, _, _ in batch] == list(range(8))
    opts.n_workers, opts.val_batch_size = 2, 1
    loader = build_dataloader(_RandomItems(), _collate, False, opts)
    assert loader.persistent_workers and loader.num_workers == 2
    items = [item for batch in loader for item in batch]
    by_worker = {i % 2: (r, n) for i, r, n in items if i < 2}  # items 0, 1 -> workers 0, 1
    assert by_worker[0][0] != by_worker[1][0]
    assert by_worker[0][1] != by_worker[1][1]  # NumPy seeded per worker too


def test_worker_init_fn_seeds_random_and_numpy_from_torch_seed():
    torch.manual_seed(2**33 + 5)  # reduced modulo 2**32 for NumPy
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        loader_mod.worker_init_fn(0)  # a worker's function: it also sets stop-signal handlers
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    got = (random.random(), float(np.random.rand()))
    random.seed(5)
    np.random.seed(5)
    assert got == (random.random(), float(np.random.rand()))


def test_benchmark_registry_and_corpus_errors(tmp_path):
    from scripts import benchmark
    assert {"data", "all"} <= set(benchmark.BENCHMARKS)
    opts = benchmark.parse_args(["all", "--workers", "0", "--corpus", str(tmp_path / "nope")])
    assert opts.workers == [0] and opts.num_batches == 20
    with pytest.raises(FileNotFoundError, match="nope"):
        benchmark.bench_data(opts)
    line = benchmark.result("data/x", 1.23456, "items/s")
    assert line["value"] == 1.235 and set(line) == {"figure", "value", "unit", "device"}
