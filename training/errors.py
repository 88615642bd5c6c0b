"""The one error type a training run reports to its user, and the message for a diverged run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TrainError(Exception):
    """A user mistake or a stopped run; ``train.py`` prints it as one line on stderr."""


class Stopped(Exception):
    """A run stopped by a signal at a step's end, after saving where it was."""

    def __init__(self, epoch: int, position: int, checkpoint: Path):
        where = (
            f"epoch {epoch + 1} up to sample {position} of its order"
            if position
            else f"the last finished epoch ({epoch})"
        )
        super().__init__(f"interrupted; {checkpoint} holds {where}: continue with --resume")


def diverged(what: str, last_checkpoint: Path) -> TrainError:
    """The error that stops a run whose loss is no longer finite, before it saves again."""
    kept = (
        f"the last good checkpoint {last_checkpoint} is kept"
        if last_checkpoint.is_file()
        else "no checkpoint was written yet"
    )
    return TrainError(f"{what}; stopped, {kept}. Lower --lr or check the data")


def interrupted(run: Any, test_only: bool) -> str:
    """What to tell a user who stopped a run with Ctrl-C: what is kept and how to go on.

    ``run`` is the run's :class:`training.rundir.RunDir`. A run stopped before its first
    checkpoint (an epoch's end, or ``--checkpoint-every``) has nothing to resume.
    """
    if test_only:
        return "interrupted; the evaluation did not finish, run it again"
    if run.last.is_file():
        from training.checkpoint import CheckpointError, load_checkpoint  # it imports this module

        try:
            saved = load_checkpoint(run.last)
            return str(Stopped(int(saved["epoch"]), int(saved.get("position", 0)), run.last))
        except (CheckpointError, KeyError, ValueError):
            return f"interrupted; {run.last} holds the last checkpoint: continue with --resume"
    return (
        f"interrupted before the first epoch finished, so there is no checkpoint in {run.path} "
        "to resume; start again with the same command"
    )
