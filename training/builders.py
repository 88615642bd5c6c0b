"""What a run is built from: its loaders, model and loss, and the state a checkpoint holds.

``train.py`` calls these in order (:func:`build_loaders`, then :func:`build_state`, which
calls :func:`build_model`); the tests call them to set up an evaluation on the tiny shards.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model import LOSS_WEIGHTS, LossConfig, MaskDepthLoss, UNet, UNetConfig
from pipeline import LoaderConfig, LoaderError, build_loader
from sharding.shard_format import not_a_dataset
from training import distributed
from training.checkpoint import FIXED_ON_RESUME, TrainState
from training.distributed import Runtime
from training.errors import TrainError
from training.recipe import build_optimizer
from training.rundir import RunDir


def build_loaders(cfg: Any, rt: Runtime) -> tuple[Any, Any, LoaderConfig]:
    """``(train_loader, test_loader, loader_cfg)`` for ``cfg`` (a TrainConfig); each rank
    reads its part of the shards."""
    if cfg.data and (wrong := not_a_dataset(cfg.data)):  # a zip or a file: one line, not a trace
        raise TrainError(f"--data {wrong}")
    loader_cfg = LoaderConfig(
        backend=cfg.loader,
        device=str(rt.device),
        batch_size=cfg.batch_size,
        num_threads=cfg.num_threads,
        seed=cfg.seed,
        augment=cfg.augment,
        augment_in=cfg.augment_in,
        flip=cfg.flip,
        object_jitter=cfg.object_jitter,
        paired_jitter=cfg.paired_jitter,
        cache_dir=cfg.cache_dir,
        cache_limit=cfg.cache_limit,
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


def build_model(
    cfg: Any, channels: int, loader_cfg: LoaderConfig, rt: Runtime
) -> tuple[nn.Module, nn.Module, UNetConfig]:
    """The UNet for the loader's geometry on ``rt.device`` in ``rt.memory_format``, and its loss."""
    try:
        unet_cfg = UNetConfig.for_geometry(
            loader_cfg.geometry,
            in_channels=channels,
            widths=cfg.widths,
            diff_input=cfg.diff_input,
            skip=cfg.skip,
            context=cfg.context,
            aux_depth=cfg.depth_aux_weight > 0,
            channels_last=cfg.channels_last,
        )
        loss_cfg = LossConfig(**{k: getattr(cfg, k) for k in LOSS_WEIGHTS})
    except ValueError as e:
        raise TrainError(str(e)) from e
    model = UNet(unet_cfg).to(rt.device, memory_format=rt.memory_format)
    return model, MaskDepthLoss(loss_cfg).to(rt.device), unet_cfg


def build_state(
    cfg: Any,
    rt: Runtime,
    run: RunDir,
    channels: int,
    loader_cfg: LoaderConfig,
    steps: int = 1,
) -> TrainState:
    """Model, loss, optimizer, schedule (over ``steps`` per epoch); restored from --resume's
    last.pt or from --weights. ``cfg.compile``: the training model goes through
    torch.compile (DDP's wrapper included, so that it splits the graph at its buckets);
    evaluation and checkpoints use the plain model. What the user should hear of the
    restore goes to ``state.notes``."""
    model, loss_fn, unet_cfg = build_model(cfg, channels, loader_cfg, rt)
    optimizer, scheduler = build_optimizer(cfg, model, steps)
    train_model = distributed.wrap_ddp(model, rt)
    if cfg.compile:
        train_model = torch.compile(train_model)
    state = TrainState(
        model, train_model, loss_fn, optimizer, scheduler, unet_cfg, loader_cfg, asdict(cfg)
    )
    state.global_batch = cfg.batch_size * rt.world_size
    if cfg.resume or cfg.weights:
        path = run.last if cfg.resume else Path(cfg.weights)
        # Other ranks keep their own seed + rank random streams.
        note = state.restore(path, resume=cfg.resume, resume_keys=FIXED_ON_RESUME, rng=rt.is_main)
        if cfg.resume:
            within = f", {state.position} samples into the next" if state.position else ""
            state.notes.append(f"resumed from {path} after epoch {state.epochs_done}{within}")
        state.notes.extend([note] if note else [])
    return state
