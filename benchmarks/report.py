"""What every benchmark shares: writing its JSON report atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: str | Path, payload: dict) -> None:
    """Write ``payload`` so that ``path`` is either absent, the old file, or complete."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
