"""Distributed set-up for distillation under ``torchrun``: one process per device, DistributedDataParallel.

Each process trains on its ``DistributedSampler`` shard with ``batch_size / world_size`` images and DDP
averages gradients, so N processes train the same model as one process with the same global batch
(BatchNorm statistics are per process unless on CUDA, where convnets use SyncBatchNorm). Rank 0 decodes
data, computes cached teacher maps, evaluates and writes; the others wait at barriers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DistEnv", "setup_distributed", "shutdown_distributed"]


@dataclass(frozen=True)
class DistEnv:
    """This process: ``world`` processes in all, its ``rank`` and ``local_rank``, and its ``device``."""

    world: int
    rank: int
    local_rank: int
    device: torch.device

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the processes (as is with one process)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def sync_batchnorm(self, model: nn.Module) -> nn.Module:
        """SyncBatchNorm across the processes on CUDA (as is otherwise)."""
        if self.world > 1 and self.device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel with more than one process (as is otherwise)."""
        if self.world == 1:
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None)


def setup_distributed(device: str | None = None) -> DistEnv:
    """Read torchrun's ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``, start the process group when there is more
    than one process (NCCL on CUDA, else gloo), and pick the device: ``device`` ('cpu' | 'cuda' | None:
    CUDA when available), cuda:LOCAL_RANK under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available()
                                             and device != "cpu" else "gloo")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local_rank}" if device == "cuda" and world > 1 else device)
    return DistEnv(world, rank, local_rank, dev)


def shutdown_distributed() -> None:
    """Destroy the process group if one was started (the command line does this after a run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
