"""The one atomic writer: a temporary sibling, fsync, then a rename over the final name.

Every file maskdepth writes (shards, manifest.json, checkpoints, metrics.json, figures,
benchmark JSON) goes through here, so a crash, a kill or a full disk never leaves a
half-written file under the final name, and the file that was there before stays intact.
Temporary files are named ``.tmp-<pid>-<name>`` beside the target: the same directory keeps
``os.replace`` atomic, and the prefix lets a cleanup find what an interrupted writer left.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TMP_PREFIX = ".tmp-"


def temporary_path(path: str | os.PathLike) -> Path:
    """The temporary sibling that :func:`atomic_write` writes before renaming to ``path``."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write by name; on success it replaces ``path``.

    For writers that take a file name rather than a file object (``Image.save`` with a
    format from the suffix, ``cProfile.dump_stats``). On any error the temporary file is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "wb", *, fsync: bool = True, **open_kwargs: Any
) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path``.

    ``mode`` is ``"w"`` or ``"wb"``; ``open_kwargs`` go to :func:`open` (``encoding``,
    ``newline``). On any error, ``KeyboardInterrupt`` included, the temporary file is
    removed and ``path`` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r}: atomic_write writes whole files, use 'w' or 'wb'")
    with atomic_path(path, fsync=False) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def write_json(
    path: str | os.PathLike, payload: Any, *, indent: int = 2, sort_keys: bool = False
) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(payload, indent=indent, sort_keys=sort_keys) + "\n")
