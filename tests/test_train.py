"""train.py end to end on tiny shards: run files, resume, torchrun, bad input, GPU bookkeeping.

Runs use a 3-level UNet (``--widths 4,8,16``), batches of 4 and at most 2 batches per epoch,
so each training subprocess takes seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from pipeline.config import LoaderConfig, resolve_threads
from pipeline.loader import dali_available
from tests.conftest import ROOT, run_cli, snapshot
from tests.conftest import one_line_error as cli_error
from training import monitor
from training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from training.distributed import Runtime
from training.recipe import RECIPES
from training.rundir import RunDir

TINY_RUN = ("--batch-size", "4", "--max-batches", "2", "--widths", "4,8,16", "--seed", "0")
TEST_KEYS = {"iou", "dice", "depth_rmse", "depth_mae", "depth_ssim", "loss"}
HISTORY_VALUES = ("loss", "mask_bce", "depth_ssim_loss")


def train_cli(*args: str, env: dict | None = None, timeout: float = 300):
    """Run train.py as a user would; fails the test with the output if it crashed."""
    if env:
        os.environ.update(env)  # run_cli copies os.environ; undone below
    try:
        return run_cli("train.py", *TINY_RUN, *args, timeout=timeout)
    finally:
        for key in env or {}:
            os.environ.pop(key, None)


def ok(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


# train.py's refusals: non-zero exit, no traceback, one "train.py: error" line (conftest's)
one_line_error = partial(cli_error, code=None, prefix="train.py: error", alone=False)


def history_values(metrics: dict) -> list[float]:
    return [
        record[split][key]
        for record in metrics["history"]
        for split in ("train", "test")
        for key in (*HISTORY_VALUES, *(("iou", "dice", "depth_rmse") if split == "test" else ()))
    ]


@pytest.fixture(scope="module")
def full_run_result(tiny_shards, tmp_path_factory) -> tuple[Path, SimpleNamespace]:
    """An uninterrupted 2-epoch run with histograms and the torch profiler, and its output."""
    out = tmp_path_factory.mktemp("runs") / "full"
    args = ["--data", str(tiny_shards), "--epochs", "2", "--out", str(out), "--histograms"]
    result = train_cli(*args, "--log-interval", "1", "--profile", "torch")
    ok(result)
    return out, result


@pytest.fixture(scope="module")
def full_run(full_run_result) -> Path:
    """The run directory of :func:`full_run_result`."""
    return full_run_result[0]


def test_run_writes_every_documented_file(full_run):
    config = json.loads((full_run / "config.json").read_text())
    assert config["epochs"] == 2 and config["batch_size"] == 4 and config["widths"] == [4, 8, 16]

    for name in ("last.pt", "best.pt"):
        state = torch.load(full_run / "checkpoints" / name, weights_only=True)
        assert {"model", "optimizer", "scheduler", "epoch", "rng", "config"} <= state.keys()
        assert {"torch", "numpy", "python"} <= state["rng"].keys()
        assert state["config"]["widths"] == [4, 8, 16]
    assert torch.load(full_run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2

    with open(full_run / "timings.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    columns = ("epoch", "train_s", "data_s", "eval_s", "misc_s", "samples", "samples_per_s")
    assert tuple(rows[0]) == columns
    assert all(float(r["train_s"]) > 0 and int(r["samples"]) == 8 for r in rows)
    assert all(float(r["eval_s"]) > 0 for r in rows)

    metrics = json.loads((full_run / "metrics.json").read_text())
    assert metrics["test"].keys() >= TEST_KEYS
    assert 0 <= metrics["test"]["iou"] <= 1 and metrics["test"]["depth_rmse"] > 0
    assert [r["epoch"] for r in metrics["history"]] == [1, 2]
    assert metrics["history"][0]["test"].keys() >= TEST_KEYS
    assert {"loss", "lr", "samples_per_s", "data_wait_share"} <= metrics["history"][0][
        "train"
    ].keys()
    assert metrics["params"] > 0 and metrics["macs"] > 0

    with Image.open(full_run / "results.png") as image:
        assert image.width >= 6 * 160 and image.height >= 4 * 160

    traces = list((full_run / "tb").glob("*.pt.trace.json*"))  # where TensorBoard looks
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert not (full_run / "profile").exists()
    assert not (full_run / "memory_layers.csv").exists()  # CPU run: GPU reports are skipped


def test_tensorboard_has_scalars_images_histograms_graph(full_run):
    events = list((full_run / "tb").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(full_run / "tb"), size_guidance={"histograms": 0}).Reload()
    tags = acc.Tags()
    for split, names in (
        (
            "train",
            ("loss", "mask_bce", "depth_ssim_loss", "lr", "samples_per_s", "data_wait_share"),
        ),
        (
            "test",
            (
                "loss",
                "mask_bce",
                "depth_ssim_loss",
                "iou",
                "dice",
                "depth_rmse",
                "depth_mae",
                "depth_ssim",
            ),
        ),
    ):
        for name in names:
            assert f"{split}/{name}" in tags["scalars"], f"{split}/{name} missing"
            # per-epoch values at each epoch's last optimizer step (2 steps per epoch)
            assert [e.step for e in acc.Scalars(f"{split}/{name}")] == [2, 4]
    assert [e.step for e in acc.Scalars("train_step/loss")] == [1, 2, 3, 4]
    # the lr at every log step (--log-interval 1), the warm-up and decay visible within epochs
    lrs = acc.Scalars("train_step/lr")
    assert [e.step for e in lrs] == [1, 2, 3, 4] and len({e.value for e in lrs}) == 4
    assert "test/depth_aux" not in tags["scalars"]  # the test loss has no aux term
    assert "test/samples" in tags["images"]
    assert any(tag.startswith("weights/") for tag in tags["histograms"])
    assert tags["graph"]


@pytest.mark.parametrize("at_step", [1, 2, 3], ids=["epoch1", "epoch1-end", "epoch2"])
def test_signal_mid_epoch_then_resume_matches_uninterrupted_run(
    at_step, full_run, tiny_shards, tmp_path, monkeypatch, capsys
):
    """A real SIGINT during a step: the step finishes, last.pt holds the exact position, the
    run exits 130 with one line, and --resume ends where an uninterrupted run does."""
    out = tmp_path / "resumed"
    common = ["--data", str(tiny_shards), "--epochs", "2", "--out", str(out), *TINY_RUN]
    real_step, calls = train.train_step, []

    def step_then_signal(*args):
        calls.append(None)
        result = real_step(*args)
        if len(calls) == at_step:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would, mid-epoch
        return result

    monkeypatch.setattr(train, "train_step", step_then_signal)
    assert train.cli([*common, "--checkpoint-every", "5"]) == 130
    monkeypatch.undo()
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    epoch, position = divmod(at_step * 4, 8)  # 2 steps of 4 samples per epoch
    assert (saved["epoch"], saved["position"], saved["global_batch"]) == (epoch, position, 4)
    where = (
        f"epoch {epoch + 1} up to sample 4 of its order"
        if position
        else f"the last finished epoch ({epoch})"  # a signal in an epoch's last step
    )
    last = out / "checkpoints" / "last.pt"
    stderr = capsys.readouterr().err
    assert stderr.strip().splitlines()[-1] == (
        f"train.py: interrupted; {last} holds {where}: continue with --resume"
    )
    assert not (out / "metrics.json").exists()  # stopped like a killed run: no final files

    assert train.cli(["--out", str(out), "--resume"]) == 0
    assert ("4 samples into the next" in capsys.readouterr().out) == bool(position)
    full = json.loads((full_run / "metrics.json").read_text())
    again = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in again["history"]] == [1, 2]
    for mine, theirs in zip(again["history"], full["history"]):
        for key in ("loss", "iou", "dice", "depth_rmse"):
            assert mine["test"][key] == pytest.approx(theirs["test"][key], rel=1e-5, abs=1e-6)
    expected = torch.load(full_run / "checkpoints" / "last.pt", weights_only=True)["model"]
    got = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_the_end_says_where_the_trace_is_and_evaluates_once_per_epoch(full_run_result):
    out, result = full_run_result
    trace = next((out / "tb").glob("*.pt.trace.json*"))
    assert f"torch.profiler: {trace} (TensorBoard's PyTorch Profiler tab" in result.stdout
    assert f"TensorBoard:    tensorboard --logdir {out / 'tb'}" in result.stdout
    # the result is the last epoch's test pass, not another one
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"] == metrics["history"][-1]["test"]


def test_train_and_test_loss_add_up_the_same_terms(tiny_shards, tmp_path, monkeypatch):
    """With an aux depth head (a 4-level model has one, at 40x40) both splits log as loss
    the recipe's weighted sum of the same terms; the aux term is train's depth_aux, apart.
    One evaluation per epoch and none repeated at the end."""
    evaluations, real_evaluate = [], train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a: evaluations.append(a) or real_evaluate(*a))
    out = tmp_path / "aux"
    args = ["--data", str(tiny_shards), "--epochs", "1", "--out", str(out), *TINY_RUN]
    final = train.main([*args, "--widths", "4,8,16,32", "--log-interval", "1"])
    assert len(evaluations) == 1
    weights = RECIPES["default"]
    terms = {"mask_bce": "mask_weight", "mask_dice_loss": "dice_weight",
             "depth_ssim_loss": "depth_weight", "depth_l1": "depth_l1_weight",
             "depth_grad": "depth_grad_weight"}  # fmt: skip
    record = json.loads((out / "metrics.json").read_text())["history"][0]
    assert final == record["test"]
    for split in ("train", "test"):
        expected = sum(weights[w] * record[split][k] for k, w in terms.items())
        assert record[split]["loss"] == pytest.approx(expected, rel=1e-5), split
    assert record["train"]["depth_aux"] > 0 and "depth_aux" not in record["test"]
    tags = EventAccumulator(str(out / "tb")).Reload().Tags()["scalars"]
    assert {"train/depth_aux", "train_step/depth_aux"} <= set(tags)
    assert "test/depth_aux" not in tags


def test_compile_trains_on_the_cpu(tiny_shards, tmp_path):
    """--compile: torch.compile of the training model, 1 epoch of 2 batches on the CPU; the
    checkpoint holds the plain model's weights, which predict.py and --weights read."""
    out = tmp_path / "compiled"
    args = ["--data", str(tiny_shards), "--epochs", "1", "--out", str(out), *TINY_RUN]
    final = train.main([*args, "--compile"])
    assert math.isfinite(final["loss"]) and final["samples"] == 8
    saved = load_checkpoint(out / "checkpoints" / "last.pt")
    assert saved["config"]["compile"] is True
    assert not any("_orig_mod" in key or "module." in key for key in saved["model"])


def test_max_batches_caps_every_test_pass(full_run, tiny_shards, tmp_path):
    """--max-batches caps the final test pass and --test-only too, not only training."""
    metrics = json.loads((full_run / "metrics.json").read_text())
    # TINY_RUN: --max-batches 2 of 4 samples, of the 32 in the test split
    assert metrics["test"]["samples"] == 8
    assert [r["test"]["samples"] for r in metrics["history"]] == [8, 8]
    weights = str(full_run / "checkpoints" / "last.pt")
    args = ["--data", str(tiny_shards), "--test-only", "--weights", weights, *TINY_RUN]
    final = train.main([*args, "--out", str(tmp_path / "three"), "--max-batches", "3"])
    assert final["samples"] == 12


def logged_rates(text: str, pattern: str) -> list[float]:
    """The samples/s figures matching ``pattern`` in order, repeats of one redraw dropped."""
    rates = [float(x) for x in re.findall(pattern, text)]
    return [r for i, r in enumerate(rates) if i == 0 or r != rates[i - 1]]


def test_samples_per_s_agree_in_timings_log_bar_and_tensorboard(full_run_result):
    """One training samples/s, evaluation timed apart: timings.csv, metrics.json, the step
    log, the progress bar and TensorBoard show the same figure."""
    out, result = full_run_result
    with open(out / "timings.csv") as f:
        rows = list(csv.DictReader(f))
    history = json.loads((out / "metrics.json").read_text())["history"]
    step_log = [
        line for line in result.stdout.splitlines() if re.match(r"epoch \d+ step \d+/2 ", line)
    ]
    assert len(step_log) == 4  # --log-interval 1, 2 steps per epoch
    log_rates = [float(re.search(r"samples/s (\S+)", line)[1]) for line in step_log]
    acc = EventAccumulator(str(out / "tb")).Reload()
    board = {e.step: e.value for e in acc.Scalars("train/samples_per_s")}
    for epoch, row in enumerate(rows):
        rate = float(row["samples_per_s"])
        train_s, data_s = float(row["train_s"]), float(row["data_s"])
        assert rate == pytest.approx(int(row["samples"]) / (train_s + data_s), rel=1e-6)
        assert history[epoch]["train"]["samples_per_s"] == pytest.approx(rate, rel=1e-9)
        assert board[2 * (epoch + 1)] == pytest.approx(rate, rel=1e-5)
        # each log line covers 4 of the epoch's 8 samples: their times add up to the epoch's,
        # within the rounding of the printed figures (to 0.1 samples/s)
        pair = log_rates[2 * epoch : 2 * epoch + 2]
        slowest, fastest = (8 / sum(4 / max(r + d, 1e-9) for r in pair) for d in (-0.05, 0.05))
        assert slowest * (1 - 1e-6) <= rate <= fastest * (1 + 1e-6)
    # the bar shows the step log's figure, not a clock of its own
    assert logged_rates(result.stderr, r"samples/s=(\d+\.\d)") == logged_rates(
        " ".join(f"{r:.1f}" for r in log_rates), r"(\d+\.\d)"
    )


def test_config_json_holds_what_the_run_used(full_run):
    """config.json says what ``auto`` and the defaults became on this (CPU) machine."""
    config = json.loads((full_run / "config.json").read_text())
    used = {
        "device": "cpu",
        "loader": "dali" if dali_available() else "torch",
        "augment_in": "torch",  # auto: fused torch ops on a CPU
        "num_threads": resolve_threads(LoaderConfig()),
        "amp": False,  # bf16 autocast is CUDA-only
    }
    assert {k: config[k] for k in used} == used
    assert config["requested"] == {
        "device": "auto",
        "loader": "auto",
        "augment_in": "auto",
        "num_threads": None,
        "amp": True,
    }
    assert config["world_size"] == 1 and config["torch_threads"] >= 1
    assert config["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    assert not list(full_run.rglob(".tmp-*"))  # written atomically: no temporary files left


def test_resumed_run_logs_each_tensorboard_step_once(tiny_shards, tmp_path, monkeypatch):
    """A run interrupted in epoch 2 logged step 3 past its epoch-1 checkpoint; the resumed
    run logs steps 3 and 4 again and TensorBoard keeps only the resumed run's values."""
    real_step, steps = train.train_step, []

    def interrupted_step(*args):
        steps.append(None)
        if len(steps) == 4:  # epoch 2, step 2: after step 3 was logged
            raise KeyboardInterrupt
        return real_step(*args)

    out = tmp_path / "run"
    args = ["--data", str(tiny_shards), "--epochs", "2", "--out", str(out), *TINY_RUN]
    args += ["--log-interval", "1"]
    monkeypatch.setattr(train, "train_step", interrupted_step)
    assert train.cli(args) == 130
    aborted = EventAccumulator(str(out / "tb")).Reload()
    assert [e.step for e in aborted.Scalars("train_step/loss")] == [1, 2, 3]
    monkeypatch.setattr(train, "train_step", real_step)
    assert train.cli([*args, "--resume"]) == 0
    acc = EventAccumulator(str(out / "tb")).Reload()
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 2
    for tag in acc.Tags()["scalars"]:
        logged = [e.step for e in acc.Scalars(tag)]
        assert len(logged) == len(set(logged)), f"{tag}: steps {logged}"
    assert [e.step for e in acc.Scalars("train_step/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]
    # the step-3 value is the resumed run's: the same as its epoch's log (not the aborted one)
    final = json.loads((out / "metrics.json").read_text())
    assert acc.Scalars("train/loss")[-1].value == pytest.approx(
        final["history"][1]["train"]["loss"], rel=1e-5
    )


def test_omp_wait_policy_is_passive_when_unset():
    """train.py sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP, unless the user set it.

    libgomp reports its effective spin count at start-up: 0 when passive.
    """
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(OMP_DISPLAY_ENV="VERBOSE", PYTHONPATH=str(ROOT))

    def spin_count(*args: str, **extra: str) -> str | None:
        result = subprocess.run(
            [sys.executable, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, **extra},
        )
        assert result.returncode == 0, result.stderr
        found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", result.stderr)
        return found and found[1]

    chosen = spin_count("train.py", "--help", OMP_WAIT_POLICY="ACTIVE")
    if chosen is None:
        pytest.skip("torch's OpenMP runtime is not libgomp: it does not report its spin count")
    assert chosen != "0"  # the user's own setting is kept: busy-waiting threads spin
    assert spin_count("train.py", "--help") == "0"


def test_every_option_has_help():
    """Every train.py option says what it does in --help (hidden test options aside)."""
    missing = [
        action.option_strings
        for action in train.build_parser()._actions
        if action.help != argparse.SUPPRESS and not (action.help or "").strip()
    ]
    assert not missing


def torchrun_train(*args: str, timeout: float = 300):
    """``train.py`` on the tiny settings under real torchrun: 2 processes, gloo, this machine."""
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    return run_cli(*torchrun, "train.py", *TINY_RUN, *args, timeout=timeout)


def test_torchrun_two_processes_matches_single_process(tiny_shards, tmp_path):
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    # --max-batches caps the test passes too: 4 batches of 4 per rank read all 32 test
    # samples, as 8 batches do in one process.
    args = ("--data", str(tiny_shards), "--epochs", "1", "--max-batches", "4")
    ok(torchrun_train(*args, "--out", str(ddp_out)))
    ddp = json.loads((ddp_out / "metrics.json").read_text())
    # each rank trains on its own 4 batches of 4; the loss is averaged over both ranks
    assert ddp["history"][0]["train"]["samples"] == 32
    weights = str(ddp_out / "checkpoints" / "last.pt")
    ok(
        train_cli(
            *args,
            "--max-batches",
            "8",
            "--test-only",
            "--out",
            str(single_out),
            "--weights",
            weights,
        )
    )
    single = json.loads((single_out / "metrics.json").read_text())
    assert ddp["test"]["samples"] == single["test"]["samples"] == 32
    for key in TEST_KEYS:
        assert ddp["test"][key] == pytest.approx(single["test"][key], rel=1e-5, abs=1e-6), key


def test_a_run_stopped_on_two_ranks_resumes_on_one_and_back(tiny_shards, tmp_path):
    """Mid-epoch checkpoints hold a position in the global order, so a run continues on
    another number of ranks with the same global batch (8: 2 ranks x 4, or 1 x 8)."""
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    args = ("--data", str(tiny_shards), "--epochs", "2", "--max-batches", "4", "--seed", "0")
    args += ("--widths", "4,8,16")
    # 2 ranks, stopped by SIGINT on both after step 2 of epoch 1 (the ranks agree on a stop at
    # log steps: every 2nd here); then 1 rank goes on
    out = tmp_path / "two-then-one"
    fault = ("tests/fault_rank.py", "sigint", "all", *args, "--batch-size", "4")
    fault += ("--log-interval", "2")
    stopped = run_cli(*torchrun, *fault, "--out", str(out), timeout=300)
    assert stopped.returncode != 0, stopped.stderr
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["position"], saved["global_batch"]) == (0, 16, 8)
    ok(run_cli("train.py", "--out", str(out), "--resume", "--batch-size", "8", timeout=300))
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [r["train"]["samples"] for r in history] == [16, 32]  # the rest, then a whole epoch
    # 1 rank stopped after step 2 (16 samples of 8 each); 2 ranks go on
    out = tmp_path / "one-then-two"
    fault = ("tests/fault_rank.py", "sigint", "all", *args, "--batch-size", "8")
    assert run_cli(*fault, "--out", str(out), timeout=300).returncode == 130
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["position"], saved["global_batch"]) == (0, 16, 8)
    resumed = run_cli(*torchrun, "train.py", "--out", str(out), "--resume", "--batch-size", "4")
    ok(resumed)
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [r["train"]["samples"] for r in history] == [16, 32]


def test_ctrl_c_to_torchrun_saves_and_each_worker_says_so_in_one_line(tiny_shards, tmp_path):
    """Ctrl-C reaches torchrun only (its workers have sessions of their own); torchrun
    passes SIGINT on to the workers, which agree on the stop, save a whole last.pt and exit
    130 with one line each. torchrun then reports its own SignalException, exit 1, as
    train.py --help says."""
    out = tmp_path / "run"
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--tee", "3")
    args = ("--data", str(tiny_shards), "--epochs", "1", "--out", str(out), "--log-interval", "2")
    fault = ("tests/fault_rank.py", "sigint-launcher", "0", *args, *TINY_RUN, "--batch-size", "1")
    result = run_cli(*torchrun, *fault, timeout=240)
    assert result.returncode == 1, result.stderr
    assert "SignalException" in result.stderr and "[default0]:Traceback" not in result.stderr
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    where = (
        f"epoch 1 up to sample {saved['position']} of its order"
        if saved["position"]
        else "the last finished epoch (1)"
    )
    line = f"train.py: interrupted; {out / 'checkpoints' / 'last.pt'} holds {where}"
    for rank in (0, 1):
        said = re.findall(rf"\[default{rank}\]:(train\.py: [^\r\n]*)", result.stderr)
        assert said == [f"{line}: continue with --resume"], result.stderr
    assert "[default1]:Traceback" not in result.stderr


def test_help_says_how_a_stop_ends_under_torchrun():
    text = " ".join(train.build_parser().format_help().split())
    assert "Ctrl-C there reaches torchrun only" in text
    assert "saves and exits 130" in text and "--shutdown-timeout" in text


def test_brace_urls_evaluate_like_the_data_dir(full_run, tiny_shards, tmp_path):
    """--train/--test URLs read the same samples as --data: the same final metrics."""
    urls = {}
    for split in ("train", "test"):
        last = max(int(p.stem.split("-")[1]) for p in tiny_shards.glob(f"{split}-*.tar"))
        urls[split] = f"{tiny_shards}/{split}-{{000000..{last:06d}}}.tar"
    weights = str(full_run / "checkpoints" / "last.pt")
    final = train.main(
        [
            "--train",
            urls["train"],
            "--test",
            urls["test"],
            "--test-only",
            "--weights",
            weights,
            "--out",
            str(tmp_path / "urls"),
            *TINY_RUN,
        ]
    )
    expected = json.loads((full_run / "metrics.json").read_text())["test"]
    for key in TEST_KEYS:
        assert final[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    # --test-only logs nothing to TensorBoard, so it leaves no event file behind
    assert not list((tmp_path / "urls").rglob("events.out.tfevents.*"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_shards, tmp_path, monkeypatch, capsys):
    steps_per_epoch = 2  # TINY_RUN's --max-batches
    real_step, steps = train.train_step, []

    def nan_loss(loss_fn):
        def poisoned(*args):
            return {k: v * math.nan for k, v in loss_fn(*args).items()}

        return poisoned

    def diverging_step(model, loss_fn, optimizer, batch, rt):
        """The real step, with every training loss NaN from epoch 2 on: a diverging run."""
        steps.append(batch)
        if len(steps) > steps_per_epoch:
            loss_fn = nan_loss(loss_fn)
        return real_step(model, loss_fn, optimizer, batch, rt)

    monkeypatch.setattr(train, "train_step", diverging_step)
    out = tmp_path / "nan"
    returncode = train.cli(
        ["--data", str(tiny_shards), "--epochs", "2", "--out", str(out), *TINY_RUN]
    )
    captured = capsys.readouterr()
    result = SimpleNamespace(returncode=returncode, stdout=captured.out, stderr=captured.err)
    one_line_error(result, "loss is nan")
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "metrics.json").exists()


def test_results_captions_are_each_samples_iou(tiny_shards, tmp_path):
    """The IoU under each predicted mask in results.png is that sample's own IoU."""
    torch.manual_seed(0)
    cfg = train.TrainConfig(data=str(tiny_shards), widths=(4, 8, 16), batch_size=8, augment=False)
    rt = Runtime(torch.device("cpu"))
    _, test_loader, loader_cfg = train.build_loaders(cfg, rt)
    state = train.build_state(cfg, rt, RunDir(tmp_path), test_loader.channels, loader_cfg)
    _, shown = train.evaluate(state, test_loader, 2, rt, preview=6)
    pred, true = shown["mask_prob"].flatten(1) > 0.5, shown["mask"].flatten(1) > 0.5
    union = (pred | true).sum(1)
    expected = torch.where(union > 0, (pred & true).sum(1) / union.clamp(min=1), 1.0)
    assert len(set(expected.tolist())) > 1  # different samples, different IoUs
    assert shown["iou"] == pytest.approx(expected.tolist(), abs=1e-6)


def test_missing_data_dir_is_one_line_error(tmp_path):
    result = run_cli("train.py", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"))
    one_line_error(result, f"{tmp_path / 'nowhere'}: no such dataset directory")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("given", ["zip", "txt"])
def test_a_zip_or_a_file_as_data_is_one_line_and_creates_nothing(given, tiny_zips, tmp_path):
    data = tmp_path / f"data.{given}"
    if given == "zip":
        shutil.copy(next(tiny_zips.glob("batch*_images.zip")), data)
    else:
        data.write_text("not a dataset")
    before = snapshot(tmp_path)
    result = run_cli("train.py", "--data", str(data), "--out", str(tmp_path / "run"))
    what = "is a zip" if given == "zip" else "is a file"
    cli_error(result, f"{data}: {what}", "python -m sharding.build", prefix="train.py: error")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give either --data DIR or both --train URLS and --test URLS"),
        (["--train", "t-{0..1}.tar"], "--train and --test go together; give both"),
        (["--data", "d", "--test-only"], "--test-only evaluates a checkpoint: add --weights CKPT"),
        (
            ["--data", "d", "--resume", "--weights", "w.pt"],
            "--resume continues OUT/checkpoints/last.pt; drop --weights",
        ),
    ],
    ids=["no-data", "train-alone", "test-only-alone", "resume-and-weights"],
)
def test_usage_errors_exit_2_with_argparses_message(argv, message, tmp_path):
    result = run_cli("train.py", *argv, "--out", str(tmp_path / "run"))
    line = cli_error(result, message, code=2, prefix="train.py: error", alone=False)
    assert result.stderr.startswith("usage: train.py") and line == f"train.py: error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_manifest_with_other_format_version_is_refused(tiny_shards, tmp_path):
    data = tmp_path / "shards"
    shutil.copytree(tiny_shards, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["format_version"] = 99
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(train.TrainError, match="version 99, expected 'maskdepth-shards' version 1"):
        train.main(["--data", str(data), "--out", str(tmp_path / "r"), *TINY_RUN])


def test_checkpoint_for_other_channels_or_config_is_refused(
    full_run, tiny_shards, tiny_shards_rgb, tmp_path
):
    last = full_run / "checkpoints" / "last.pt"
    with pytest.raises(train.TrainError, match="1-channel images but the data has 3"):
        train.main(
            [
                "--data",
                str(tiny_shards_rgb),
                "--test-only",
                "--weights",
                str(last),
                "--out",
                str(tmp_path / "rgb"),
                *TINY_RUN,
            ]
        )
    with pytest.raises(train.TrainError, match="widths"):
        train.main(
            [
                "--data",
                str(tiny_shards),
                "--test-only",
                "--weights",
                str(last),
                "--out",
                str(tmp_path / "w"),
                *TINY_RUN,
                "--widths",
                "4,8",
            ]
        )
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    with pytest.raises(train.TrainError, match=r"different config: lr=0\.01 \(now 0\.5\)"):
        train.main(
            [
                "--data",
                str(tiny_shards),
                "--epochs",
                "2",
                "--out",
                str(run),
                "--resume",
                *TINY_RUN,
                "--lr",
                "0.5",
            ]
        )


def test_existing_run_dir_needs_resume_or_overwrite(full_run, tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    # The refusal is the one line, with no config printed before it.
    assert train.cli(["--data", str(tiny_shards), "--out", str(run), *TINY_RUN]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("train.py: error: ")
    assert len(captured.err.splitlines()) == 1 and "already holds a run" in captured.err
    with pytest.raises(train.TrainError, match="already holds a run"):
        train.main(["--data", str(tiny_shards), "--out", str(run), *TINY_RUN])
    assert (run / "checkpoints" / "last.pt").exists()
    with pytest.raises(train.TrainError, match="no checkpoint"):
        train.main(["--data", str(tiny_shards), "--out", str(tmp_path / "new"), "--resume"])


def test_torchrun_refused_run_dir_is_one_error_and_loses_nothing(full_run, tiny_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    result = torchrun_train("--data", str(tiny_shards), "--out", str(run), timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "train.py: error" in line]
    # Every rank stops on rank 0's verdict; torchrun may tear the others down before they
    # print, so at least rank 0's line is there and no rank printed anything else.
    assert errors and all("already holds a run" in e for e in errors), result.stderr
    assert (run / "checkpoints" / "last.pt").read_bytes() == (
        full_run / "checkpoints" / "last.pt"
    ).read_bytes()


class Exploit:
    """Pickles into a call of ``Path.touch`` on load: what weights_only must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_tampered_checkpoint_is_refused_without_running_code(full_run, tiny_shards, tmp_path):
    marker = tmp_path / "pwned"
    state = torch.load(full_run / "checkpoints" / "last.pt", weights_only=True)
    state["payload"] = Exploit(marker)
    evil = tmp_path / "evil.pt"
    torch.save(state, evil)
    with pytest.raises(CheckpointError, match="refused to load checkpoint"):
        load_checkpoint(evil)
    with pytest.raises(train.TrainError, match="refused to load checkpoint"):
        train.main(
            [
                "--data",
                str(tiny_shards),
                "--test-only",
                "--weights",
                str(evil),
                "--out",
                str(tmp_path / "r"),
                *TINY_RUN,
            ]
        )
    assert not marker.exists()


def test_failed_checkpoint_write_keeps_previous_one(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "weights": torch.zeros(4)}, path)
    # A real "file too large" error from the kernel stands in for a full disk.
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(CheckpointError, match="previous checkpoint there is intact"):
            save_checkpoint({"epoch": 2, "weights": torch.zeros(100_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    state = load_checkpoint(path)
    assert state["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_checkpoint({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_gpu_sampler_aggregates_readings():
    readings = iter(
        [
            {"used_bytes": 100, "util_percent": 10.0, "temperature_c": 40.0},
            {"used_bytes": 300, "util_percent": 90.0, "temperature_c": 60.0},
            {"used_bytes": 200, "util_percent": 50.0, "temperature_c": 50.0},
        ]
    )
    sampler = monitor.GpuSampler(
        lambda: next(readings), {"device_name": "fake", "total_bytes": 1000}
    )
    assert sampler.report() == {"device_name": "fake", "total_bytes": 1000, "samples": 0}
    for _ in range(3):
        sampler.sample()
    report = sampler.report()
    assert report["samples"] == 3 and report["device_name"] == "fake"
    assert report["used_bytes"] == 200 and report["peak_used_bytes"] == 300
    assert report["mean_util_percent"] == pytest.approx(50.0)
    assert report["peak_util_percent"] == 90.0 and report["peak_temperature_c"] == 60.0
    assert sampler.latest()["used_bytes"] == 200


def test_layer_memory_recorder_logs_pre_and_post_hooks(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    counter = iter(range(1000))
    recorder = monitor.LayerMemoryRecorder(model, lambda: next(counter), lambda: 7, exp="t")
    model(torch.zeros(1, 2))
    recorder.remove()
    model(torch.zeros(1, 2))  # after remove(): nothing more is recorded
    rows = recorder.rows
    # Sequential pre, Linear pre, Linear fwd, ReLU pre, ReLU fwd, Sequential fwd
    assert [(r["layer_type"], r["hook_type"]) for r in rows] == [
        ("Sequential", "pre"),
        ("Linear", "pre"),
        ("Linear", "fwd"),
        ("ReLU", "pre"),
        ("ReLU", "fwd"),
        ("Sequential", "fwd"),
    ]
    assert [r["call_idx"] for r in rows] == list(range(6))
    assert [r["mem_all"] for r in rows] == list(range(6))
    assert [r["layer_idx"] for r in rows] == [0, 1, 1, 2, 2, 0]
    recorder.write_csv(tmp_path / "memory_layers.csv")
    with open(tmp_path / "memory_layers.csv") as f:
        written = list(csv.DictReader(f))
    assert tuple(written[0]) == monitor.MEMORY_COLUMNS and len(written) == 6
    assert written[0]["mem_cached"] == "7" and written[0]["exp"] == "t"


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA memory and NVML readers with fixed readings, so the GPU monitor runs on a CPU."""
    reading = {"used_bytes": 100, "util_percent": 50.0, "temperature_c": 40.0}
    monkeypatch.setattr(monitor, "cuda_memory_readers", lambda device: (lambda: 1, lambda: 2))
    monkeypatch.setattr(
        monitor, "nvml_reader", lambda device: ({"device_name": "fake"}, lambda: reading)
    )


def sampler_running() -> bool:
    return any(thread.name == "gpu-sampler" for thread in threading.enumerate())


def test_gpu_monitor_writes_reports_after_the_steps(fake_gpu, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    with monitor.gpu_monitor(model, torch.device("cpu"), tmp_path) as gpu:
        for step in range(monitor.MEMORY_STEPS + 1):
            model(torch.zeros(1, 2))
            gpu.step(step)
        assert sampler_running()
    assert not sampler_running()
    with open(tmp_path / "memory_layers.csv") as f:
        rows = list(csv.DictReader(f))
    # 3 modules x (pre, fwd) per step, recorded for MEMORY_STEPS steps only
    assert len(rows) == 6 * monitor.MEMORY_STEPS
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["device_name"] == "fake" and report["samples"] >= 1


def test_gpu_monitor_of_a_compiled_model_hooks_no_layer(fake_gpu, tmp_path):
    model, notes = torch.nn.Sequential(torch.nn.Linear(2, 3)), []
    with monitor.gpu_monitor(model, torch.device("cpu"), tmp_path, layers=False, note=notes.append):
        model(torch.zeros(1, 2))
        assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks
    assert notes == ["memory_layers.csv skipped: --compile (per-layer hooks would split the graph)"]
    assert not (tmp_path / "memory_layers.csv").exists()
    assert (tmp_path / "gpu_report.json").exists()


def test_gpu_monitor_stops_everything_when_the_run_fails(fake_gpu, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    with (
        pytest.raises(RuntimeError, match="diverged"),
        monitor.gpu_monitor(model, torch.device("cpu"), tmp_path, profile=True) as gpu,
    ):
        for step in range(2):  # past the profiler's wait and warm-up: it is recording now
            model(torch.zeros(1, 2))
            gpu.step(step)
        assert sampler_running() and torch.autograd._profiler_enabled()
        raise RuntimeError("diverged")
    assert not sampler_running() and not torch.autograd._profiler_enabled()
    rows = len(gpu.recorder.rows)
    model(torch.zeros(1, 2))
    assert len(gpu.recorder.rows) == rows  # the memory hooks are gone
    assert not (tmp_path / "memory_layers.csv").exists()  # reports only for a finished run


def test_gpu_readers_refuse_cpu():
    with pytest.raises(monitor.GpuUnavailable):
        monitor.nvml_reader(torch.device("cpu"))
    with pytest.raises(monitor.GpuUnavailable):
        monitor.cuda_memory_readers(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_reports_on_cuda(tiny_shards, tmp_path):
    out = tmp_path / "cuda"
    ok(
        train_cli(
            "--data", str(tiny_shards), "--epochs", "1", "--out", str(out), "--device", "cuda"
        )
    )
    with open(out / "memory_layers.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == monitor.MEMORY_COLUMNS
    assert max(int(r["mem_all"]) for r in rows) > 0
    report = json.loads((out / "gpu_report.json").read_text())
    assert report["samples"] >= 1 and report["peak_used_bytes"] > 0 and report["device_name"]


def test_train_throughput_benchmark_writes_json(tiny_shards, tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli(
        "-m",
        "benchmarks.train_throughput",
        "--data",
        str(tiny_shards),
        "--json",
        str(out),
        "--batches",
        "2",
        "--batch-size",
        "4",
        "--widths",
        "4,8,16",
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(out.read_text())
    assert payload["machine"]["cores"] >= 1
    assert {"torch", "dali-cpu", "synthetic"} <= payload["results"].keys()
    for figures in payload["results"].values():
        assert figures["samples_per_s"] > 0 and 0 <= figures["data_wait_share"] <= 1
    assert math.isfinite(payload["results"]["synthetic"]["samples_per_s"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "--rootdir", str(ROOT)]))
