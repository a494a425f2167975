"""VSM's embedding all-gather over virtual ranks (issue 16; model.md §8.4, training.md §3.1).

In an N-process run every rank scores its queries against the query and frame embeddings of
all N ranks, and the all-gather's backward keeps only the local slice: rank r's parameter
gradient flows through its *own* embeddings only, the other ranks' embeddings acting as
constants in its loss. A process playing the virtual ranks one after another therefore needs,
while it runs rank r's micro-batch, only the *values* of the other ranks' embeddings:

1. a first, no-grad pass over each virtual rank's micro-batch, on a copy of that rank's RNG
   stream (the same dropout masks and drop-span draw as its real pass), stops at the gather
   and caches what it would gather (q̂, V̂, c); processes exchange their caches, one all-gather
   per micro-step (:class:`GatherCache`);
2. each virtual rank's micro-batch then runs as usual: its gather returns the cached
   embeddings of all N ranks in rank order with its own live slice in place, so its loss and
   the gradient reaching its embeddings are exactly rank r's of the N-process run.

Loss validation runs the same two passes without gradients, the virtual ranks in lockstep
(:meth:`utils.virtual_world.VirtualWorld.validation_sums`); a rank whose validation batches
have run out takes no part in the later gathers.

This is the gradient-cache technique (Gao et al., 2021) under upstream's semantics: since the
backward drops the other ranks' slices, no cached embedding gradient needs replaying. Cost: one
extra forward, up to the gather, per micro-batch of a gathering task; memory: one micro-batch's
activations plus the N ranks' embeddings.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from utils.distributed import all_gather_object, overriding_gather


class _Captured(Exception):
    """Stops the first pass at the gather, carrying what it would gather."""

    def __init__(self, tensors: tuple):
        super().__init__("VSM embeddings captured")
        self.tensors = tensors


def _capture(query_norm, frames_norm, c_mask):
    raise _Captured((query_norm.detach(), frames_norm.detach(),
                     c_mask.to(frames_norm.dtype)))


def capture_embeddings(forward) -> tuple:
    """Run ``forward()`` without gradients up to the VSM gather; return (q̂, V̂, c)."""
    with torch.no_grad(), overriding_gather(_capture):
        try:
            forward()
        except _Captured as done:
            return done.tensors
    raise RuntimeError("the task's loss was declared to all-gather (TrainTask.all_gathers) "
                       "but its forward never reached the VSM embedding gather")


class GatherCache:
    """Every taking-part virtual rank's (q̂, V̂, c) of one micro-step, in global rank order.

    ``local_embeddings``: local virtual rank -> its embeddings. Every virtual rank takes part
    in training; in validation a rank whose loader has run out does not (it adds no negatives,
    :meth:`utils.virtual_world.VirtualWorld.validation_sums`)."""

    def __init__(self, world, local_embeddings: dict):
        self.world = world
        ranks = {world.global_rank(local): e for local, e in local_embeddings.items()}
        if world.real_size > 1:
            parts = all_gather_object({r: tuple(t.cpu() for t in e) for r, e in ranks.items()})
            device = next(iter(ranks.values()))[0].device if ranks else torch.device("cpu")
            ranks = {r: tuple(t.to(device) for t in e) for part in parts
                     for r, e in part.items()}
        self.ranks = dict(sorted(ranks.items()))
        self.length = max(frames.size(1) for _, frames, _ in self.ranks.values())

    @contextlib.contextmanager
    def serving(self, local: int):
        """The gather of local virtual rank ``local``'s micro-batch reads this cache."""
        with overriding_gather(functools.partial(self._gather, self.world.global_rank(local))):
            yield

    def _gather(self, rank: int, query_norm, frames_norm, c_mask):
        """As ``model.vsm.gather_for_scoring``: pad frames/masks to the longest rank, then
        concatenate in rank order; only ``rank``'s slice is live (carries gradients)."""
        cached = self.ranks[rank]
        if query_norm.shape != cached[0].shape or frames_norm.shape != cached[1].shape:
            raise RuntimeError(
                f"virtual rank {rank}: the VSM embeddings of the training pass "
                f"{tuple(query_norm.shape)}/{tuple(frames_norm.shape)} differ from the first "
                f"pass's {tuple(cached[0].shape)}/{tuple(cached[1].shape)}")
        parts = dict(self.ranks)
        parts[rank] = (query_norm, frames_norm, c_mask.to(frames_norm.dtype))
        padded = [(q, F.pad(v, (0, 0, 0, self.length - v.size(1))),
                   F.pad(c, (0, self.length - c.size(1)))) for q, v, c in parts.values()]
        return tuple(torch.cat(group, dim=0) for group in zip(*padded))
