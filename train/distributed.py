"""Training in several processes under `torchrun --nproc-per-node N -m train ...`.

Every process trains on its own contiguous slice of each global batch, so the sequences of a step are those a
single process would see, and the averaged gradients are the single-process gradients up to float rounding.
The model is replicated (DistributedDataParallel) or sharded (FSDP2, `fully_shard`); checkpoints hold full,
unsharded state dicts that rank 0 writes. All communication is torch.distributed (NCCL on CUDA, gloo on CPU).
Without torchrun everything here reduces to the one process: no process group, no wrapper.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from model.errors import ConfigError, NextDeployError

# --parallel auto shards models from this size on (the small presets) and replicates smaller ones (tiny).
FSDP_FROM_PARAMETERS = 100_000_000
PARALLEL_CHOICES = ("auto", "ddp", "fsdp")

T = TypeVar("T")


class Processes:
    """This process's place among torchrun's processes (rank 0 of 1 without torchrun)."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def start(self, device: torch.device) -> torch.device:
        """Join the process group; returns this process's device (cuda:LOCAL_RANK on CUDA)."""
        self.device = device
        if not self.distributed:
            return device
        if device.type == "cuda":
            if device.index is not None:
                raise ConfigError(f"--device {device} names one GPU, but under torchrun each process uses the GPU "
                                  "of its LOCAL_RANK; pass --device cuda or leave --device out")
            if self.local_rank >= torch.cuda.device_count():
                raise ConfigError(f"torchrun started {self.world_size} processes on this machine but only "
                                  f"{torch.cuda.device_count()} GPUs are visible; use --nproc-per-node "
                                  f"{torch.cuda.device_count()} or fewer")
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
            dist.init_process_group("nccl", device_id=self.device)
        else:
            dist.init_process_group("gloo")
        return self.device

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0, then on the others (which then find rank 0's caches filled). An error on rank 0
        is raised on every rank, so no process waits for one that has stopped."""
        if not self.distributed:
            return fn()
        if self.is_main:
            try:
                result = fn()
            except NextDeployError as e:
                dist.broadcast_object_list([str(e)], src=0)
                raise
            dist.broadcast_object_list([None], src=0)
            return result
        message = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None:
            raise NextDeployError(message[0])
        return fn()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over the processes (in place)."""
        if self.distributed:
            dist.all_reduce(values)
        return values

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is true on any: all of them stop at the same step."""
        if not self.distributed:
            return flag
        return bool(self.sum(torch.tensor([float(flag)], device=self.device)).item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def launcher(world_size: int) -> str:
    """How to start a run of `world_size` processes, up to the module name."""
    return "python -m" if world_size == 1 else f"torchrun --nproc-per-node {world_size} -m"


def stop() -> None:
    """Leave the process group (after a run that ended the same way on every process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def choose_parallel(choice: str, num_parameters: int) -> str:
    if choice == "auto":
        return "fsdp" if num_parameters >= FSDP_FROM_PARAMETERS else "ddp"
    if choice not in PARALLEL_CHOICES:
        raise ConfigError(f"parallel must be one of {', '.join(PARALLEL_CHOICES)}, got {choice!r}")
    return choice


def parallelize(model: nn.Module, mode: str, processes: Processes) -> nn.Module:
    """The module the training step calls: DDP around `model`, or `model` itself sharded in place by FSDP2
    (each decoder layer one unit, gathered just before it runs), or `model` alone for one process."""
    if not processes.distributed:
        return model
    device = processes.device
    if mode == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (processes.world_size,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def gradient_sync(model: nn.Module, enabled: bool):
    """Context for one micro-batch's backward: with gradient accumulation only the last one communicates."""
    if isinstance(model, DistributedDataParallel):
        return nullcontext() if enabled else model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)
_FROM_FULL = StateDictOptions(full_state_dict=True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts keyed by parameter name, on rank 0's CPU (other ranks may
    get empty dicts). Collective: every process calls it."""
    return get_model_state_dict(model, options=_FULL_ON_RANK0), \
        get_optimizer_state_dict(model, optimizer, options=_FULL_ON_RANK0)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    """The inverse of `full_state`, every process holding the full dicts (each keeps its own shard)."""
    set_model_state_dict(model, model_state, options=_FROM_FULL)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_FROM_FULL)
