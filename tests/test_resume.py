"""Resuming a run: longer --epochs, options read from the checkpoint, refusals, Ctrl-C.

Runs call ``train.cli`` in this process on the tiny shards (a 3-level UNet, batches of 4, 2
batches per epoch), as test_train.py's NaN test does, so each epoch takes a second or two.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import train
from tests.conftest import one_line_error as shared_one_line_error
from tests.conftest import snapshot as shared_snapshot
from training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    resize_schedule,
    save_checkpoint,
)
from training.recipe import build_optimizer

TINY_RUN = ("--batch-size", "4", "--max-batches", "2", "--widths", "4,8,16", "--seed", "0")
# A schedule counted in epochs (halving the lr after each) is the same at any run length.
STEP_SCHEDULE = ("--schedule", "step", "--lr-step", "1", "--lr-gamma", "0.5")


def cli(capsys, *args: str) -> SimpleNamespace:
    """``train.cli(args)`` with its exit code and output."""
    capsys.readouterr()
    returncode = train.cli(list(args))
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=returncode, stdout=captured.out, stderr=captured.err)


def ok(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


# train.py's refusals: exit 1, no traceback, one "train.py: error" line (conftest's check)
one_line_error = partial(shared_one_line_error, prefix="train.py: error", alone=False)
snapshot = partial(shared_snapshot, dirs=False)  # files only: what a refusal must leave alone


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


@pytest.fixture(scope="module")
def runs(tiny_shards, tmp_path_factory) -> SimpleNamespace:
    """A finished 2-epoch run and an uninterrupted 4-epoch run, both on the step schedule."""
    root = tmp_path_factory.mktemp("resume")
    common = ("--data", str(tiny_shards), *TINY_RUN, *STEP_SCHEDULE)
    for name, epochs in (("two", "2"), ("four", "4")):
        assert train.cli([*common, "--epochs", epochs, "--out", str(root / name)]) == 0
    return SimpleNamespace(two=root / "two", four=root / "four", root=root)


def test_resume_extends_epochs_like_an_uninterrupted_run(runs, tmp_path, capsys):
    """--resume --epochs 4 on a finished 2-epoch run, no other flag retyped, ends where a
    4-epoch run ends: the same weights, history and final metrics."""
    run = tmp_path / "extended"
    shutil.copytree(runs.two, run)
    result = cli(capsys, "--out", str(run), "--resume", "--epochs", "4")
    ok(result)
    assert "resumed from" in result.stdout and "after epoch 2" in result.stdout
    # a schedule counted in epochs is the same at any length: the line says it goes on
    note = "lr schedule: step, counted in epochs, so the 4-epoch run goes on at lr 0.0025"
    note += " from step 4"
    assert note in result.stdout.splitlines()
    assert json.loads((run / "config.json").read_text())["epochs"] == 4

    expected, got = weights(runs.four), weights(run)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    full = json.loads((runs.four / "metrics.json").read_text())
    again = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in again["history"]] == [1, 2, 3, 4]
    assert [r["train"]["lr"] for r in again["history"]] == [0.005, 0.0025, 0.00125, 0.000625]
    for ours, theirs in zip(again["history"], full["history"], strict=True):
        for split in ("train", "test"):
            assert ours[split]["loss"] == pytest.approx(theirs[split]["loss"], rel=1e-5)
    for key in ("iou", "dice", "depth_rmse", "loss"):
        assert again["test"][key] == pytest.approx(full["test"][key], rel=1e-5, abs=1e-6), key


def test_extending_a_finished_cosine_run_says_what_the_lr_does(tiny_shards, tmp_path, capsys):
    """A finished cosine run ended at lr 0; --resume --epochs 4 re-sizes the schedule, and
    the lr jumps back up: one line says from what to what, and where it ends."""
    run = tmp_path / "cosine"
    ok(cli(capsys, "--data", str(tiny_shards), *TINY_RUN, "--epochs", "2", "--out", str(run)))
    result = cli(capsys, "--out", str(run), "--resume", "--epochs", "4")
    ok(result)
    notes = [line for line in result.stdout.splitlines() if line.startswith("lr schedule:")]
    expected = schedule_lrs(tiny_shards, 4)[4]  # a 4-epoch run's lr at step 4 (2 per epoch)
    assert notes == [
        f"lr schedule: the 2-epoch cosine is re-sized to 4 epochs; the lr goes from 0 to "
        f"{expected:.3g} at step 4 and follows the 4-epoch schedule from there, to 0 at step 8"
    ]
    assert expected > 0.001  # back up from 0: what the line is there to say
    result = cli(capsys, "--out", str(run), "--resume", "--epochs", "4")  # nothing left to do
    assert "lr schedule" not in result.stdout


def schedule_lrs(shards: Path, epochs: int) -> list[float]:
    """The lr of each step of a run of ``epochs`` on the default recipe, 2 steps per epoch."""
    cfg = train.parse_args(["--data", str(shards), "--epochs", str(epochs), *TINY_RUN])
    return lrs(build_optimizer(cfg, nn.Linear(2, 2), 2)[1], 2 * epochs)


def schedule(epochs: int, steps_per_epoch: int = 3):
    """The default recipe's optimizer and a warm-up, hold, cosine schedule for ``epochs``."""
    cfg = SimpleNamespace(
        optimizer="adamw", lr=0.01, momentum=0.9, weight_decay=1e-4, schedule="cosine",
        warmup=0.2, cooldown=0.5, lr_step=2, lr_gamma=0.1, epochs=epochs,
    )  # fmt: skip
    torch.manual_seed(0)
    return build_optimizer(cfg, nn.Linear(2, 2), steps_per_epoch)[1]


def lrs(scheduler, steps: int) -> list[float]:
    """The lr of each of the next ``steps`` optimizer steps."""
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_extended_cosine_schedule_continues_as_the_longer_run():
    """A 2-epoch cosine resumed to 4 epochs takes, from the step it reached, the lr of a
    4-epoch cosine (not 0, where the 2-epoch schedule ended)."""
    short, longer = schedule(2), schedule(4)
    lrs(short, 6)  # the 2-epoch run, finished: its lr is 0 now
    assert short.optimizer.param_groups[0]["lr"] == 0.0
    reference = lrs(longer, 12)

    resumed = schedule(4)
    fresh = resumed.state_dict()
    resumed.load_state_dict(short.state_dict())
    resize_schedule(resumed, fresh, Path("last.pt"))
    assert lrs(resumed, 6) == pytest.approx(reference[6:], rel=1e-12)


def test_resume_with_other_steps_per_epoch_is_refused():
    short, other = schedule(2, steps_per_epoch=3), schedule(4, steps_per_epoch=5)
    lrs(short, 6)
    fresh = other.state_dict()
    other.load_state_dict(short.state_dict())
    with pytest.raises(
        CheckpointError, match="ran 3 optimizer steps per epoch but this run makes 5"
    ):
        resize_schedule(other, fresh, Path("last.pt"))


def test_resume_refuses_changed_maths_in_one_line_and_loses_nothing(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs.two, run)
    before = snapshot(run)
    changed = ("--lr", "0.5", "--batch-size", "8", "--widths", "4,8", "--recipe", "reference")
    line = one_line_error(
        cli(capsys, "--out", str(run), "--resume", "--epochs", "3", *changed),
        "belongs to a different config",
        "widths=[4, 8, 16] (now [4, 8])",
        "recipe='default' (now 'reference')",
        "lr=0.01 (now 0.5)",
    )
    assert "epochs" not in line  # a longer run is allowed
    one_line_error(  # the batch per rank may change with the ranks, the global batch not
        cli(capsys, "--out", str(run), "--resume", "--batch-size", "8"),
        "ran with a global batch of 4 samples (batch size x ranks) but this run's is 8",
    )
    one_line_error(
        cli(capsys, "--out", str(run), "--resume", "--epochs", "1"),
        "--epochs 1 is fewer than the 2 epochs",
        "pass --epochs 2 or more",
    )
    assert snapshot(run) == before  # config.json and checkpoints untouched, no .tmp- files


def test_resume_may_read_the_data_from_a_new_place(runs, tiny_shards, tmp_path, capsys):
    """Moved shards are not a new config: --data is the one run option a resume may change
    besides --epochs (their steps per epoch must still match the schedule)."""
    run, moved = tmp_path / "run", tmp_path / "moved"
    shutil.copytree(runs.two, run)
    shutil.copytree(tiny_shards, moved)
    ok(cli(capsys, "--out", str(run), "--resume", "--epochs", "3", "--data", str(moved)))
    assert json.loads((run / "config.json").read_text())["data"] == str(moved)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 3


def test_test_only_reads_the_model_from_the_checkpoint(runs, tmp_path, capsys):
    """--test-only --weights needs no --data, --widths or --diff-input: they are the
    checkpoint's; the same weights on the same test split give the run's final metrics."""
    last = str(runs.two / "checkpoints" / "last.pt")
    out = tmp_path / "eval"
    result = cli(capsys, "--test-only", "--weights", last, "--out", str(out))
    ok(result)
    expected = json.loads((runs.two / "metrics.json").read_text())["test"]
    got = json.loads((out / "metrics.json").read_text())["test"]
    for key in ("iou", "dice", "depth_rmse", "loss"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    # An evaluation writes its results only: no checkpoints/, no tb/ and no TensorBoard hint.
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.json", "results.png"]
    assert "TensorBoard" not in result.stdout and "results figure" in result.stdout

    refused = tmp_path / "refused"
    contradicting = ("--widths", "4,8", "--no-diff-input")
    one_line_error(
        cli(capsys, "--test-only", "--weights", last, "--out", str(refused), *contradicting),
        "widths=[4, 8, 16] (now [4, 8])",
        "diff_input=True (now False)",
    )
    assert not refused.exists()


def test_a_checkpoint_from_before_newer_options_keeps_what_it_ran_with(runs, tmp_path):
    """Options added after a checkpoint was written take the values it ran with, not
    today's default recipe: concat skips, no context, no gradient loss, the plain cosine."""
    state = load_checkpoint(runs.two / "checkpoints" / "last.pt")
    newer = ("skip", "context", "depth_grad_weight", "cooldown", "depth_aux_weight")
    for key in newer:
        state["config"].pop(key)
        state["model_config"].pop(key, None)
    run = tmp_path / "old"
    shutil.copytree(runs.two, run)
    save_checkpoint(state, run / "checkpoints" / "last.pt")
    before = {"skip": "concat", "context": False, "depth_grad_weight": 0.0, "cooldown": 1.0,
              "depth_aux_weight": 0.0}  # fmt: skip
    for argv in (["--resume", "--out", str(run)],
                 ["--test-only", "--weights", str(run / "checkpoints" / "last.pt")]):  # fmt: skip
        cfg = train.parse_args(argv)
        assert {key: getattr(cfg, key) for key in newer} == before, argv
    # The same checkpoint with the fields, as written today: its own values.
    cfg = train.parse_args(["--resume", "--out", str(runs.two)])
    assert (cfg.skip, cfg.context, cfg.depth_grad_weight, cfg.depth_aux_weight) == (
        "add",
        True,
        2.0,
        0.5,
    )


def test_resume_without_a_checkpoint_says_so(tiny_shards, tmp_path, capsys):
    out = tmp_path / "new"
    one_line_error(
        cli(capsys, "--data", str(tiny_shards), "--out", str(out), "--resume"),
        f"--resume: no checkpoint at {out / 'checkpoints' / 'last.pt'}",
    )
    assert not out.exists()


def interrupt_at_step(monkeypatch, step: int) -> None:
    """Ctrl-C during the ``step``-th training step (counted from 1 over the whole run)."""
    real_step, calls = train.train_step, []

    def step_or_interrupt(*args):
        calls.append(None)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(train, "train_step", step_or_interrupt)


def test_ctrl_c_in_the_first_epoch_says_to_start_again(tiny_shards, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    command = ("--data", str(tiny_shards), "--epochs", "1", "--out", str(out), *TINY_RUN)
    interrupt_at_step(monkeypatch, 2)
    result = cli(capsys, *command)
    assert result.returncode == 130
    assert "no checkpoint" in result.stderr and "start again with the same command" in result.stderr
    assert "--resume" not in result.stderr
    assert not (out / "checkpoints" / "last.pt").exists()
    monkeypatch.undo()
    ok(cli(capsys, *command))  # what the message says works: the same command again


def test_ctrl_c_after_a_mid_epoch_checkpoint_says_where_it_holds(
    tiny_shards, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    command = ("--data", str(tiny_shards), "--epochs", "1", "--out", str(out), *TINY_RUN)
    interrupt_at_step(monkeypatch, 2)  # a KeyboardInterrupt inside step 2, after step 1's save
    result = cli(capsys, *command, "--checkpoint-every", "1")
    assert result.returncode == 130
    last = out / "checkpoints" / "last.pt"
    assert (
        f"{last} holds epoch 1 up to sample 4 of its order: continue with --resume" in result.stderr
    )


def test_ctrl_c_after_an_epoch_resumes(runs, tiny_shards, tmp_path, monkeypatch, capsys):
    """Interrupted in epoch 2: the hint says --resume, and --resume ends as an uninterrupted
    run does."""
    out = tmp_path / "run"
    command = ("--data", str(tiny_shards), "--epochs", "2", "--out", str(out), *TINY_RUN)
    interrupt_at_step(monkeypatch, 3)  # epoch 2's first step
    result = cli(capsys, *command, *STEP_SCHEDULE)
    assert result.returncode == 130
    assert f"{out / 'checkpoints' / 'last.pt'} holds the last finished epoch" in result.stderr
    assert "continue with --resume" in result.stderr
    monkeypatch.undo()
    ok(cli(capsys, "--out", str(out), "--resume"))
    expected, got = weights(runs.two), weights(out)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
