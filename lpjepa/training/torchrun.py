"""torchrun set-up and the few collectives the training loop needs (the loss's own are in lpjepa.distributed).

Started without torchrun's environment variables, everything here is a no-op on one process.
"""
import os
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..distributed import destroy_process_group
from .cli import UsageError


class DistEnv(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def resolve_device(flag="auto", local_rank=0):
    """'auto' is cuda (this process's GPU under torchrun) when available, else cpu."""
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(flag)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"argument --device: invalid value {flag}: no CUDA GPU is visible here; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def setup(device_flag="auto"):
    """Join the process group torchrun describes (nccl on CUDA, gloo on the CPU) and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_flag, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world_size, local_rank, device)


def cleanup(finished=True):
    """Leave the process group, if one was joined.

    After a finished run every rank waits for the others and lets the backend's threads
    settle first (``lpjepa.distributed.destroy_process_group``); after an error it leaves
    at once, since the other ranks may never reach that barrier.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished:
        destroy_process_group()
    else:
        dist.destroy_process_group()


def barrier(env):
    if env.distributed:
        dist.barrier()


def all_reduce(tensor, env, op="sum"):
    """Sum (or max) of a tensor over the processes, in place; returns it."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor
