"""Where a process runs: the one device resolution, torchrun's process group, per-rank seeds.

``train.py``, ``predict.py`` and ``benchmarks.train_throughput`` all pick their device with
:func:`resolve_device`; under torchrun, :func:`setup_runtime` reads ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` and joins the process group (NCCL on CUDA, gloo on the CPU).
"""

from __future__ import annotations

import inspect
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
    return agree_and_sum(None, error, rt, done, user_errors)[0]


def agree_and_sum(
    totals: torch.Tensor | None,
    error: BaseException | None,
    rt: Runtime,
    done: bool = False,
    user_errors: tuple[type[BaseException], ...] = (TrainError,),
) -> tuple[bool, torch.Tensor | None]:
    """:func:`agree`, and ``totals`` (a 1-D tensor, the same size on every rank) summed over
    the ranks, in one all-reduce: ``(any rank done, summed totals)``.

    Without ``totals`` the flags go over the gloo control group (a host-side read, no GPU
    sync); with them, over the default group on ``totals``' device, which an epoch's end
    reads anyway. In a single process: no collective, ``totals`` as they are.
    """
    if not rt.distributed:
        if error is not None:
            raise error
        return done, totals
    flags = torch.tensor([float(error is not None), float(done)], dtype=torch.float64)
    if totals is None:
        dist.all_reduce(flags, group=rt.control)
        failed, any_done = flags.tolist()
    else:
        reduced = torch.cat([flags.to(totals.device), totals.double().flatten()])
        dist.all_reduce(reduced)
        failed, any_done = reduced[:2].tolist()  # the one sync of this reduction
        totals = reduced[2:]
    if failed:
        messages: list[str | None] = [None] * rt.world_size
        mine = None if error is None else one_line(error)
        dist.all_gather_object(messages, mine, group=rt.control)
        rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
        if error is not None and not isinstance(error, user_errors):
            raise error
        raise TrainError(f"rank {rank}: {message}") from error
    return bool(any_done), totals


def on_main(rt: Runtime, action: Callable[..., Any], *args: Any, done: bool = False) -> bool:
    """``action(*args)`` on rank 0 only (a checkpoint save); if it fails, every rank stops
    with its message (see :func:`agree`). Returns whether any rank is ``done`` (asked to
    stop), agreed on in the same collective."""
    error = None
    if rt.is_main:
        try:
            action(*args)
        except Exception as e:  # agree() re-raises a bug as it is, on this rank
            error = e
    return agree(error, rt, done)


def wrap_ddp(model: nn.Module, rt: Runtime) -> nn.Module:
    """``model`` in DistributedDataParallel under torchrun, else ``model`` itself.

    The step's one collective is DDP's gradient all-reduce: ``forward_sync_buffers=False``
    (``broadcast_buffers`` before torch 2.13) drops the BatchNorm buffer broadcast DDP makes
    before every forward pass (the ranks'
    statistics are made equal once per epoch by :func:`sync_buffers`), gradients live in
    the all-reduce buckets (``gradient_as_bucket_view``, no copy in and out), and the graph
    is static: every training step runs every parameter, aux heads included.
    """
    if not rt.distributed:
        return model
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    # torch 2.13 renamed the option; both still sync the buffers once, at the start.
    named = "forward_sync_buffers" in inspect.signature(ddp).parameters
    no_buffer_sync = {"forward_sync_buffers" if named else "broadcast_buffers": False}
    return ddp(
        model, device_ids=ids, gradient_as_bucket_view=True, static_graph=True, **no_buffer_sync
    )


def sync_buffers(model: nn.Module, rt: Runtime) -> None:
    """Copy rank 0's BatchNorm statistics to every rank in one broadcast, so that all
    evaluate, and rank 0 saves, the same model. Once per epoch, before the evaluation."""
    buffers = list(model.buffers())
    if not rt.distributed or not buffers:
        return
    # float64 holds the float32 statistics and the int64 batch counters exactly.
    flat = torch.cat([b.detach().double().flatten() for b in buffers])
    dist.broadcast(flat, 0)
    offset = 0
    for buffer in buffers:
        buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
        offset += buffer.numel()


def teardown(rt: Runtime) -> None:
    """Leave the process group, if this process joined one."""
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()
