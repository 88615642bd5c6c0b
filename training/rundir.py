"""The run directory: what ``train.py`` writes where, and the per-epoch timings.

A run directory holds exactly :data:`RUN_FILES`. :meth:`RunDir.prepare` refuses to mix two
runs in one directory, and ``--overwrite`` removes exactly these names, never the directory.
Its files are written atomically with :mod:`sharding.atomic` (TensorBoard events and
profiler traces by their own libraries).
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.summary import summarize
from pipeline.config import resolve_threads
from sharding.atomic import atomic_write, write_json
from training import figures
from training.checkpoint import TrainState, save_checkpoint
from training.distributed import Runtime, rank0_verdict
from training.errors import TrainError

# What train.py --help says of the run directory.
RUN_DIR_HELP = """\
RUNDIR (written by rank 0 only):

- ``config.json``: the :class:`TrainConfig` as this run used it: ``device``, ``loader``,
  ``augment_in``, ``num_threads`` and ``amp`` as resolved on this machine (what was asked,
  where it differs, under ``requested``), plus ``world_size``, ``torch_threads`` and
  ``omp_wait_policy``.
- ``checkpoints/last.pt``, ``checkpoints/best.pt`` (best test IoU): model, optimizer,
  scheduler, epoch, rng (torch, cuda, numpy, python), config, model_config, loader_config,
  history, best_iou; plain tensors and lists, read with ``torch.load(weights_only=True)``.
- ``tb/``: TensorBoard scalars ``train/*``, ``train_step/*`` (at log steps, ``lr``
  included), ``test/*``, the image grid ``test/samples``, the model graph, ``weights/*``
  histograms (``--histograms``), ``gpu/*``; all against the optimizer step (per-epoch values
  at the epoch's last step), which ``--resume`` continues, dropping what a killed run logged
  after its checkpoint. ``loss`` adds up the same terms for train and test (the aux depth
  heads' term is ``train/depth_aux``, apart). With ``--profile torch``, the torch.profiler
  trace ``*.pt.trace.json`` (TensorBoard's PyTorch Profiler tab, or ui.perfetto.dev).
- ``timings.csv``: epoch, train_s (steps), data_s (waiting for batches), eval_s (the test
  pass), misc_s (the rest: checkpoints, logging), samples, samples_per_s (training samples
  over train_s + data_s, the figure the step log and the progress bar show).
- ``metrics.json``: ``test`` (the last epoch's evaluation: iou, dice, depth_rmse, depth_mae,
  depth_ssim, loss, mask_bce, depth_ssim_loss, samples, on the test split as capped by
  ``--max-batches``), ``history`` (per epoch: train, test, timing), ``params``, ``macs``,
  ``best_test_iou``.
- ``results.png``: test samples with bg, fg_bg, true/predicted mask (IoU), true/predicted depth.
- ``cprofile.prof`` (``--profile cprofile``).
- ``--test-only`` writes config.json, metrics.json and results.png only.
- On CUDA: ``memory_layers.csv`` (per-layer memory, first steps) and ``gpu_report.json``.
"""
# "profile" is where runs before tb/ held their torch.profiler traces: --overwrite removes it.
# fmt: off
RUN_FILES = (
    "config.json", "metrics.json", "timings.csv", "results.png", "memory_layers.csv",
    "gpu_report.json", "cprofile.prof", "checkpoints", "tb", "profile",
)
# fmt: on
TIMING_COLUMNS = ("epoch", "train_s", "data_s", "eval_s", "misc_s", "samples", "samples_per_s")


def training_rates(samples: int, train_s: float, data_s: float) -> dict[str, float]:
    """``samples_per_s``: ``samples`` over the training time (steps plus data wait), and
    ``data_wait_share``: the part of that time spent waiting for batches.

    The one definition behind timings.csv, ``train/*``, the step log and the progress bar;
    evaluation and bookkeeping are timed apart (``eval_s``, ``misc_s``).
    """
    busy = max(train_s + data_s, 1e-9)
    return {"samples_per_s": samples / busy, "data_wait_share": data_s / busy}


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    path: Path

    @property
    def last(self) -> Path:
        """The checkpoint of the latest epoch, which ``--resume`` continues."""
        return self.path / "checkpoints" / "last.pt"

    @property
    def best(self) -> Path:
        """The checkpoint of the epoch with the best test IoU."""
        return self.path / "checkpoints" / "best.pt"

    def prepare(
        self,
        config: dict[str, Any],
        resume: bool,
        overwrite: bool,
        rt: Runtime,
        test_only: bool = False,
    ) -> None:
        """Rank 0 checks and creates the directory; every rank raises rank 0's refusal.

        The other ranks wait for rank 0's verdict, so none starts on a directory that rank
        0 refused, and none waits at a barrier for a rank 0 that has left.
        """
        problem = None
        if rt.is_main:
            try:
                self._prepare(config, resume, overwrite, test_only)
            except TrainError as e:
                problem = str(e)
        if problem := rank0_verdict(problem, rt):
            raise TrainError(problem)

    def _prepare(
        self, config: dict[str, Any], resume: bool, overwrite: bool, test_only: bool
    ) -> None:
        """Refuse to mix two runs in one directory; create it (with checkpoints/ unless
        ``test_only``) and write config.json."""
        # A directory whose run failed before its first checkpoint holds nothing worth keeping.
        existing = self.last.exists() or (self.path / "metrics.json").exists()
        if resume and not self.last.exists():
            raise TrainError(f"--resume: no checkpoint at {self.last}; start without --resume")
        if existing and not (resume or overwrite):
            raise TrainError(
                f"{self.path} already holds a run; pass --resume to continue it, --overwrite to "
                "replace it, or another --out"
            )
        if overwrite and not resume:
            for name in RUN_FILES:
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        (self.path if test_only else self.last.parent).mkdir(parents=True, exist_ok=True)
        write_json(self.path / "config.json", config)  # rewritten on --resume: this machine's

    def save_epoch(self, state: TrainState, is_best: bool) -> None:
        """last.pt, best.pt (when ``is_best``) and timings.csv after an epoch."""
        checkpoint = state.state_dict()
        save_checkpoint(checkpoint, self.last)
        if is_best:
            save_checkpoint(checkpoint, self.best)
        write_timings(self.path / "timings.csv", state.history)

    def save_position(self, state: TrainState) -> None:
        """last.pt mid-epoch: ``state.position`` says how far into the epoch it is."""
        save_checkpoint(state.state_dict(), self.last)

    def write_results(
        self, test: dict[str, Any], state: TrainState, shown: dict[str, Any] | None
    ) -> None:
        """metrics.json (final test metrics, history, model size) and results.png."""
        summary = summarize(state.unet_cfg)
        metrics = {"test": test, "history": state.history}
        metrics.update(params=int(summary["params"]), macs=int(summary["macs"]))
        if state.history:
            metrics["best_test_iou"] = state.best_iou
        write_json(self.path / "metrics.json", metrics)
        if shown is not None:
            figures.write_results_figure(self.path / "results.png", shown, state.loader_cfg)


class EpochClock:
    """Each epoch's wall time, split into training, data wait, evaluation and the rest.

    The clock runs from one :meth:`close` to the next, so no time is lost between epochs:
    an epoch's ``misc_s`` holds its logging and the checkpoint writes of the epoch before it
    (its own are made after its row is closed, so the row can be saved in the checkpoint
    exactly as timings.csv and metrics.json show it).
    """

    def __init__(self) -> None:
        self._since = time.perf_counter()
        self._eval_s = 0.0

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Count the time inside the block as this epoch's ``eval_s``."""
        tic = time.perf_counter()
        try:
            yield
        finally:
            self._eval_s += time.perf_counter() - tic

    def close(self, train_s: float, data_s: float, samples: int) -> dict[str, Any]:
        """The timing row of the epoch that ends now: ``train_s``, ``data_s``, ``eval_s``,
        ``misc_s``, ``samples`` and ``samples_per_s`` (:func:`training_rates`)."""
        now = time.perf_counter()
        wall, self._since = now - self._since, now
        eval_s, self._eval_s = self._eval_s, 0.0
        return {
            "train_s": train_s,
            "data_s": data_s,
            "eval_s": eval_s,
            "misc_s": max(wall - train_s - data_s - eval_s, 0.0),
            "samples": samples,
            "samples_per_s": training_rates(samples, train_s, data_s)["samples_per_s"],
        }


def resolved_config(config: dict[str, Any], rt: Runtime, loader: Any) -> dict[str, Any]:
    """``config`` (a :class:`TrainConfig` as a dict) with what its ``auto`` values and
    defaults became here: ``rt``'s device and autocast, the training ``loader``'s backend,
    augmentation place and threads; the values asked for, where they differ, in
    ``requested``."""
    used = {
        "device": str(rt.device),
        "loader": loader.backend,
        "augment_in": loader.augment_in,
        "num_threads": resolve_threads(loader.cfg),
        "amp": rt.amp,
    }
    requested = {k: config[k] for k, v in used.items() if config[k] != v}
    facts = {
        "world_size": rt.world_size,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    return {**config, **used, **facts, "requested": requested}


def timing_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One :data:`TIMING_COLUMNS` row per epoch of ``history``; nan where a checkpoint
    from before a column existed lacks it."""
    unknown = dict.fromkeys(TIMING_COLUMNS, math.nan)
    return [{**unknown, "epoch": record["epoch"], **record["timing"]} for record in history]


def write_timings(path: Path, history: list[dict[str, Any]]) -> None:
    """timings.csv: one row per epoch, the reference's three-way split of the wall time."""
    with atomic_write(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TIMING_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(timing_rows(history))


def timing_table(history: list[dict[str, Any]]) -> str:
    """The timings as a fixed-width table."""
    seconds = ("train_s", "data_s", "eval_s", "misc_s")
    lines = [
        f"{'epoch':>5} {' '.join(f'{k:>9}' for k in seconds)} {'samples':>8} {'samples/s':>10}"
    ]
    for r in timing_rows(history):
        times = " ".join(f"{r[k]:>9.2f}" for k in seconds)
        lines.append(f"{r['epoch']:>5} {times} {r['samples']:>8} {r['samples_per_s']:>10.1f}")
    return "\n".join(lines)
