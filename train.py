"""Train the mask-and-depth UNet on WebDataset shards, alone or under torchrun.

    python train.py --data DIR --out RUNDIR
    torchrun --standalone --nproc_per_node=2 train.py --data DIR --out RUNDIR

RUNDIR (written by rank 0 only):

- ``config.json``: the resolved :class:`TrainConfig`.
- ``checkpoints/last.pt``, ``checkpoints/best.pt`` (best test IoU): model, optimizer,
  scheduler, epoch, rng (torch, cuda, numpy, python), config, model_config, loader_config,
  history, best_iou; plain tensors and lists, read with ``torch.load(weights_only=True)``.
- ``tb/``: TensorBoard scalars ``train/*``, ``train_step/*``, ``test/*``, the image grid
  ``test/samples``, the model graph, ``weights/*`` histograms (``--histograms``), ``gpu/*``.
- ``timings.csv``: epoch, train_s, data_s, misc_s, samples, samples_per_s.
- ``metrics.json``: ``test`` (iou, dice, depth_rmse, depth_mae, depth_ssim, loss, mask_bce,
  depth_ssim_loss, samples on the whole test split), ``history`` (per epoch: train, test,
  timing), ``params``, ``macs``, ``best_test_iou``.
- ``results.png``: test samples with bg, fg_bg, true/predicted mask (IoU), true/predicted depth.
- ``cprofile.prof`` (``--profile cprofile``), ``profile/`` (``--profile torch``).
- On CUDA: ``memory_layers.csv`` (per-layer memory, first steps) and ``gpu_report.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import json
import math
import os
import pstats
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from model import LossConfig, MaskDepthLoss, MaskDepthMetrics, UNet, UNetConfig
from model.summary import summarize
from pipeline import LoaderConfig, LoaderError, build_loader, denormalize
from training import figures, monitor
from training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

# Testing hook: from this (1-based) epoch on, every training loss is NaN, so a test can prove
# that a diverging run stops and keeps its last good checkpoint.
FAULT_NAN_EPOCH_ENV = "MASKDEPTH_FAULT_NAN_EPOCH"
LOSS_PARTS = ("loss", "mask_bce", "depth_ssim_loss")
TEST_METRICS = ("iou", "dice", "depth_rmse", "depth_mae", "depth_ssim")
# Options that must match the checkpoint when a run is resumed: they decide the model, the
# data order and the optimisation, so changing them would silently mix two different runs.
# fmt: off
RESUME_KEYS = (
    "data", "train", "test", "batch_size", "max_batches", "augment", "widths", "optimizer", "lr",
    "momentum", "weight_decay", "lr_step", "lr_gamma", "mask_weight", "depth_weight", "seed",
    "epochs",
)
# What train.py writes into RUNDIR; --overwrite removes exactly these, never the directory.
RUN_FILES = (
    "config.json", "metrics.json", "timings.csv", "results.png", "memory_layers.csv",
    "gpu_report.json", "cprofile.prof", "checkpoints", "tb", "profile",
)
# fmt: on


class TrainError(Exception):
    """A user mistake or a stopped run; ``main`` callers print it as one line."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; printed at start and stored in checkpoints."""

    # Data
    data: str | None = None
    train: str | None = None
    test: str | None = None
    loader: str = "auto"
    num_threads: int = 2
    batch_size: int = 100
    max_batches: int | None = None
    augment: bool = True
    # Model
    widths: tuple[int, ...] = UNetConfig.widths
    channels_last: bool = True
    amp: bool = True
    # Optimisation
    epochs: int = 5
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    lr_step: int = 2
    lr_gamma: float = 0.1
    mask_weight: float = 2.0
    depth_weight: float = 1.0
    seed: int = 0
    # Run
    device: str = "auto"
    out: str = "runs/maskdepth"
    resume: bool = False
    overwrite: bool = False
    weights: str | None = None
    test_only: bool = False
    stop_after_epoch: int | None = None
    # Logging
    log_interval: int = 10
    histograms: bool = False
    profile: str = "none"
    figure_samples: int = 4


@dataclass
class Runtime:
    """Where this process runs: device, rank, and (rank 0 only) the TensorBoard writer."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp: bool = False
    memory_format: torch.memory_format = torch.contiguous_format
    out: Path = Path(".")
    writer: Any = None

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


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def widths_type(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated channel widths, e.g. ``16,32,64``."""
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated ints") from None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's layout and show every default."""


def build_parser() -> argparse.ArgumentParser:
    """The CLI, in option groups that map onto :class:`TrainConfig`."""
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    g = p.add_argument_group("Data")
    g.add_argument("--data", help="dataset dir with manifest.json (train and test splits)")
    g.add_argument("--train", help="train shards in brace notation, D/train-{000000..000009}.tar")
    g.add_argument("--test", help="test shards in brace notation (with --train)")
    g.add_argument(
        "--loader",
        choices=("auto", "dali", "torch"),
        default=d.loader,
        help="auto: DALI when it imports, else the torch loader",
    )
    g.add_argument(
        "--num-threads", type=positive_int, default=d.num_threads, help="loader threads/workers"
    )
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="per rank")
    g.add_argument("--max-batches", type=positive_int, help="cap batches per epoch (train, test)")
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=d.augment,
        help="colour jitter and noise on the training inputs",
    )
    g = p.add_argument_group("Model")
    g.add_argument("--widths", type=widths_type, default=d.widths, help="e.g. 16,32,64,128,256")
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NHWC memory format (faster on CPU and GPU)",
    )
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16, CUDA")
    g = p.add_argument_group("Optimisation")
    g.add_argument("--epochs", type=positive_int, default=d.epochs, help="total epochs")
    g.add_argument("--optimizer", choices=("sgd", "adam"), default=d.optimizer, help="optimizer")
    g.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD only")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 penalty")
    g.add_argument("--lr-step", type=positive_int, default=d.lr_step, help="StepLR step (epochs)")
    g.add_argument("--lr-gamma", type=float, default=d.lr_gamma, help="StepLR factor")
    g.add_argument("--mask-weight", type=float, default=d.mask_weight, help="weight of mask BCE")
    g.add_argument("--depth-weight", type=float, default=d.depth_weight, help="of 1 - SSIM")
    g.add_argument("--seed", type=int, default=d.seed, help="model init, data order, augmentation")
    g = p.add_argument_group("Run")
    g.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default=d.device, help="auto: CUDA if present"
    )
    g.add_argument("--out", default=d.out, help="run directory")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in OUT")
    g.add_argument("--weights", help="start from this checkpoint's model weights")
    g.add_argument("--test-only", action="store_true", help="only evaluate --weights")
    g.add_argument("--stop-after-epoch", type=positive_int, help=argparse.SUPPRESS)
    g = p.add_argument_group("Logging")
    g.add_argument("--log-interval", type=positive_int, default=d.log_interval, help="steps")
    g.add_argument("--histograms", action="store_true", help="weight histograms to TensorBoard")
    g.add_argument(
        "--profile",
        choices=("none", "cprofile", "torch"),
        default=d.profile,
        help="cprofile.prof, or a torch.profiler trace for TensorBoard",
    )
    g.add_argument(
        "--figure-samples", type=positive_int, default=d.figure_samples, help="rows in results.png"
    )
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse ``argv`` into a :class:`TrainConfig` and check the combinations argparse cannot."""
    args = vars(build_parser().parse_args(argv))
    cfg = TrainConfig(**{f.name: args[f.name] for f in fields(TrainConfig)})
    if bool(cfg.data) == bool(cfg.train or cfg.test):
        raise TrainError("give either --data DIR or both --train URLS and --test URLS")
    if not cfg.data and not (cfg.train and cfg.test):
        raise TrainError("--train and --test go together; give both")
    if cfg.test_only and not cfg.weights:
        raise TrainError("--test-only evaluates a checkpoint: add --weights CKPT")
    if cfg.resume and cfg.weights:
        raise TrainError("--resume continues OUT/checkpoints/last.pt; drop --weights")
    return cfg


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Pick the device, join the process group under torchrun, seed this rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda was given but no CUDA device is visible; use --device cpu")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        # torchrun sets MASTER_ADDR/PORT (or its rendezvous does, for multi-node): env:// init.
        dist.init_process_group("nccl" if use_cuda else "gloo")
    seed = cfg.seed + rank  # a different stream per rank, reproducible per rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return Runtime(
        device=device,
        rank=rank,
        world_size=world_size,
        amp=cfg.amp and use_cuda,
        memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format,
        out=Path(cfg.out),
    )


def prepare_run_dir(cfg: TrainConfig, rt: Runtime) -> None:
    """Refuse to mix two runs in one directory; create it and write config.json (rank 0)."""
    # A directory whose run failed before its first checkpoint holds nothing worth keeping.
    existing = (rt.out / "checkpoints" / "last.pt").exists() or (rt.out / "metrics.json").exists()
    if cfg.resume and not (rt.out / "checkpoints" / "last.pt").exists():
        raise TrainError(
            f"--resume: no checkpoint at {rt.out / 'checkpoints' / 'last.pt'}; "
            "start without --resume"
        )
    if existing and not (cfg.resume or cfg.overwrite):
        raise TrainError(
            f"{rt.out} already holds a run; pass --resume to continue it, --overwrite to "
            "replace it, or another --out"
        )
    if cfg.overwrite and not cfg.resume:
        for name in RUN_FILES:
            path = rt.out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    (rt.out / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_json(rt.out / "config.json", asdict(cfg))


def build_loaders(cfg: TrainConfig, rt: Runtime) -> tuple[Any, Any, Any]:
    """``(train_loader, test_loader, loader_cfg)``; each rank reads its part of the shards."""
    if cfg.data:
        data = Path(cfg.data)
        if not (data / "manifest.json").is_file():
            raise TrainError(
                f"--data {data}: no manifest.json there; build shards with "
                "`python -m sharding.build ZIPS --out DIR` and pass that DIR"
            )
    loader_cfg = LoaderConfig(
        backend=cfg.loader,
        device=str(rt.device),
        batch_size=cfg.batch_size,
        num_threads=cfg.num_threads,
        seed=cfg.seed,
        augment=cfg.augment,
    )
    try:
        train_loader = build_loader(cfg.data or cfg.train, "train", loader_cfg)
        test_loader = build_loader(cfg.data or cfg.test, "test", loader_cfg)  # never augmented
    except (LoaderError, OSError, ValueError) as e:  # they name the file and the fix
        raise TrainError(str(e).strip().splitlines()[0]) from e
    if train_loader.channels != test_loader.channels:
        raise TrainError(
            f"train shards have {train_loader.channels} channels but test shards have "
            f"{test_loader.channels}; build both splits from the same dataset"
        )
    return train_loader, test_loader, loader_cfg


def build_model(cfg: TrainConfig, channels: int, rt: Runtime) -> tuple[nn.Module, UNetConfig]:
    """The UNet on ``rt.device`` in ``rt.memory_format``."""
    try:
        unet_cfg = UNetConfig(
            in_channels=channels, widths=cfg.widths, channels_last=cfg.channels_last
        )
    except ValueError as e:
        raise TrainError(str(e)) from e
    return UNet(unet_cfg).to(rt.device, memory_format=rt.memory_format), unet_cfg


def build_optimizer(
    cfg: TrainConfig, model: nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD with momentum (the reference) or Adam, and a StepLR schedule stepped per epoch."""
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_step, gamma=cfg.lr_gamma)
    return optimizer, scheduler


def to_device(
    batch: dict[str, Any], rt: Runtime
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, mask, depth)`` on the device; x is bg and fg_bg concatenated, ``(B, 2C, H, W)``."""
    x = UNet.input_from(batch["bg"], batch["fg_bg"])
    x = x.to(rt.device, non_blocking=True).contiguous(memory_format=rt.memory_format)
    mask = batch["mask"].to(rt.device, non_blocking=True).float()
    depth = batch["depth"].to(rt.device, non_blocking=True).float()
    return x, mask, depth


def forward_loss(
    model: nn.Module,
    loss_fn: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor,
    depth: torch.Tensor,
    rt: Runtime,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Forward under bf16 autocast when enabled; the loss in float32 (SSIM needs the range)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=rt.amp):
        mask_logits, depth_pred = model(x)
    mask_logits, depth_pred = mask_logits.float(), depth_pred.float()
    return loss_fn(mask_logits, depth_pred, mask, depth), mask_logits, depth_pred


def batches(loader: Any, epoch: int, max_batches: int | None) -> tuple[Any, int]:
    """The epoch's batch iterator and how many batches this rank will take from it."""
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    return iter(loader.epoch(epoch)), total


def loss_sums(losses: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """``[loss, mask_bce, depth_ssim_loss, 1] * n`` on the loss device, to sum over batches."""
    ones = torch.ones((), device=losses["loss"].device)
    return torch.stack([losses[k].detach() for k in LOSS_PARTS] + [ones]) * n


def train_one_epoch(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Any,
    epoch: int,
    cfg: TrainConfig,
    rt: Runtime,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """One pass over this rank's training batches; returns mean loss parts and the timings."""
    model.train()
    fault_epoch = int(os.environ.get(FAULT_NAN_EPOCH_ENV, "0") or 0)
    sums = torch.zeros(len(LOSS_PARTS) + 1, device=rt.device)  # loss parts..., samples
    data_s = train_s = 0.0
    window = {"t": time.perf_counter(), "data_s": 0.0, "samples": 0.0}
    iterator, total = batches(loader, epoch, cfg.max_batches)
    bar = tqdm(
        total=min(total * cfg.batch_size, loader.num_samples),
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        unit="sample",
        disable=not rt.is_main,
        dynamic_ncols=True,
        leave=False,
    )
    # Join lets a rank that runs out of batches shadow the others' gradient all-reduces,
    # so shards with uneven sample counts do not hang the run.
    with model.join() if rt.distributed else nullcontext(), bar:
        for step in range(total):
            tic = time.perf_counter()
            batch = next(iterator, None)
            if batch is None:
                break
            toc = time.perf_counter()
            x, mask, depth = to_device(batch, rt)
            losses, _, _ = forward_loss(model, loss_fn, x, mask, depth, rt)
            loss = losses["loss"] * math.nan if 0 < fault_epoch <= epoch + 1 else losses["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            rt.sync()  # so GPU work is counted as train time, not as the next data wait
            n = x.shape[0]
            sums += loss_sums({**losses, "loss": loss}, n)
            data_s += toc - tic
            train_s += time.perf_counter() - toc
            window["data_s"] += toc - tic
            window["samples"] += n
            bar.update(n)
            if on_step is not None:
                on_step(step)
            if (step + 1) % cfg.log_interval == 0 or step + 1 == total:
                log_step(epoch, step, total, losses, loss, optimizer, window, bar, rt)
    return finish_train_epoch(sums, data_s, train_s, optimizer, rt)


def log_step(
    epoch: int,
    step: int,
    total: int,
    losses: dict[str, torch.Tensor],
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    window: dict[str, float],
    bar: Any,
    rt: Runtime,
) -> None:
    """One log line and TensorBoard step scalars; stops the run on a non-finite loss."""
    # .item() syncs with the device; done only here, once per log interval.
    values = {"loss": loss.item(), **{k: losses[k].item() for k in LOSS_PARTS[1:]}}
    if not math.isfinite(values["loss"]):
        raise TrainError(
            f"loss is {values['loss']} at epoch {epoch + 1} step {step + 1}; stopped, the last "
            f"good checkpoint {rt.out / 'checkpoints' / 'last.pt'} is kept. Lower --lr or check "
            "the data"
        )
    now = time.perf_counter()
    elapsed = max(now - window["t"], 1e-9)
    rate, wait = window["samples"] / elapsed, window["data_s"] / elapsed
    window.update(t=now, data_s=0.0, samples=0.0)
    if not rt.is_main:
        return
    lr = optimizer.param_groups[0]["lr"]
    bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
    parts = " ".join(f"{k} {v:.4f}" for k, v in values.items())
    tqdm.write(
        f"epoch {epoch + 1} step {step + 1}/{total} {parts} lr {lr:.3g} "
        f"samples/s {rate:.1f} data-wait {wait:.0%}"
    )
    if rt.writer is not None:
        global_step = epoch * total + step + 1
        for k, v in values.items():
            rt.writer.add_scalar(f"train_step/{k}", v, global_step)
        rt.writer.add_scalar("train_step/samples_per_s", rate, global_step)
        rt.writer.add_scalar("train_step/data_wait_share", wait, global_step)


def finish_train_epoch(
    sums: torch.Tensor,
    data_s: float,
    train_s: float,
    optimizer: torch.optim.Optimizer,
    rt: Runtime,
) -> dict[str, float]:
    """Average the loss parts over all ranks' samples and attach this rank's timings."""
    if rt.distributed:
        dist.all_reduce(sums)
    sums = sums.tolist()
    samples = sums[-1]
    means = {k: s / max(samples, 1) for k, s in zip(LOSS_PARTS, sums)}
    busy = max(data_s + train_s, 1e-9)
    return {
        **means,
        "lr": optimizer.param_groups[0]["lr"],
        "samples": int(samples),
        "samples_per_s": samples / busy,
        "data_wait_share": data_s / busy,
        "data_s": data_s,
        "train_s": train_s,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: nn.Module,
    loader: Any,
    max_batches: int | None,
    rt: Runtime,
    preview: int = 0,
) -> tuple[dict[str, float], dict[str, torch.Tensor] | None]:
    """Loss parts and metrics over this rank's test batches, all-reduced over ranks.

    Also returns the first ``preview`` samples (inputs, targets, predictions) on CPU.
    """
    model.eval()
    metrics = MaskDepthMetrics(threshold=0.5, device=rt.device)
    sums = torch.zeros(len(LOSS_PARTS) + 1, device=rt.device)
    iterator, total = batches(loader, 0, max_batches)  # the test split is read the same each time
    shown = None
    bar = tqdm(range(total), desc="test", unit="batch", leave=False, disable=not rt.is_main)
    with bar:  # closed on errors too, so a message is not glued to a half-drawn bar
        for _ in bar:
            batch = next(iterator, None)
            if batch is None:
                break
            x, mask, depth = to_device(batch, rt)
            losses, mask_logits, depth_pred = forward_loss(model, loss_fn, x, mask, depth, rt)
            metrics.update(mask_logits, depth_pred, mask, depth, keys=batch.get("key"))
            n = x.shape[0]
            sums += loss_sums(losses, n)
            if shown is None and preview:
                shown = {
                    "bg": batch["bg"],
                    "fg_bg": batch["fg_bg"],
                    "mask": mask,
                    "depth": depth,
                    "mask_prob": torch.sigmoid(mask_logits),
                    "depth_pred": depth_pred,
                }
                shown = {k: v[:preview].float().cpu() for k, v in shown.items()}
    if rt.distributed:
        dist.all_reduce(sums)
    sums = sums.tolist()  # one device sync per evaluation
    result = {k: s / max(sums[-1], 1) for k, s in zip(LOSS_PARTS, sums)}
    computed = metrics.compute()
    result.update({k: float(computed[k]) for k in TEST_METRICS}, samples=int(sums[-1]))
    return result, shown


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def check_checkpoint(
    state: dict[str, Any], path: Path, unet_cfg: UNetConfig, cfg: TrainConfig | None
) -> None:
    """Refuse a checkpoint whose channels, model shape or (for resume) run options differ."""
    saved = state.get("model_config", {})
    if saved.get("in_channels") != unet_cfg.in_channels:
        raise TrainError(
            f"checkpoint {path} was trained on {saved.get('in_channels')}-channel images but "
            f"the data has {unet_cfg.in_channels}; use data with the same channel count"
        )
    if tuple(saved.get("widths", ())) != unet_cfg.widths:
        raise TrainError(
            f"checkpoint {path} has widths {tuple(saved.get('widths', ()))} but this run "
            f"builds {unet_cfg.widths}; pass --widths {','.join(map(str, saved.get('widths', ())))}"
        )
    if cfg is None:
        return
    ours, theirs = plain(asdict(cfg)), state.get("config", {})
    differ = [k for k in RESUME_KEYS if ours.get(k) != theirs.get(k)]
    if differ:
        shown = ", ".join(f"{k}={theirs.get(k)!r} (now {ours.get(k)!r})" for k in differ)
        raise TrainError(
            f"checkpoint {path} belongs to a different config: {shown}; resume with the "
            "original options or start a new --out"
        )


def log_epoch(
    writer: Any,
    record: dict[str, Any],
    model: nn.Module,
    shown: Any,
    loader_cfg: Any,
    histograms: bool,
) -> None:
    """Epoch scalars, the image grid and (with --histograms) weight histograms."""
    epoch = record["epoch"]
    for split in ("train", "test"):
        for k, v in record[split].items():
            if isinstance(v, (int, float)) and k not in ("samples", "data_s", "train_s"):
                writer.add_scalar(f"{split}/{k}", v, epoch)
    if shown is not None:
        grid = figures.compose(figure_rows(shown, loader_cfg), figures.COLUMNS)
        writer.add_image("test/samples", figures.pil_to_tensor(grid), epoch)
    if histograms:
        for name, param in model.named_parameters():
            writer.add_histogram(f"weights/{name}", param.detach().float().cpu(), epoch)
    writer.flush()


def figure_rows(shown: dict[str, torch.Tensor], cfg: Any) -> list[list[Any]]:
    """Rows of PIL cells (bg | fg_bg | masks | depths) from an ``evaluate`` preview."""
    return figures.sample_rows(
        denormalize(shown["bg"], cfg),
        denormalize(shown["fg_bg"], cfg),
        shown["mask"],
        shown["mask_prob"],
        shown["depth"],
        shown["depth_pred"],
    )


def write_results_figure(path: Path, shown: dict[str, torch.Tensor], loader_cfg: Any) -> None:
    """results.png: per test sample the inputs, true and predicted mask (with IoU) and depth."""
    ious = figures.mask_iou(shown["mask_prob"], shown["mask"])
    captions = [["", "", "", f"IoU {iou:.3f}", "", ""] for iou in ious]
    figures.compose(figure_rows(shown, loader_cfg), figures.COLUMNS, captions).save(path)


def close_timing(timing: dict[str, Any], tic: float) -> None:
    """Set misc_s (epoch wall time not spent training or waiting for data) and samples/s."""
    wall = time.perf_counter() - tic
    timing["misc_s"] = max(wall - timing["train_s"] - timing["data_s"], 0.0)
    timing["samples_per_s"] = timing["samples"] / max(wall, 1e-9)


def write_timings(path: Path, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """timings.csv from the history: one row per epoch, the reference's three-way split."""
    rows = [{"epoch": r["epoch"], **r["timing"]} for r in history]
    columns = ("epoch", "train_s", "data_s", "misc_s", "samples", "samples_per_s")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def print_timings(rows: list[dict[str, Any]]) -> None:
    """The timings as a fixed-width table."""
    print(
        f"{'epoch':>5} {'train_s':>9} {'data_s':>9} {'misc_s':>9} {'samples':>8} {'samples/s':>10}"
    )
    for r in rows:
        print(
            f"{r['epoch']:>5} {r['train_s']:>9.2f} {r['data_s']:>9.2f} {r['misc_s']:>9.2f} "
            f"{r['samples']:>8} {r['samples_per_s']:>10.1f}"
        )


def start_gpu_monitor(model: nn.Module, rt: Runtime) -> tuple[Any, Any]:
    """Layer memory hooks and the NVML sampler on CUDA rank 0; elsewhere say why not."""
    if not rt.is_main:
        return None, None
    try:
        readers = monitor.cuda_memory_readers(rt.device)
    except monitor.GpuUnavailable as e:
        print(f"GPU reports skipped ({e}): no memory_layers.csv or gpu_report.json")
        return None, None
    recorder = monitor.LayerMemoryRecorder(model, *readers)
    try:
        info, read = monitor.nvml_reader(rt.device)
    except monitor.GpuUnavailable as e:
        print(f"gpu_report.json skipped: {e}")
        return recorder, None
    sampler = monitor.GpuSampler(read, info)
    sampler.start()
    return recorder, sampler


def finish_gpu_monitor(recorder: Any, sampler: Any, rt: Runtime) -> None:
    """Write memory_layers.csv and gpu_report.json (and the report to TensorBoard)."""
    if recorder is not None:
        recorder.remove()
        recorder.write_csv(rt.out / "memory_layers.csv")
    if sampler is not None:
        sampler.stop()
        report = sampler.report()
        write_json(rt.out / "gpu_report.json", report)
        if rt.writer is not None:
            for k, v in report.items():
                if isinstance(v, (int, float)):
                    rt.writer.add_scalar(f"gpu/{k}", v, 0)


def make_step_hook(
    cfg: TrainConfig, rt: Runtime, recorder: Any, sampler: Any, profiler: Any
) -> Callable[[int], None]:
    """Per-step callback: detach memory hooks after a few steps, step the profiler, log NVML."""
    state = {"steps": 0}

    def on_step(step: int) -> None:
        state["steps"] += 1
        if recorder is not None and state["steps"] == 3:
            recorder.remove()  # a few steps show the per-layer pattern; more only costs time
        if profiler is not None:
            profiler.step()
        if sampler is not None and rt.writer is not None and (step + 1) % cfg.log_interval == 0:
            reading = sampler.latest()
            if reading:
                for k, v in reading.items():
                    rt.writer.add_scalar(f"gpu/{k}", v, state["steps"])

    return on_step


def torch_profiler(cfg: TrainConfig, rt: Runtime) -> Any:
    """A started torch.profiler that records a few steps into RUNDIR/profile for TensorBoard."""
    if cfg.profile != "torch" or not rt.is_main:
        return None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if rt.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(rt.out / "profile")),
        record_shapes=True,
    )
    profiler.start()  # stepped per training step across epochs; the schedule keeps it short
    return profiler


def add_graph(model: nn.Module, example: torch.Tensor, rt: Runtime) -> None:
    """The model graph in TensorBoard; tracing can fail on some builds, which is not fatal."""
    try:
        with warnings.catch_warnings():  # the tracer warns about the model's shape checks
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            rt.writer.add_graph(model, example)
    except Exception as e:  # tracing raises many error types; a missing graph is cosmetic
        print(f"TensorBoard graph skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


def model_summary(unet_cfg: UNetConfig) -> dict[str, int]:
    """Parameter and MAC counts of a fresh CPU copy of the model."""
    summary = summarize(unet_cfg)
    return {"params": int(summary["params"]), "macs": int(summary["macs"])}


@dataclass
class Session:
    """What training changes epoch by epoch, and what a checkpoint stores."""

    model: nn.Module  # the bare UNet: checkpoints, evaluation and figures use it
    train_model: nn.Module  # the DDP wrapper under torchrun, else the model itself
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    unet_cfg: UNetConfig
    loader_cfg: LoaderConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    best_iou: float = -math.inf
    start_epoch: int = 0

    def checkpoint(self, cfg: TrainConfig) -> dict[str, Any]:
        """Everything a resumed run or predict.py needs, as tensors and plain values."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": len(self.history),
            "rng": rng_state(),
            "config": plain(asdict(cfg)),
            "model_config": plain(asdict(self.unet_cfg)),
            "loader_config": plain(asdict(self.loader_cfg)),
            "history": self.history,
            "best_iou": self.best_iou,
        }


def plain(value: Any) -> Any:
    """Tuples as lists, as JSON has them, so ``weights_only`` loads and comparisons agree."""
    return json.loads(json.dumps(value))


def build_session(cfg: TrainConfig, rt: Runtime, loaders: tuple[Any, Any, Any]) -> Session:
    """Model, loss, optimizer and schedule; restored from a checkpoint when asked."""
    train_loader, _, loader_cfg = loaders
    model, unet_cfg = build_model(cfg, train_loader.channels, rt)
    optimizer, scheduler = build_optimizer(cfg, model)
    try:
        loss_cfg = LossConfig(mask_weight=cfg.mask_weight, depth_weight=cfg.depth_weight)
    except ValueError as e:
        raise TrainError(str(e)) from e
    train_model = model
    if rt.distributed:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    loss_fn = MaskDepthLoss(loss_cfg).to(rt.device)
    session = Session(model, train_model, loss_fn, optimizer, scheduler, unet_cfg, loader_cfg)
    restore(cfg, rt, session)
    return session


def restore(cfg: TrainConfig, rt: Runtime, session: Session) -> None:
    """Load last.pt (``--resume``: everything) or ``--weights`` (the model only)."""
    if not (cfg.resume or cfg.weights):
        return
    path = rt.out / "checkpoints" / "last.pt" if cfg.resume else Path(cfg.weights)
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        raise TrainError(str(e)) from e
    check_checkpoint(state, path, session.unet_cfg, cfg if cfg.resume else None)
    session.model.load_state_dict(state["model"])
    if not cfg.resume:
        return
    session.optimizer.load_state_dict(state["optimizer"])
    session.scheduler.load_state_dict(state["scheduler"])
    session.history = list(state["history"])
    session.best_iou = float(state["best_iou"])
    session.start_epoch = int(state["epoch"])
    if rt.is_main:
        set_rng_state(state["rng"])  # other ranks keep their seed + rank streams
        print(f"resumed from {path} after epoch {state['epoch']}")


def sync_buffers(model: nn.Module, rt: Runtime) -> None:
    """Copy rank 0's BatchNorm statistics to every rank, so all evaluate the saved model."""
    if rt.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def fit(
    cfg: TrainConfig, rt: Runtime, session: Session, loaders: tuple[Any, Any, Any]
) -> int | None:
    """Train the remaining epochs, checkpointing each; returns the epoch of a --stop-after-epoch."""
    train_loader, test_loader, _ = loaders
    if rt.writer is not None:
        example = torch.zeros(1, 2 * train_loader.channels, 160, 160, device=rt.device)
        add_graph(session.model, example, rt)
    recorder, sampler = start_gpu_monitor(session.model, rt)
    profiler = torch_profiler(cfg, rt)
    on_step = make_step_hook(cfg, rt, recorder, sampler, profiler)
    stopped = None
    for epoch in range(session.start_epoch, cfg.epochs):
        tic = time.perf_counter()
        train_stats = train_one_epoch(
            session.train_model,
            session.loss_fn,
            session.optimizer,
            train_loader,
            epoch,
            cfg,
            rt,
            on_step,
        )
        sync_buffers(session.model, rt)
        preview = cfg.figure_samples if rt.is_main else 0
        test_stats, shown = evaluate(
            session.model, session.loss_fn, test_loader, cfg.max_batches, rt, preview
        )
        session.scheduler.step()
        check_finite(epoch, train_stats, test_stats, rt)
        session.history.append(epoch_record(epoch, train_stats, test_stats))
        if rt.is_main:
            save_epoch(cfg, rt, session, shown, tic)
        if cfg.stop_after_epoch is not None and epoch + 1 >= cfg.stop_after_epoch:
            stopped = epoch + 1
            break
    if profiler is not None:
        profiler.stop()  # writes the trace if the run was shorter than the schedule
    finish_gpu_monitor(recorder, sampler, rt)
    return stopped


def check_finite(
    epoch: int, train_stats: dict[str, Any], test_stats: dict[str, Any], rt: Runtime
) -> None:
    """Stop before a diverged model overwrites the last good checkpoint."""
    if math.isfinite(train_stats["loss"]) and math.isfinite(test_stats["loss"]):
        return
    raise TrainError(
        f"loss is not finite after epoch {epoch + 1} (train {train_stats['loss']}, test "
        f"{test_stats['loss']}); stopped, the last good checkpoint "
        f"{rt.out / 'checkpoints' / 'last.pt'} is kept. Lower --lr or check the data"
    )


def epoch_record(
    epoch: int, train_stats: dict[str, Any], test_stats: dict[str, Any]
) -> dict[str, Any]:
    """One history entry; ``timing`` is completed by :func:`save_epoch` once misc time is known."""
    timing = {
        "train_s": train_stats.pop("train_s"),
        "data_s": train_stats.pop("data_s"),
        "samples": train_stats["samples"],
    }
    return {"epoch": epoch + 1, "train": train_stats, "test": test_stats, "timing": timing}


def save_epoch(cfg: TrainConfig, rt: Runtime, session: Session, shown: Any, tic: float) -> None:
    """TensorBoard, last.pt, best.pt (by test IoU) and timings.csv for the epoch just done."""
    record = session.history[-1]
    if rt.writer is not None:
        log_epoch(rt.writer, record, session.model, shown, session.loader_cfg, cfg.histograms)
    is_best = record["test"]["iou"] > session.best_iou
    session.best_iou = max(session.best_iou, record["test"]["iou"])
    close_timing(record["timing"], tic)  # provisional, so the checkpoint holds a full row
    state = session.checkpoint(cfg)
    try:
        save_checkpoint(state, rt.out / "checkpoints" / "last.pt")
        if is_best:
            save_checkpoint(state, rt.out / "checkpoints" / "best.pt")
    except CheckpointError as e:
        raise TrainError(str(e)) from e
    close_timing(record["timing"], tic)  # now including the checkpoint writes
    write_timings(rt.out / "timings.csv", session.history)
    test = record["test"]
    tqdm.write(
        f"epoch {record['epoch']}: train loss {record['train']['loss']:.4f}, test loss "
        f"{test['loss']:.4f} IoU {test['iou']:.4f} Dice {test['dice']:.4f} depth RMSE "
        f"{test['depth_rmse']:.4f}{' (best)' if is_best else ''}"
    )


def finish(cfg: TrainConfig, rt: Runtime, session: Session, test_loader: Any) -> dict[str, Any]:
    """Final evaluation on the whole test split; metrics.json, results.png and the summary."""
    preview = cfg.figure_samples if rt.is_main else 0
    final, shown = evaluate(session.model, session.loss_fn, test_loader, None, rt, preview)
    if not rt.is_main:
        return final
    metrics = {"test": final, "history": session.history, **model_summary(session.unet_cfg)}
    if session.history:
        metrics["best_test_iou"] = session.best_iou
    write_json(rt.out / "metrics.json", metrics)
    if shown is not None:
        write_results_figure(rt.out / "results.png", shown, session.loader_cfg)
    if session.history:
        print_timings([{"epoch": r["epoch"], **r["timing"]} for r in session.history])
    print(
        f"test IoU {final['iou']:.4f}  Dice {final['dice']:.4f}  depth RMSE "
        f"{final['depth_rmse']:.4f}  ({final['samples']} test samples)"
    )
    print(f"results figure: {rt.out / 'results.png'}")
    print(f"metrics:        {rt.out / 'metrics.json'}")
    print(f"TensorBoard:    tensorboard --logdir {rt.out / 'tb'}")
    return final


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run training (or ``--test-only`` evaluation); returns the final test metrics."""
    cfg = parse_args(argv)
    from torch.utils.tensorboard import SummaryWriter  # defer: slow import, after arg checks

    rt = setup_runtime(cfg)
    try:
        problem = None
        if rt.is_main:
            print(json.dumps(asdict(cfg), indent=2))
            try:
                prepare_run_dir(cfg, rt)
            except TrainError as e:
                problem = str(e)
        if rt.distributed:
            # The others wait until rank 0 has checked and created the run dir, and stop with
            # it if it refused: a bare barrier would leave them waiting for a rank that left.
            verdict = [problem]
            dist.broadcast_object_list(verdict, src=0)
            problem = verdict[0]
        if problem:
            raise TrainError(problem)
        loaders = build_loaders(cfg, rt)
        session = build_session(cfg, rt, loaders)
        if rt.is_main:
            rt.writer = SummaryWriter(str(rt.out / "tb"))
        profiler = cProfile.Profile() if cfg.profile == "cprofile" and rt.is_main else None
        with profiler if profiler is not None else nullcontext():
            stopped = None if cfg.test_only else fit(cfg, rt, session, loaders)
            final = None if stopped else finish(cfg, rt, session, loaders[1])
        if profiler is not None:
            write_profile(profiler, rt.out / "cprofile.prof")
        if stopped and rt.is_main:
            print(f"stopped after epoch {stopped} as asked; continue with --resume")
        return final
    finally:
        if rt.writer is not None:
            rt.writer.close()
        if rt.distributed and dist.is_initialized():
            dist.destroy_process_group()


def write_profile(profiler: cProfile.Profile, path: Path) -> None:
    """Save the cProfile stats and print the top entries by cumulative time."""
    profiler.dump_stats(path)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(15)
    print(text.getvalue())
    print(f"cProfile stats: {path} (view with `python -m pstats {path}` or snakeviz)")


def cli(argv: list[str] | None = None) -> int:
    """``main`` with user mistakes as one line on stderr and a non-zero exit code."""
    try:
        main(argv)
    except (TrainError, CheckpointError, LoaderError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("train.py: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
