"""Process-group setup for ``torchrun`` and a DDP wrapper with upstream's gradient semantics.

Upstream ran under Horovod (training.md §3.1, §3.7): parameters are broadcast from rank 0 once,
and at the last micro-batch of an accumulation cycle the flattened gradients are all-reduced and
divided by **1.0**, i.e. *summed* over ranks. PyTorch DDP averages by default, so
:func:`wrap_model` registers :func:`sum_allreduce_hook`, which all-reduces without dividing.
Non-final micro-batches run under :func:`maybe_no_sync` so gradients accumulate locally and
only the final one communicates, as upstream's ``delay_unscale`` cycle did.

:func:`init_distributed` reads torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; without
them it is a single process (rank 0 of 1) and no process group is created. Multi-node runs go
through torchrun's rendezvous (``--nnodes``, ``--rdzv_endpoint``) and need nothing here.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

LOGGER = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_min: int = 30) -> DistContext:
    """Join the torchrun process group (NCCL on CUDA, Gloo on CPU) or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min),
                                device_id=device if cuda else None)
        LOGGER.info("process group: backend %s, rank %d of %d, device %s",
                    backend, rank, world, device)
    return DistContext(rank, world, local_rank, device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_distributed() -> None:
    """After a run that ended alike on every rank: wait for all ranks, then close the group.

    Why: a rank that exits while a peer's Gloo connections are still open can make the peer
    abort ("terminate called without an active exception", exit -6) as its group is torn down
    at interpreter exit; meeting first and closing explicitly avoids the race.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    cleanup_distributed()


def sum_allreduce_hook(process_group, bucket):
    """DDP comm hook: all-reduce a gradient bucket with SUM and no division (upstream §3.7)."""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_model(model, ctx: DistContext, find_unused_parameters: bool = True):
    """DDP with the sum hook when distributed; the bare model otherwise.

    DDP broadcasts rank 0's parameters and buffers at construction (upstream's initial
    broadcast). ``find_unused_parameters`` is needed for multi-task models, where each task
    uses only part of the network.
    """
    if not ctx.distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=ids,
                                  find_unused_parameters=find_unused_parameters)
    ddp.register_comm_hook(state=None, hook=sum_allreduce_hook)
    return ddp


def unwrap_model(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def maybe_no_sync(model, sync: bool):
    """``model.no_sync()`` on non-final micro-batches of a DDP model; a null context otherwise."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def max_over_ranks(values, device) -> list:
    """Each value's maximum over every rank, in one all-reduce (every rank gets the same)."""
    values = [float(v) for v in values]
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
