"""Rank helpers over ``torch.distributed`` (replacing upstream's Horovod calls).

Everything works without an initialised process group: rank 0 of a world of 1.
:func:`as_data_rank` lets one process build the datasets of another rank of a larger world
(``--virtual_world_size``, :mod:`utils.virtual_world`): :func:`shard` and :func:`data_rank`
follow it, while the communication helpers keep using the real process group.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


_DATA_RANK: list = []  # (rank, world_size) overrides, innermost last


@contextlib.contextmanager
def as_data_rank(rank: int, world_size: int):
    """Build datasets as rank ``rank`` of ``world_size`` would (data sharding and item seeds
    only; collectives still see the real process group)."""
    _DATA_RANK.append((rank, world_size))
    try:
        yield
    finally:
        _DATA_RANK.pop()


def data_rank() -> tuple[int, int]:
    """(rank, world size) whose data shard this process builds now (data.md §11.2)."""
    return _DATA_RANK[-1] if _DATA_RANK else (get_rank(), get_world_size())


def shard(items, rank: int | None = None, world_size: int | None = None) -> list:
    """Keep ``items[rank::world_size]`` as upstream's datasets do (data.md §11.2)."""
    rank = data_rank()[0] if rank is None else rank
    world_size = data_rank()[1] if world_size is None else world_size
    return list(items)[rank::world_size]


def all_gather_object(obj) -> list:
    """Gather any picklable object from every rank, in rank order."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Return rank ``src``'s value of ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward keeps only this rank's slice.

    The incoming gradient is not reduced across ranks (model.md §8.4): each rank's loss already
    covers the whole gathered batch, and the data-parallel gradient all-reduce does the rest.
    """

    @staticmethod
    def forward(ctx, tensor):
        sizes = all_gather_object(tensor.size(0))
        rank = get_rank()
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
        width = max(sizes)
        padded = tensor
        if tensor.size(0) < width:
            pad = tensor.new_zeros((width - tensor.size(0), *tensor.shape[1:]))
            padded = torch.cat([tensor, pad], dim=0)
        out = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(out, padded.contiguous())
        return torch.cat([o[:n] for o, n in zip(out, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output[ctx.start:ctx.stop]


_GATHER_OVERRIDE: list = []  # innermost last


@contextlib.contextmanager
def overriding_gather(fn):
    """Route the VSM embedding all-gather (``model.vsm.gather_for_scoring``) through
    ``fn(query_norm, frames_norm, c_mask)`` (virtual ranks, :mod:`utils.virtual_gather`)."""
    _GATHER_OVERRIDE.append(fn)
    try:
        yield
    finally:
        _GATHER_OVERRIDE.pop()


def gather_override():
    """The active override of the VSM embedding all-gather, or ``None``."""
    return _GATHER_OVERRIDE[-1] if _GATHER_OVERRIDE else None


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Autograd-aware all-gather along dim 0 (sizes may differ per rank); identity alone."""
    if not is_distributed():
        return tensor
    return _AllGatherWithGrad.apply(tensor)
