"""Rank helpers over ``torch.distributed`` (replacing upstream's Horovod calls).

Everything works without an initialised process group: rank 0 of a world of 1.
"""
from __future__ import annotations

import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def shard(items, rank: int | None = None, world_size: int | None = None) -> list:
    """Keep ``items[rank::world_size]`` as upstream's datasets do (data.md §11.2)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
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
