"""``--virtual_world_size N``: W real processes compute what an N-process run computes.

Why (issue 16): upstream's results depend on the number of GPUs (training.md §2.4, §3.7):
gradients are *summed* over ranks, each rank trains on its own shard (data.md §11.2) and
``train_batch_size`` is per rank. With W processes (W divides N) each real rank plays
``k = N / W`` virtual ranks, one micro-batch after another:

* **Mapping**: real rank ``R`` plays the global ranks ``R·k .. R·k + k − 1`` (blocks, so the
  virtual ranks of all processes, concatenated in process order, are in global rank order;
  the VSM all-gather relies on that). Global rank 0 is local rank 0 of process 0: its losses
  are the ones logged, as rank 0's are in an N-process run.
* **Data**: each virtual rank's loaders are built under :func:`utils.distributed.as_data_rank`,
  so datasets keep the shard (and :class:`data.resumable.SeededItems` the item seeds) of that
  rank of N.
* **Randomness**: an N-process run seeds every rank alike (training.md §3.2), then each rank's
  stream advances with its own data. Every virtual rank has its own Python/NumPy/torch(/CUDA)
  state, which starts as the state after model construction and is swapped in around
  everything that rank does (building its loaders, the task draw, fetching a batch, its
  forward/backward).
* **Task draw** (§3.9): every virtual rank draws, as every real rank does, and global rank 0's
  draw is used (broadcast from process 0).
* **Gradients**: the engine runs all ``k`` micro-batches of each accumulation step, the DDP
  all-reduce only after the very last backward of the update; clipping, the loss scaler and the
  LR schedule then act once on the sum over N ranks and all micro-batches, as in the N-process
  run.
* **All-gathered losses** (VSM ranking losses of pre-training, VCMR and VR, model.md §8.4):
  the gather spans all N virtual ranks with upstream's backward, through a first no-grad pass
  that caches every rank's embeddings (:mod:`utils.virtual_gather`).
* **Validation** (loss validation of pre-training and VCMR/VR): each virtual rank builds and
  runs the validation loaders of its rank of N on its own (forked) RNG stream, the ranks in
  lockstep so that all-gathered losses gather through the same cache; the sums are reduced
  over all N ranks in rank order (:meth:`VirtualWorld.validation_sums`).
* **Training state**: the RNG states and loader positions of all N virtual ranks are saved, so
  ``--resume`` continues each of them exactly.

With N = W (the default) ``k = 1`` and nothing is swapped: the plain N-process path.
"""
from __future__ import annotations

import contextlib
import functools
import random
from collections import defaultdict

import torch

from config.config import ConfigError, describe_origin
from data.loader import MetaLoader
from utils.distributed import (
    all_gather_object,
    as_data_rank,
    broadcast_object,
    get_rank,
    get_world_size,
)
from utils.save import rng_state, set_rng_state
from utils.virtual_gather import GatherCache, capture_embeddings


def resolve_virtual_world_size(opts, world_size: int) -> int:
    """Validate ``opts.virtual_world_size`` against the ``world_size`` real processes and set
    it (``None`` means ``world_size``); refused with a :class:`ConfigError` naming the flag."""
    size = getattr(opts, "virtual_world_size", None)
    size = world_size if size is None else size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1 or size % world_size:
        origin = describe_origin(opts, "virtual_world_size")
        origin = "" if not origin or origin.startswith("from --") else f" ({origin})"
        raise ConfigError(
            f"--virtual_world_size {size!r}{origin} must be a "
            f"positive multiple of the number of processes ({world_size}): each process "
            "plays the same number of virtual ranks")
    opts.virtual_world_size = size
    return size


class VirtualWorld:
    """The virtual ranks one process plays, with their RNG streams (see the module doc)."""

    def __init__(self, size: int, real_rank: int, real_size: int):
        self.size, self.real_rank, self.real_size = size, real_rank, real_size
        self.per_rank = size // real_size
        self._rngs: list = []

    @property
    def active(self) -> bool:
        """More than one virtual rank per process (else the plain path, nothing swapped)."""
        return self.per_rank > 1

    def global_rank(self, local: int) -> int:
        return self.real_rank * self.per_rank + local

    def build(self, fn) -> list:
        """``[fn() for each local virtual rank]``, each call as that rank: its data shard and
        its RNG stream, which starts from the state every rank of the N-process run has now."""
        if not self.active:
            return [fn()]
        start, out, self._rngs = rng_state(), [], []
        for local in range(self.per_rank):
            set_rng_state(start)
            with as_data_rank(self.global_rank(local), self.size):
                out.append(fn())
            self._rngs.append(rng_state())
        return out

    @contextlib.contextmanager
    def playing(self, local: int):
        """Run a block on virtual rank ``local``'s RNG stream, advancing it."""
        if not self.active:
            yield
            return
        set_rng_state(self._rngs[local])
        try:
            yield
        finally:
            self._rngs[local] = rng_state()

    @contextlib.contextmanager
    def peeking(self, local: int):
        """Run a block on a copy of virtual rank ``local``'s RNG stream (it does not advance);
        a process without virtual ranks gets its own state back afterwards."""
        saved = rng_state()
        if self.active:
            set_rng_state(self._rngs[local])
        try:
            yield
        finally:
            set_rng_state(saved)

    def rng_states(self) -> list:
        """The RNG state of every local virtual rank (this process's state when k = 1)."""
        return list(self._rngs) if self.active else [rng_state()]

    def load_rng_states(self, states: list) -> None:
        if self.active:
            self._rngs = list(states)
        else:
            set_rng_state(states[0])

    @contextlib.contextmanager
    def forked(self):
        """Validation runs on copies of the virtual ranks' streams, as every rank of the
        N-process run validates under ``utils.engine.forked_rng``: training never notices."""
        saved = list(self._rngs)
        try:
            yield
        finally:
            self._rngs = saved

    def build_each(self, fn) -> list:
        """``[fn() for each local virtual rank]``, each as that rank (its data shard, its RNG
        stream, advancing it): the validation loaders, which rank r of N builds itself."""
        out = []
        for local in range(self.per_rank):
            with self.playing(local), as_data_rank(self.global_rank(local), self.size):
                out.append(fn())
        return out

    def validation_sums(self, loaders: list, step, gathers: bool = False) -> dict:
        """Sums of ``step(batch)`` (key -> float) over every batch of all N ranks'
        validation loaders (``loaders``: this process's, by local rank), reduced as an
        N-process run reduces them: each rank's sums, added in global rank order.

        The ranks run in lockstep, batch i of every rank before batch i + 1 of any, on their
        own RNG streams. ``gathers``: the step's loss all-gathers embeddings (VSM ranking
        losses): the gather of batch i spans the ranks that have a batch i, through the cache
        of :mod:`utils.virtual_gather`. Ranks with fewer batches (shards differ by one item)
        thus drop out of the gather after their last batch, in real multi-process runs too,
        which before fell out of step in their collectives. Losses that do not gather are
        unaffected by the lockstep: every rank runs all its batches."""
        counts = self.gather([len(loader) for loader in loaders])
        sums = [defaultdict(float) for _ in loaders]
        iters = []
        for local, loader in enumerate(loaders):
            with self.playing(local):
                iters.append(iter(loader))
        with torch.no_grad():
            for i in range(max(counts, default=0)):
                batches = {}
                for local, it in enumerate(iters):
                    if i < counts[self.global_rank(local)]:
                        with self.playing(local):
                            batches[local] = next(it)
                cached = gathers and (self.active or min(counts) <= i)
                self._validation_step(batches, step, sums, cached)
        totals = defaultdict(float)
        for part in self.gather([dict(s) for s in sums]):
            for key, value in part.items():
                totals[key] += value
        return totals

    def _validation_step(self, batches: dict, step, sums: list, cached: bool) -> None:
        """Batch i of the local ranks that have one; ``cached``: their gather reads the
        embeddings every taking-part rank caches first (collective over processes)."""
        cache = self._gather_cache(batches, step) if cached else None
        for local, batch in batches.items():
            serving = cache.serving(local) if cache is not None else contextlib.nullcontext()
            with self.playing(local), serving:
                for key, value in step(batch).items():
                    sums[local][key] += float(value)

    def micro_steps(self, name: str, batches: list, last: bool, step, capture=None) -> None:
        """One micro-step of every local virtual rank: ``step(name, batch, sync, local)`` on
        that rank's RNG stream, ``sync`` (the DDP all-reduce) only for the update's very last
        backward. ``capture(name, batch)``, given for a task whose loss all-gathers, is the
        forward whose embeddings the gather over all N virtual ranks caches first
        (:mod:`utils.virtual_gather`)."""
        cache = None
        if capture is not None:
            cache = self._gather_cache(dict(enumerate(batches)),
                                       functools.partial(capture, name))
        for local, batch in enumerate(batches):
            serving = cache.serving(local) if cache is not None else contextlib.nullcontext()
            with self.playing(local), serving:
                step(name, batch, last and local == len(batches) - 1, local)

    def _gather_cache(self, batches: dict, forward) -> GatherCache:
        """``forward(batch)`` of each local rank in ``batches`` (local rank -> batch) up to the
        gather, on a copy of that rank's RNG stream (its real pass then draws the same), and
        the cache of every taking-part rank's embeddings (collective over processes)."""
        embeddings = {}
        for local, batch in batches.items():
            with self.peeking(local):
                embeddings[local] = capture_embeddings(functools.partial(forward, batch))
        return GatherCache(self, embeddings)

    def gather(self, local_values: list) -> list:
        """Every virtual rank's value in global rank order (collective over processes)."""
        return [v for part in all_gather_object(list(local_values)) for v in part]

    def local_slice(self, values: list) -> list:
        """This process's entries of a list indexed by global virtual rank."""
        start = self.global_rank(0)
        return values[start:start + self.per_rank]


def plain_world() -> VirtualWorld:
    """The world of the real processes, without virtual ranks (a task used on its own)."""
    return VirtualWorld(get_world_size(), get_rank(), get_world_size())


class VirtualMetaLoader:
    """:class:`data.loader.MetaLoader` over the local virtual ranks' loaders.

    Yields ``(task, [batch of each local virtual rank])``. At the start of every accumulation
    cycle each virtual rank draws with its own Python ``random`` (so its stream advances as in
    the N-process run) and global rank 0's draw is used, broadcast from process 0 (training.md
    §3.9). With one virtual rank per process this is exactly ``MetaLoader``'s stream.
    """

    def __init__(self, rank_loaders: list, accum_steps: int, world: VirtualWorld,
                 distributed: bool):
        self.world, self.accum_steps, self.distributed = world, accum_steps, distributed
        self.metas = []
        for local, loaders in enumerate(rank_loaders):
            with world.playing(local):
                self.metas.append(MetaLoader(loaders, accum_steps))
        self.step = 0

    def _draw(self) -> str:
        draws = []
        for local, meta in enumerate(self.metas):
            with self.world.playing(local):
                draws.append(random.choice(meta.sampling_pools))
        return broadcast_object(draws[0]) if self.distributed else draws[0]

    def _batches(self, task: str) -> list:
        batches = []
        for local, meta in enumerate(self.metas):
            with self.world.playing(local):
                batches.append(meta._next_batch(task))
        return batches

    def __iter__(self):
        task = None
        while True:
            if self.step % self.accum_steps == 0:
                task = self._draw()
            self.step += 1
            yield task, self._batches(task)
