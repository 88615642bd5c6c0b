"""Train the mask-and-depth UNet on WebDataset shards, alone or under torchrun.

    python train.py --data DIR --out RUNDIR
    torchrun --standalone --nproc_per_node=2 train.py --data DIR --out RUNDIR

What RUNDIR holds is listed at the end of ``--help``.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: its busy-waiting threads made steps 10x slower on 2 shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import cProfile
import json
import math
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from model import LOSS_WEIGHTS, LossConfig, MaskDepthLoss, UNet, UNetConfig
from pipeline import LoaderConfig, LoaderError, build_loader
from pipeline.config import AUGMENT_IN
from sharding import storage
from sharding.shard_format import MANIFEST
from training import checkpoint, distributed, figures, monitor
from training.checkpoint import FIXED_ON_RESUME, TrainState
from training.distributed import DEVICES, Runtime, setup_runtime, teardown
from training.errors import Stopped, TrainError, diverged, interrupted
from training.evaluate import evaluate
from training.logger import LossTotals, MetricLogger, RateWindow
from training.options import HelpFormatter, given_options, positive_int
from training.recipe import RECIPES, add_model_args, add_recipe_args, build_optimizer, resolve
from training.rundir import RUN_DIR_HELP, EpochClock, RunDir, resolved_config, training_rates
from training.step import LOSS_PARTS, StepTimer, StopCheck, stop_requests, train_step


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; printed at start and stored in checkpoints."""

    # Data
    data: str | None = None
    train: str | None = None
    test: str | None = None
    loader: str = "auto"
    num_threads: int | None = None  # None: the CPUs per local rank
    batch_size: int = 100
    max_batches: int | None = None
    augment: bool = True
    augment_in: str = "auto"
    cache_dir: str | None = None  # s3:// shards' node-local cache; None: pipeline.cache's default
    cache_limit: int | None = None
    # Model
    widths: tuple[int, ...] = RECIPES["default"]["widths"]
    diff_input: bool = RECIPES["default"]["diff_input"]
    skip: str = RECIPES["default"]["skip"]
    context: bool = RECIPES["default"]["context"]
    channels_last: bool = True
    amp: bool = True
    # Optimisation: the recipe's fields default to training.recipe.RECIPES["default"]
    epochs: int = 5
    recipe: str = "default"
    optimizer: str = RECIPES["default"]["optimizer"]
    lr: float = RECIPES["default"]["lr"]
    momentum: float = RECIPES["default"]["momentum"]
    weight_decay: float = RECIPES["default"]["weight_decay"]
    schedule: str = RECIPES["default"]["schedule"]
    warmup: float = RECIPES["default"]["warmup"]
    cooldown: float = RECIPES["default"]["cooldown"]
    lr_step: int = RECIPES["default"]["lr_step"]
    lr_gamma: float = RECIPES["default"]["lr_gamma"]
    mask_weight: float = RECIPES["default"]["mask_weight"]
    dice_weight: float = RECIPES["default"]["dice_weight"]
    depth_weight: float = RECIPES["default"]["depth_weight"]
    depth_l1_weight: float = RECIPES["default"]["depth_l1_weight"]
    depth_grad_weight: float = RECIPES["default"]["depth_grad_weight"]
    depth_aux_weight: float = RECIPES["default"]["depth_aux_weight"]
    seed: int = 0
    # Run
    device: str = "auto"
    out: str = "runs/maskdepth"
    resume: bool = False
    overwrite: bool = False
    weights: str | None = None
    test_only: bool = False
    checkpoint_every: int | None = None  # steps between mid-epoch checkpoints
    # Logging
    log_interval: int = 10
    histograms: bool = False
    profile: str = "none"
    figure_samples: int = 4


def build_parser() -> argparse.ArgumentParser:
    """The CLI, in option groups that map onto :class:`TrainConfig`."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        description=__doc__, epilog=RUN_DIR_HELP, formatter_class=HelpFormatter
    )
    g = p.add_argument_group("Data")
    g.add_argument(
        "--data", help="dataset dir or s3://BUCKET/PREFIX with manifest.json (train and test)"
    )
    g.add_argument(
        "--train", help="train shards in brace notation, D/train-{000000..000009}.tar (or s3://)"
    )
    g.add_argument("--test", help="test shards in brace notation (with --train)")
    loaders = ("auto", "dali", "torch")
    g.add_argument("--loader", choices=loaders, default=d.loader, help="auto: DALI if it imports")
    g.add_argument("--num-threads", type=positive_int, help="loader threads (default: CPUs/rank)")
    g.add_argument(
        "--batch-size", type=positive_int, default=d.batch_size, help="samples per step, per rank"
    )
    g.add_argument(
        "--max-batches",
        type=positive_int,
        help="cap batches per epoch and per test pass (smoke runs)",
    )
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=d.augment,
        help="colour jitter and noise on the training inputs",
    )
    g.add_argument(
        "--augment-in",
        choices=AUGMENT_IN,
        default=d.augment_in,
        help="where augmentation runs; auto: the DALI graph on a GPU, fused torch ops on a CPU",
    )
    g.add_argument(
        "--cache-dir",
        help="node-local cache of s3:// shards (default: $MASKDEPTH_CACHE or ~/.cache/maskdepth)",
    )
    g.add_argument(
        "--cache-limit", type=positive_int, metavar="BYTES", help="refuse data larger than this"
    )
    g = add_model_args(p)  # the recipe's model fields; then how the model runs here
    on_off = argparse.BooleanOptionalAction
    g.add_argument("--channels-last", action=on_off, default=True, help="NHWC (faster on CPU/GPU)")
    g.add_argument("--amp", action=on_off, default=True, help="bf16 autocast on CUDA (not CPU)")
    add_recipe_args(p)
    g = p.add_argument_group("Length and seed")
    g.add_argument("--epochs", type=positive_int, default=d.epochs, help="total epochs")
    g.add_argument("--seed", type=int, default=d.seed, help="model init, data order, augmentation")
    g = p.add_argument_group("Run")
    g.add_argument("--device", choices=DEVICES, default=d.device, help="auto: CUDA if present")
    g.add_argument("--out", default=d.out, help="run directory")
    resumed = "continue OUT/checkpoints/last.pt; options left out are its own"
    g.add_argument("--resume", action="store_true", help=resumed)
    g.add_argument("--overwrite", action="store_true", help="replace a run already in OUT")
    g.add_argument("--weights", help="start from this checkpoint's model (and its --widths)")
    g.add_argument("--test-only", action="store_true", help="only evaluate --weights' run")
    g.add_argument(
        "--checkpoint-every",
        type=positive_int,
        metavar="STEPS",
        help="also save last.pt every STEPS steps mid-epoch (always on SIGINT/SIGTERM); "
        "--resume continues from the exact sample",
    )
    g = p.add_argument_group("Logging")
    g.add_argument(
        "--log-interval", type=positive_int, default=d.log_interval, help="steps per log line"
    )
    g.add_argument("--histograms", action="store_true", help="weight histograms to TensorBoard")
    g.add_argument(
        "--profile",
        choices=("none", "cprofile", "torch"),
        default=d.profile,
        help="cprofile.prof, or a torch.profiler trace for TensorBoard",
    )
    g.add_argument(
        "--figure-samples", type=positive_int, default=d.figure_samples, help="rows of results.png"
    )
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse ``argv`` into a :class:`TrainConfig` (options left out of --resume and --weights
    runs from the checkpoint) and check the combinations argparse cannot."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    last = RunDir(Path(args["out"])).last
    args = checkpoint.options_from_checkpoint(args, given_options(parser, argv), last)
    args = resolve(args)  # unset options from --recipe
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


def build_loaders(cfg: TrainConfig, rt: Runtime) -> tuple[Any, Any, LoaderConfig]:
    """``(train_loader, test_loader, loader_cfg)``; each rank reads its part of the shards."""
    try:  # a directory or an s3:// prefix
        has_manifest = not cfg.data or storage.exists(storage.join(cfg.data, MANIFEST))
    except storage.StorageError as e:
        raise TrainError(f"--data {e}") from None
    if not has_manifest:
        raise TrainError(
            f"--data {cfg.data}: no {MANIFEST} there; build shards with "
            "`python -m sharding.build ZIPS --out DIR` and pass that DIR"
        )
    loader_cfg = LoaderConfig(
        backend=cfg.loader,
        device=str(rt.device),
        batch_size=cfg.batch_size,
        num_threads=cfg.num_threads,
        seed=cfg.seed,
        augment=cfg.augment,
        augment_in=cfg.augment_in,
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
    cfg: TrainConfig, channels: int, loader_cfg: LoaderConfig, rt: Runtime
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
        weights = {k: getattr(cfg, k) for k in LOSS_WEIGHTS}
        loss_cfg = LossConfig(**weights)
    except ValueError as e:
        raise TrainError(str(e)) from e
    model = UNet(unet_cfg).to(rt.device, memory_format=rt.memory_format)
    return model, MaskDepthLoss(loss_cfg).to(rt.device), unet_cfg


def build_state(
    cfg: TrainConfig,
    rt: Runtime,
    run: RunDir,
    channels: int,
    loader_cfg: LoaderConfig,
    steps: int = 1,
) -> TrainState:
    """Model, loss, optimizer, schedule (over ``steps`` per epoch); restored from --resume's
    last.pt or from --weights."""
    model, loss_fn, unet_cfg = build_model(cfg, channels, loader_cfg, rt)
    optimizer, scheduler = build_optimizer(cfg, model, steps)
    train_model = distributed.wrap_ddp(model, rt)
    state = TrainState(
        model, train_model, loss_fn, optimizer, scheduler, unet_cfg, loader_cfg, asdict(cfg)
    )
    state.global_batch = cfg.batch_size * rt.world_size
    if cfg.resume or cfg.weights:
        path = run.last if cfg.resume else Path(cfg.weights)
        # Other ranks keep their own seed + rank random streams.
        state.restore(path, resume=cfg.resume, resume_keys=FIXED_ON_RESUME, rng=rt.is_main)
        if cfg.resume and rt.is_main:
            within = f", {state.position} samples into the next" if state.position else ""
            print(f"resumed from {path} after epoch {state.epochs_done}{within}")
    return state


def train_one_epoch(
    state: TrainState,
    loader: Any,
    epoch: int,
    cfg: TrainConfig,
    rt: Runtime,
    logger: MetricLogger,
    gpu: monitor.GpuMonitor,
    run: RunDir,
    requested: Callable[[], bool],
) -> tuple[dict[str, float], StepTimer]:
    """One pass over this rank's training batches, from ``state.position`` of the epoch's
    global order; the mean loss parts and this rank's timer. When ``requested`` (a signal)
    before its last step, it saves last.pt where it is and raises ``Stopped``."""
    model, optimizer = state.train_model.train(), state.optimizer
    totals, timer = LossTotals(rt.device), StepTimer(rt)
    window = RateWindow(timer, rt.world_size)  # samples/s as timings.csv counts them
    per_step = state.global_batch
    total = min(len(loader), cfg.max_batches or len(loader))  # every rank takes as many
    done = state.position // per_step
    iterator = iter(loader.epoch(epoch, state.position))
    samples = (total - done) * cfg.batch_size
    bar = logger.progress(samples, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="sample")
    stops = StopCheck(rt, total - done)  # a failure on one rank stops every rank
    with bar:
        for step in range(done, total):
            batch = stops.next_batch(timer, iterator, step - done, requested())
            if batch is None:
                break
            # An exception in here (out of memory) is not agreed on: the others are already in
            # this step's DDP collectives. torchrun ends them; srun needs --kill-on-bad-exit.
            out = train_step(model, state.loss_fn, optimizer, batch, rt)
            state.scheduler.step()  # per optimizer step: the schedule spans the run's steps
            state.position = (step + 1) * per_step
            timer.step_done(out.samples)
            totals.add(out.losses, out.samples)
            bar.update(out.samples)
            gpu.step(step)
            if (step + 1) % cfg.log_interval == 0 or step + 1 == total:
                # note: .item() is a CPU-GPU sync point, so it happens only at log steps
                values = {k: out.losses[k].item() for k in LOSS_PARTS}
                if not math.isfinite(values["loss"]):
                    where = f"loss is {values['loss']} at epoch {epoch + 1} step {step + 1}"
                    stops.fail(diverged(where, RunDir(Path(cfg.out)).last))
                lr = optimizer.param_groups[0]["lr"]
                logger.step(epoch, step, total, values, lr, window.read(), bar)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 < total - step - 1:
                distributed.on_main(rt, run.save_position, state)
    stops.finish()
    if stops.stopped:
        distributed.on_main(rt, run.save_position, state)
        raise Stopped(epoch, state.position, run.last)
    state.position = 0  # the epoch is done
    means, samples = totals.means(rt)
    rates = training_rates(samples, timer.train_s, timer.data_s)
    return {**means, "lr": optimizer.param_groups[0]["lr"], "samples": samples, **rates}, timer


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run training (or ``--test-only`` evaluation); returns the final test metrics."""
    cfg = parse_args(argv)
    rt = setup_runtime(cfg.device, cfg.seed, cfg.amp, cfg.channels_last)
    run = RunDir(Path(cfg.out))
    with ExitStack() as cleanup:  # on errors too: profiler off, tb/ closed, process group left
        cleanup.callback(teardown, rt)
        # The data is checked first, so a mistyped --data leaves no run directory behind.
        train_loader, test_loader, loader_cfg = build_loaders(cfg, rt)
        config = resolved_config(asdict(cfg), rt, train_loader)  # what "auto" became here
        if rt.is_main:
            print(json.dumps(config, indent=2))
        # Every rank takes the same steps (pipeline.order), so all step with the same lr.
        steps = min(len(train_loader), cfg.max_batches or len(train_loader))
        state = build_state(cfg, rt, run, train_loader.channels, loader_cfg, steps)
        run.prepare(config, cfg.resume, cfg.overwrite, rt)  # after the checkpoint's checks
        tb_dir = run.path / "tb" if rt.is_main else None
        logger = cleanup.enter_context(MetricLogger(tb_dir, steps, state.epochs_done))
        profiling = cfg.profile == "cprofile" and rt.is_main
        profiler = cleanup.enter_context(cProfile.Profile()) if profiling else None
        epochs = range(0) if cfg.test_only else range(state.epochs_done, cfg.epochs)
        preview, final = (cfg.figure_samples if rt.is_main else 0), None
        if epochs:  # traced before the GPU monitor attaches its memory hooks
            logger.graph(state.model, state.unet_cfg, rt.device)
        watch = {"enabled": rt.is_main and bool(epochs), "profile": cfg.profile == "torch"}
        watch.update(logger=logger, log_interval=cfg.log_interval, note=print)
        watching = monitor.gpu_monitor(state.model, rt.device, run.path, **watch)
        # SIGINT/SIGTERM stop at the next step's start, or after the epoch in hand is saved.
        with watching as gpu, stop_requests() as requested:
            clock = EpochClock()
            for epoch in epochs:
                train, timer = train_one_epoch(
                    state, train_loader, epoch, cfg, rt, logger, gpu, run, requested
                )
                distributed.sync_buffers(state.model, rt)
                with clock.evaluating():  # eval_s in timings.csv
                    test, shown = evaluate(state, test_loader, cfg.max_batches, rt, preview)
                if not (math.isfinite(train["loss"]) and math.isfinite(test["loss"])):
                    losses = f"train {train['loss']}, test {test['loss']}"
                    where = f"loss is not finite after epoch {epoch + 1} ({losses})"
                    raise diverged(where, run.last)
                timing = clock.close(timer.train_s, timer.data_s, train["samples"])
                record = dict(epoch=epoch + 1, train=train, test=test, timing=timing)
                is_best = state.add_epoch(record)
                if rt.is_main:
                    grid = figures.preview_grid(shown, loader_cfg) if shown else None
                    logger.epoch(record, is_best, grid, state.model if cfg.histograms else None)
                distributed.on_main(rt, run.save_epoch, state, is_best)  # or every rank stops
                if distributed.agree(None, rt, requested()):
                    raise Stopped(epoch + 1, 0, run.last)
        # the final evaluation, capped by --max-batches like every other
        final, shown = evaluate(state, test_loader, cfg.max_batches, rt, preview)
        if rt.is_main:
            run.write_results(final, state, shown)
            logger.summary(final, state.history, run.path)
        if profiler is not None:
            print(monitor.write_cprofile(profiler, run.path / "cprofile.prof"))
        return final


def cli(argv: list[str] | None = None) -> int:
    """``main`` with user mistakes as one line on stderr and a non-zero exit code."""
    try:
        main(argv)
    except (TrainError, LoaderError) as e:  # TrainError covers checkpoint and device errors
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except Stopped as e:  # a signal, answered at a step's end with a checkpoint
        print(f"train.py: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # say what is kept: a checkpoint to resume, or nothing yet
        args = build_parser().parse_known_args(argv)[0]
        print(f"train.py: {interrupted(RunDir(Path(args.out)), args.test_only)}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
