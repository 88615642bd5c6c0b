"""The one error type a training run reports to its user, and the message for a diverged run."""

from __future__ import annotations

from pathlib import Path


class TrainError(Exception):
    """A user mistake or a stopped run; ``train.py`` prints it as one line on stderr."""


def diverged(what: str, last_checkpoint: Path) -> TrainError:
    """The error that stops a run whose loss is no longer finite, before it saves again."""
    return TrainError(
        f"{what}; stopped, the last good checkpoint {last_checkpoint} is kept. Lower --lr or "
        "check the data"
    )
