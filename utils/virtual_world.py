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
* **Training state**: the RNG states and loader positions of all N virtual ranks are saved, so
  ``--resume`` continues each of them exactly.

With N = W (the default) ``k = 1`` and nothing is swapped: the plain N-process path.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import random

from config.config import ConfigError, describe_origin
from data.loader import MetaLoader
from utils.distributed import all_gather_object, as_data_rank, broadcast_object
from utils.save import rng_state, set_rng_state
from utils.virtual_gather import GatherCache, capture_embeddings

LOGGER = logging.getLogger(__name__)


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

    def note_validation(self, task, model, name2loader: dict) -> None:
        """Warn that validation runs on the real processes' shards: losses that all-gather
        (VSM/VCMR ranking losses) are then scored against fewer negatives than in the
        N-process run (full-corpus retrieval metrics and the other losses are unaffected)."""
        names = [n for n, (_, ratio) in name2loader.items()
                 if ratio and task.all_gathers(model, n)]
        if self.active and names:
            LOGGER.warning("virtual_world_size %d on %d process(es): the loss validation of "
                           "%s gathers over the %d process(es) only, so its ranking losses "
                           "differ from an %d-process run's (training, checkpoints and "
                           "retrieval metrics do not)", self.size, self.real_size,
                           ", ".join(names), self.real_size, self.size)

    def micro_steps(self, name: str, batches: list, last: bool, step, capture=None) -> None:
        """One micro-step of every local virtual rank: ``step(name, batch, sync, local)`` on
        that rank's RNG stream, ``sync`` (the DDP all-reduce) only for the update's very last
        backward. ``capture(name, batch)``, given for a task whose loss all-gathers, is the
        forward whose embeddings the gather over all N virtual ranks caches first
        (:mod:`utils.virtual_gather`)."""
        cache = None
        if capture is not None:
            embeddings = []
            for local, batch in enumerate(batches):
                with self.peeking(local):
                    embeddings.append(capture_embeddings(functools.partial(capture, name,
                                                                           batch)))
            cache = GatherCache(self, embeddings)
        for local, batch in enumerate(batches):
            serving = cache.serving(local) if cache is not None else contextlib.nullcontext()
            with self.playing(local), serving:
                step(name, batch, last and local == len(batches) - 1, local)

    def gather(self, local_values: list) -> list:
        """Every virtual rank's value in global rank order (collective over processes)."""
        return [v for part in all_gather_object(list(local_values)) for v in part]

    def local_slice(self, values: list) -> list:
        """This process's entries of a list indexed by global virtual rank."""
        start = self.global_rank(0)
        return values[start:start + self.per_rank]


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
