"""Train the mask-and-depth UNet on WebDataset shards, alone or under torchrun.

    python train.py --data DIR --out RUNDIR
    torchrun --standalone --nproc_per_node=2 train.py --data DIR --out RUNDIR

What RUNDIR holds is listed at the end of ``--help``.

Stopping: Ctrl-C (SIGINT) or SIGTERM lets the step in hand finish, saves
checkpoints/last.pt where the run is and exits 130 with one line; ``--resume`` continues
from the exact sample. Under torchrun the ranks agree on it at their next log step
(``--log-interval``), so that all stop at the same one. Ctrl-C there reaches torchrun
only (its workers run in sessions of their own): torchrun passes SIGINT on to every
worker, which saves and exits 130 as above, then prints its own SignalException report
and exits 1; the checkpoint is whole all the same. torchrun kills workers that take
longer than its ``--shutdown-timeout`` (30 s): raise it if --log-interval steps take longer.
"""

from __future__ import annotations

import sharding.openmp  # noqa: F401  (first: OpenMP's wait policy, before torch loads)

# isort: split

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

from pipeline import LoaderError
from pipeline.cache import CACHE_DIR_HELP
from pipeline.config import AUGMENT_IN, BACKENDS
from training import checkpoint, distributed, figures, monitor
from training.builders import build_loaders, build_state
from training.checkpoint import TrainState
from training.distributed import DEVICES, Runtime, setup_runtime, teardown
from training.errors import Stopped, TrainError, diverged, interrupted
from training.evaluate import evaluate
from training.logger import LossTotals, MetricLogger, RateWindow
from training.options import HelpFormatter, given_options, positive_int
from training.recipe import RECIPES, add_model_args, add_recipe_args, resolve
from training.rundir import RUN_DIR_HELP, EpochClock, RunDir, resolved_config, training_rates
from training.step import StepTimer, StopCheck, read_losses, stop_requests, train_step, zero_batch

DEFAULT = RECIPES["default"]  # every model and optimisation default (model.recipes)


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
    flip: bool = DEFAULT["flip"]
    object_jitter: float = DEFAULT["object_jitter"]
    paired_jitter: bool = DEFAULT["paired_jitter"]
    cache_dir: str | None = None  # s3:// shards' node-local cache; None: pipeline.cache's default
    cache_limit: int | None = None
    # Model
    widths: tuple[int, ...] = DEFAULT["widths"]
    diff_input: bool = DEFAULT["diff_input"]
    skip: str = DEFAULT["skip"]
    context: bool = DEFAULT["context"]
    channels_last: bool = True
    amp: bool = True
    compile: bool = False
    # Optimisation: the recipe's fields default to training.recipe.RECIPES["default"]
    epochs: int = 5
    recipe: str = "default"
    optimizer: str = DEFAULT["optimizer"]
    lr: float = DEFAULT["lr"]
    momentum: float = DEFAULT["momentum"]
    weight_decay: float = DEFAULT["weight_decay"]
    schedule: str = DEFAULT["schedule"]
    warmup: float = DEFAULT["warmup"]
    cooldown: float = DEFAULT["cooldown"]
    lr_step: int = DEFAULT["lr_step"]
    lr_gamma: float = DEFAULT["lr_gamma"]
    mask_weight: float = DEFAULT["mask_weight"]
    dice_weight: float = DEFAULT["dice_weight"]
    depth_weight: float = DEFAULT["depth_weight"]
    depth_l1_weight: float = DEFAULT["depth_l1_weight"]
    depth_grad_weight: float = DEFAULT["depth_grad_weight"]
    depth_aux_weight: float = DEFAULT["depth_aux_weight"]
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
        prog="train.py", description=__doc__, epilog=RUN_DIR_HELP, formatter_class=HelpFormatter
    )
    g = p.add_argument_group("Data")
    g.add_argument(
        "--data", help="dataset dir or s3://BUCKET/PREFIX with manifest.json (train and test)"
    )
    g.add_argument(
        "--train", help="train shards in brace notation, D/train-{000000..000009}.tar (or s3://)"
    )
    g.add_argument("--test", help="test shards in brace notation (with --train)")
    g.add_argument("--loader", choices=BACKENDS, default=d.loader, help="auto: DALI if it imports")
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
        help=CACHE_DIR_HELP,
    )
    g.add_argument(
        "--cache-limit", type=positive_int, metavar="BYTES", help="refuse data larger than this"
    )
    g = add_model_args(p)  # the recipe's model fields; then how the model runs here
    on_off = argparse.BooleanOptionalAction
    g.add_argument(
        "--channels-last", action=on_off, default=d.channels_last, help="NHWC (faster on CPU/GPU)"
    )
    g.add_argument("--amp", action=on_off, default=d.amp, help="bf16 autocast on CUDA (not CPU)")
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training model (evaluation stays eager); the first steps "
        "compile, for a minute or more",
    )
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
        "--log-interval",
        type=positive_int,
        default=d.log_interval,
        help="steps per log line; under torchrun also how often the ranks agree on failures "
        "and stop requests (one host collective)",
    )
    g.add_argument("--histograms", action="store_true", help="weight histograms to TensorBoard")
    g.add_argument(
        "--profile",
        choices=("none", "cprofile", "torch"),
        default=d.profile,
        help="cprofile.prof, or a torch.profiler trace in tb/ (TensorBoard, Perfetto)",
    )
    g.add_argument(
        "--figure-samples", type=positive_int, default=d.figure_samples, help="rows of results.png"
    )
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse ``argv`` into a :class:`TrainConfig` (options left out of --resume and --weights
    runs from the checkpoint); a combination argparse cannot check is a usage error too."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    if args["test_only"] and not args["weights"]:
        parser.error("--test-only evaluates a checkpoint: add --weights CKPT")
    if args["resume"] and args["weights"]:
        parser.error("--resume continues OUT/checkpoints/last.pt; drop --weights")
    last = RunDir(Path(args["out"])).last
    args = checkpoint.options_from_checkpoint(args, given_options(parser, argv), last)
    args = resolve(args)  # unset options from --recipe
    cfg = TrainConfig(**{f.name: args[f.name] for f in fields(TrainConfig)})
    if bool(cfg.data) == bool(cfg.train or cfg.test):
        parser.error("give either --data DIR or both --train URLS and --test URLS")
    if not cfg.data and not (cfg.train and cfg.test):
        parser.error("--train and --test go together; give both")
    return cfg


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
    stops = StopCheck(rt, lambda: zero_batch(state.unet_cfg, cfg.batch_size, rt))
    with bar:
        for step in range(done, total):
            batch = stops.next_batch(timer, iterator)
            # An exception in here (out of memory) is not agreed on: the others are already in
            # this step's DDP collectives. torchrun ends them; srun needs --kill-on-bad-exit.
            out = train_step(model, state.loss_fn, optimizer, batch, rt)
            state.scheduler.step()  # per optimizer step: the schedule spans the run's steps
            state.position = (step + 1) * per_step
            timer.step_done(out.samples)
            totals.add(out.losses, out.samples)
            bar.update(out.samples)
            gpu.step(step)
            last = step + 1 == total  # the epoch's end is agreed on in stops.finish
            logged = (step + 1) % cfg.log_interval == 0 or last
            if logged:
                values = read_losses(out.losses)  # the step's one device sync, at log steps
                if bad := [k for k in ("loss", "depth_aux") if not math.isfinite(values[k])]:
                    where = f"{bad[0]} is {values[bad[0]]} at epoch {epoch + 1} step {step + 1}"
                    stops.fail(diverged(where, run.last))
                lr = optimizer.param_groups[0]["lr"]
                logger.step(epoch, step, total, values, lr, window.read(), bar)
            saving = bool(cfg.checkpoint_every) and (step + 1) % cfg.checkpoint_every == 0
            if not last and stops.due(logged, saving) and stops.agree(requested()):
                break
            if saving and not last:  # after the agreement: never a state another rank spoiled
                distributed.on_main(rt, run.save_position, state)
    if stops.stopped:
        distributed.on_main(rt, run.save_position, state)
        raise Stopped(epoch, state.position, run.last)
    means, samples = totals.means(stops.finish(totals.sums))
    state.position = 0  # the epoch is done
    rates = training_rates(samples, timer.train_s, timer.data_s)
    return {**means, "lr": optimizer.param_groups[0]["lr"], "samples": samples, **rates}, timer


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run training (or ``--test-only`` evaluation); returns the final test metrics: the last
    epoch's evaluation (one evaluation where no epoch runs)."""
    cfg = parse_args(argv)
    rt = setup_runtime(cfg.device, cfg.seed, cfg.amp, cfg.channels_last)
    run = RunDir(Path(cfg.out))
    with ExitStack() as cleanup:  # on errors too: profiler off, tb/ closed, process group left
        cleanup.callback(teardown, rt)
        # The data is checked first, so a mistyped --data leaves no run directory behind.
        train_loader, test_loader, loader_cfg = build_loaders(cfg, rt)
        config = resolved_config(asdict(cfg), rt, train_loader)  # what "auto" became here
        # Every rank takes the same steps (pipeline.order), so all step with the same lr.
        steps = min(len(train_loader), cfg.max_batches or len(train_loader))
        state = build_state(cfg, rt, run, train_loader.channels, loader_cfg, steps)
        run.prepare(config, cfg.resume, cfg.overwrite, rt, cfg.test_only)  # after checkpoints
        if rt.is_main:  # once the run directory is accepted: a refusal is its one line alone
            print("\n".join([json.dumps(config, indent=2), *state.notes]))
        tb_dir = run.path / "tb" if rt.is_main else None
        logger = cleanup.enter_context(MetricLogger(tb_dir, steps, state.epochs_done))
        profiling = cfg.profile == "cprofile" and rt.is_main
        profiler = cleanup.enter_context(cProfile.Profile()) if profiling else None
        epochs = range(0) if cfg.test_only else range(state.epochs_done, cfg.epochs)
        preview, evaluated = (cfg.figure_samples if rt.is_main else 0), None
        if epochs:  # traced before the GPU monitor attaches its memory hooks
            logger.graph(state.model, state.unet_cfg, rt.device)
        watch = {"enabled": rt.is_main and bool(epochs), "profile": cfg.profile == "torch"}
        watch.update(layers=not cfg.compile)
        watch.update(logger=logger, log_interval=cfg.log_interval, note=print)
        watching = monitor.gpu_monitor(state.model, rt.device, run.path, **watch)
        # SIGINT/SIGTERM stop at an agreed step, or after the epoch in hand is saved.
        with watching as gpu, stop_requests() as requested:
            clock = EpochClock()
            for epoch in epochs:
                train, timer = train_one_epoch(
                    state, train_loader, epoch, cfg, rt, logger, gpu, run, requested
                )
                distributed.sync_buffers(state.model, rt)  # rank 0's BatchNorm statistics
                with clock.evaluating():  # eval_s in timings.csv
                    evaluated = evaluate(state, test_loader, cfg.max_batches, rt, preview)
                test, shown = evaluated
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
                # Saved by rank 0, or every rank stops; a stop request is agreed on with it.
                if distributed.on_main(rt, run.save_epoch, state, is_best, done=requested()):
                    raise Stopped(epoch + 1, 0, run.last)
        # The last epoch's evaluation is the result; --test-only (or no epoch left) evaluates.
        final, shown = evaluated or evaluate(state, test_loader, cfg.max_batches, rt, preview)
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
