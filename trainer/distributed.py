"""Training on several processes under torchrun: the process group, who writes, and which
photos of each global batch each process trains on.

`torchrun --nproc-per-node N -m trainer train ...` starts N copies of the same run. Every
process loads the same data, builds the same model from the same seed and computes the same
validation scores; each trains on its slice of every global batch of `batch_size` photos and
DistributedDataParallel averages the gradients, so N processes take the steps one process
would take. Only rank 0 writes the run folder (same files, same checkpoints). Backend: NCCL on
GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def start(device_name: str) -> tuple[Processes, str]:
    """Join torchrun's process group when launched by it; returns the processes and the device
    this one trains on (cuda:LOCAL_RANK on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes(), device_name
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    elif device_name == "auto":
        device_name = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Processes(rank, world, local_rank), device_name


def stop() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shard(batch: list[int], processes: Processes) -> list[int]:
    """This process's contiguous slice of a global batch (sizes differ by at most one)."""
    if not processes.distributed:
        return batch
    size, extra = divmod(len(batch), processes.world)
    start = processes.rank * size + min(processes.rank, extra)
    return batch[start:start + size + (processes.rank < extra)]


def wrap(model: torch.nn.Module, processes: Processes, device: torch.device) -> torch.nn.Module:
    """The module to run the training forward pass through: DDP when distributed (built after
    freezing, since DDP fixes the set of trainable parameters when it is built)."""
    if not processes.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                   else None)
