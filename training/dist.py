"""Processes and devices: this process's place in a torchrun job, its device and dtype, and the collectives."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from training import TrainingError


@dataclass
class Dist:
    """This process's place in the job (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain run is 0 of 1)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs and saves."""
        return self.rank == 0

    def say(self, message: str) -> None:
        """Print on rank 0 only."""
        if self.main:
            print(message)


def setup_distributed(device: str) -> Dist:
    """Pick the device and join the process group: NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("run.device=cuda but no CUDA device is available; use --run.device cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if use_cuda:
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return Dist(rank, world, local_rank, dev)


def close_distributed(d: Dist) -> None:
    """Leave the process group joined by setup_distributed."""
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def data_parallel(model: nn.Module, d: Dist) -> nn.Module:
    """The module the training step calls: ``model`` itself on one process, else DDP over its trainable tensors."""
    if d.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Only the trainable tensors are synchronised: every process loaded the same frozen base from disk, so
    # broadcasting billions of frozen values at start-up would be wasted.
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def all_reduce_sum(x: Tensor, d: Dist) -> Tensor:
    """Sum ``x`` over the processes of the job, in place; returns it."""
    if d.world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(d: Dist) -> None:
    """Wait for every process of the job."""
    if d.world > 1:
        dist.barrier()


def leave_together(d: Dist) -> None:
    """A barrier as the last collective before every rank stops (the end of a run, or a stop all ranks agreed on).

    Otherwise a rank can reach interpreter teardown while a gloo worker thread still drops the Python tensors of an
    earlier collective; that decref needs the GIL, which a finalizing interpreter cannot give, and the process aborts
    ("terminate called without an active exception"). A barrier's work holds no Python tensors, and waiting on it
    frees the GIL for the workers.
    """
    barrier(d)


def memory_mib(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory, or the process's peak resident size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
