"""What every benchmark does with its ``--json``: refuse a missing directory before any work
(a run of minutes should not end in a traceback), and write the report atomically after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sharding.atomic import write_json


def missing_dir(path: str | Path | None) -> str | None:
    """The one-line error for a ``--json`` whose directory does not exist, else None."""
    if path is not None and not Path(path).parent.is_dir():
        return f"the directory of --json {path} does not exist; create it first"
    return None


def write_report(path: str | Path | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` (if given) through the atomic writer, and say so."""
    if path:
        write_json(path, payload)
        print(f"wrote {path}")
