"""Where a process runs: the one device resolution, torchrun's process group, per-rank seeds.

``train.py``, ``predict.py`` and ``benchmarks.train_throughput`` all pick their device with
:func:`resolve_device`; under torchrun, :func:`setup_runtime` reads ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` and joins the process group (NCCL on CUDA, gloo on the CPU).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    # The process group for stop flags and messages: gloo, so that reading a flag never waits
    # for queued GPU work. None: the default group (already gloo on the CPU).
    control: Any = None

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
    control = None
    if world_size > 1:
        if not dist.is_initialized():
            # torchrun sets MASTER_ADDR/PORT (or its rendezvous does, for multi-node): env:// init.
            dist.init_process_group("nccl" if use_cuda else "gloo")
        if dist.get_backend() != "gloo":
            control = dist.new_group(backend="gloo")  # every rank creates it, in the same order
    seed_everything(seed + rank)  # a different stream per rank, reproducible per rank
    return Runtime(
        device=resolved,
        rank=rank,
        world_size=world_size,
        amp=amp and use_cuda,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
        control=control,
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
    dist.broadcast_object_list(verdict, src=0, group=rt.control)
    return verdict[0]


def one_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type's name when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def agree(
    error: BaseException | None,
    rt: Runtime,
    done: bool = False,
    user_errors: tuple[type[BaseException], ...] = (TrainError,),
) -> bool:
    """Stop every rank if any rank has an ``error``; True when any rank is ``done``.

    A collective: every rank calls it at the same point. Then each rank raises the same
    :class:`TrainError`, ``rank R: MESSAGE`` for the lowest failing rank R, so that no rank goes
    on into a collective that another has left (under srun or mpirun, with no torchrun to end
    the others, that would hang until the NCCL timeout). An error outside ``user_errors`` is
    a bug: the rank that has it raises it itself, with its traceback. In a single process,
    ``error`` is raised as it is.
    """
    if not rt.distributed:
        if error is not None:
            raise error
        return done
    flags = torch.tensor([int(error is not None), int(done)])
    dist.all_reduce(flags, group=rt.control)  # on gloo: a host-side read, no GPU sync
    if flags[0].item():
        messages: list[str | None] = [None] * rt.world_size
        mine = None if error is None else one_line(error)
        dist.all_gather_object(messages, mine, group=rt.control)
        rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
        if error is not None and not isinstance(error, user_errors):
            raise error
        raise TrainError(f"rank {rank}: {message}") from error
    return bool(flags[1].item())


def on_main(rt: Runtime, action: Callable[..., Any], *args: Any) -> None:
    """``action(*args)`` on rank 0 only (a checkpoint save); if it fails, every rank stops
    with its message (see :func:`agree`)."""
    error = None
    if rt.is_main:
        try:
            action(*args)
        except Exception as e:  # agree() re-raises a bug as it is, on this rank
            error = e
    agree(error, rt)


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


def teardown(rt: Runtime) -> None:
    """Leave the process group, if this process joined one."""
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()
