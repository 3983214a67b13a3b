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


def data_parallel(model: nn.Module, d: Dist, strategy: str = "ddp") -> nn.Module:
    """The module the training step calls: ``model`` itself on one process, else DDP over its trainable tensors, or
    with ``strategy="fsdp"`` the model with its frozen base sharded (``shard_frozen_base``)."""
    if d.world == 1:
        return model
    if strategy == "fsdp":
        return shard_frozen_base(model, d)
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Only the trainable tensors are synchronised: every process loaded the same frozen base from disk, so
    # broadcasting billions of frozen values at start-up would be wasted.
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def shard_frozen_base(model: nn.Module, d: Dist) -> nn.Module:
    """Shard the frozen base over the processes with torch FSDP2 (``fully_shard``, in place); returns ``model``.

    Units: each transformer block, inside it its attention's ``wk`` and ``wv`` as units of their own, and the root
    (embeddings, output, final norm, CLIP tower), each gathered only while it runs. ``wk`` / ``wv`` get their own
    units because adaption prompts, prefixes and the visual prompt pass through a layer's frozen wk / wv once per
    sequence at the top of the forward (``Method.sequence_state``), before that layer's block runs.

    The trainable tensors are not sharded (``ignored_params``): they stay whole, fp32, the same on every process,
    as under DDP. They are small (7B adaption prompts: 1.2M values) and some are read outside their block (the
    prompts, by ``sequence_state``); kept whole, the optimizer over them, its state in state.pt, gradient clipping
    and the saved adapter are exactly those of one process. FSDP then reduces no gradient (the frozen base has
    none): ``average_gradients`` averages theirs once per optimizer step.

    The model may arrive on the CPU (it is built there on GPU runs, so no GPU ever holds the whole base):
    ``fully_shard`` moves each process's shards to its device, and the trainable tensors are moved here.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from model.methods.base import WrappedLinear

    # By name, not requires_grad: tensors a v2 phase holds still (optim.trainable) stay whole and unsharded too.
    trainable = [p for _, p in model.trainable_parameters()]  # a list: the same order on every process
    quantized = [(n, type(p.data)) for n, p in model.named_parameters() if type(p.data) is not Tensor]
    if quantized:  # torchao 0.18: Int8Tensor has no aten.split; NF4 needs block scales that divide by the world
        name, kind = quantized[0]
        raise TrainingError(
            f"--dist.strategy fsdp cannot shard a quantized base ({name} is a {kind.__name__}); use "
            "--model.quantize none with fsdp, or --dist.strategy ddp for the quantized base"
        )
    if getattr(model, "compile_blocks", False):  # FSDP's hooks inside a block stop torch.compile's whole graph
        raise TrainingError("--train.compile does not work with --dist.strategy fsdp; use --dist.strategy ddp")
    with torch.no_grad():
        for p in trainable:
            p.data = p.data.to(d.device)
            dist.broadcast(p.data, src=0)  # replicas start equal, as DDP makes them
    mesh = init_device_mesh(d.device.type, (d.world,))
    for block in model.layers:
        for linear in (block.attention.wk, block.attention.wv):
            fully_shard(linear, mesh=mesh, ignored_params=set(trainable))
            if isinstance(linear, WrappedLinear):  # the visual prompt reads its frozen weight alone: gather for it
                register_fsdp_forward_method(linear, "frozen")
        fully_shard(block, mesh=mesh, ignored_params=set(trainable))
    fully_shard(model, mesh=mesh, ignored_params=set(trainable))
    return model


def is_sharded(net: nn.Module) -> bool:
    """Whether ``net`` came from ``shard_frozen_base`` (its trainable tensors then need ``average_gradients``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(net, FSDPModule)


def average_gradients(params: list[Tensor], d: Dist) -> None:
    """Average the gradients of replicated trainable tensors over the processes, in one all-reduce (what DDP does
    for its model). Every process used the same tensors this step, so every process sends the same layout."""
    grads = [p.grad for p in params if p.grad is not None]
    if d.world == 1 or not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= d.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def sharding_error(e: RuntimeError, method: str) -> TrainingError | None:
    """The clear error for a PEFT method that reads a frozen base weight outside the unit that owns it (DTensor
    mixed with a plain tensor in the first sharded forward), else None."""
    if "DTensor" not in str(e):
        return None
    first = str(e).strip().splitlines()[0]
    return TrainingError(
        f"--dist.strategy fsdp: the PEFT method {method!r} reads a frozen base weight outside the module that owns "
        f"it, which sharding cannot serve ({first}); train it with --dist.strategy ddp"
    )


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
