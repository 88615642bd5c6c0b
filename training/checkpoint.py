"""Atomic checkpoint writes, ``weights_only`` reads, and RNG state as plain tensors and lists."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "maskdepth-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint could not be written or read; the message says which file and why."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file, fsync, then ``os.replace``.

    On any write error (a full disk, a quota) the temporary file is removed and the file
    already at ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    # torch.save reports a failed write (a full disk, a size limit) as RuntimeError from its
    # zip writer, or as OSError when the file cannot even be opened.
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [repr(e)])[0]
        raise CheckpointError(
            f"could not write checkpoint {path}: {reason}; the previous checkpoint there is "
            "intact. Free some space or pass another --out"
        ) from e


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` so that no pickled code can run."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refused to load checkpoint {path}: it is not a plain-tensor checkpoint "
            f"({first_line}); only load checkpoints written by train.py"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a maskdepth checkpoint written by train.py")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format_version={state.get('format_version')} but this "
            f"train.py reads version {FORMAT_VERSION}; retrain or use the matching version"
        )
    return state


def rng_state() -> dict[str, Any]:
    """The torch, CUDA, numpy and Python RNG states as tensors and lists (``weights_only``-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(internal), gauss_next],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
