"""Where a process runs: the one device resolution, torchrun's process group, per-rank seeds.

``train.py``, ``predict.py`` and ``benchmarks.train_throughput`` all pick their device with
:func:`resolve_device`; under torchrun, :func:`setup_runtime` reads ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` and joins the process group (NCCL on CUDA, gloo on the CPU).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from training.errors import TrainError

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(TrainError):
    """The device asked for is not there; the message says what to pass instead."""


def resolve_device(requested: str, index: int = 0) -> torch.device:
    """``auto`` (CUDA when visible), ``cpu`` or ``cuda``, as the device to run on."""
    if requested not in DEVICES:
        raise DeviceError(f"--device {requested!r} is not one of {DEVICES}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was given but no CUDA device is visible; use --device cpu")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", index)
    return torch.device("cpu")


@dataclass
class Runtime:
    """Where this process runs and how its steps run: device, rank, autocast, memory format."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp: bool = False  # bf16 autocast; only ever on for CUDA
    memory_format: torch.memory_format = torch.contiguous_format

    @property
    def is_main(self) -> bool:
        """Only rank 0 prints progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1

    def sync(self) -> None:
        """Wait for queued CUDA work, so the clock read next includes it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def setup_runtime(device: str, seed: int, amp: bool, channels_last: bool) -> Runtime:
    """Pick the device, join the process group under torchrun, seed this rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    resolved = resolve_device(device, index=int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = resolved.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(resolved)
        # Every batch has the same shapes, so cuDNN's autotuner pays for itself after a step.
        torch.backends.cudnn.benchmark = True
    if world_size > 1 and not dist.is_initialized():
        # torchrun sets MASTER_ADDR/PORT (or its rendezvous does, for multi-node): env:// init.
        dist.init_process_group("nccl" if use_cuda else "gloo")
    seed_everything(seed + rank)  # a different stream per rank, reproducible per rank
    return Runtime(
        device=resolved,
        rank=rank,
        world_size=world_size,
        amp=amp and use_cuda,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
    )


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank0_verdict(problem: str | None, rt: Runtime) -> str | None:
    """Rank 0's ``problem`` (or None) on every rank, so all stop together or go on together.

    A bare barrier would leave the other ranks waiting for a rank 0 that has left.
    """
    if not rt.distributed:
        return problem
    verdict = [problem]
    dist.broadcast_object_list(verdict, src=0)
    return verdict[0]


def wrap_ddp(model: nn.Module, rt: Runtime) -> nn.Module:
    """``model`` in DistributedDataParallel under torchrun, else ``model`` itself."""
    if not rt.distributed:
        return model
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sync_buffers(model: nn.Module, rt: Runtime) -> None:
    """Copy rank 0's BatchNorm statistics to every rank, so all evaluate the saved model."""
    if rt.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def all_reduce_sum(tensor: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place (a no-op in a single process)."""
    if rt.distributed:
        dist.all_reduce(tensor)
    return tensor


def max_over_ranks(value: int, rt: Runtime) -> int:
    """The largest ``value`` of any rank (``value`` itself in a single process)."""
    if not rt.distributed:
        return value
    tensor = torch.tensor([value], device=rt.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def teardown(rt: Runtime) -> None:
    """Leave the process group, if this process joined one."""
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()
