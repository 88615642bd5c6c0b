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


def cpu_name() -> str:
    """CPU model name; platform.processor() is empty on most Linux systems."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device=None) -> dict:
    """What the figures were measured on: cores, CPU, GPU, versions, OpenMP's wait policy, the
    date and the load average (other users' load skews wall rates). ``device``: the
    ``torch.device`` a benchmark timed, named too."""
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
    info = {
        "cores": cores(),
        "cpu": cpu_name(),
        "gpu": gpu,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "dali": dali_version,
        # OpenMP threads that spin while waiting crawl when other processes share the cores.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_at_end": load_at_end,
        "load_average_1m_at_end": load_at_end[0] if load_at_end else None,
    }
    if device is not None:
        info["device"] = str(device)
        info["device_name"] = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
        )
    return info
