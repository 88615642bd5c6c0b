"""What every benchmark records and does with its ``--json``: the machine it ran on (with the
load average, since other users' load skews wall rates), a refusal of a missing directory
before any work (a run of minutes should not end in a traceback), and the report written
atomically after."""

from __future__ import annotations

import datetime
import os
import platform
from importlib.metadata import PackageNotFoundError, version
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


def cores() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, to 2 decimals: other users' load skews wall rates.

    Every benchmark records the load average from here.
    """
    if not hasattr(os, "getloadavg"):
        return None
    return [round(load, 2) for load in os.getloadavg()]  # 1.1708984375 says no more than 1.17


def machine_info() -> dict:
    """Cores, GPU, date, versions, and the load average: other users' load skews wall rates."""
    import torch  # here, not at the top: shard_vs_unzip uses this module without torch

    load_at_end = load_average()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    dali_version = None
    for dist in ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110"):
        try:
            dali_version = version(dist)
            break
        except PackageNotFoundError:
            continue
    return {
        "cores": cores(),
        "gpu": gpu,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dali": dali_version,
        "load_average_at_end": load_at_end,
        "load_average_1m_at_end": load_at_end[0] if load_at_end else None,
    }
