"""Time ``unzip`` of the batch zips (the reference solution's step) against ``sharding.build``.

    python -m benchmarks.shard_vs_unzip data/zips/batch*_images.zip [--json out.json]

Both run in one process tree on the same zips, on a fresh temporary directory each, with the
page cache warmed by one read of the zips first so neither pays for the first disk read.
The build produces validated, shuffled, indexed shards; unzip produces only loose files.

The zips' member compression changes both sides (the build reads stored members straight from
a memory map and inflates deflated ones), so the JSON records it. sharding.synth writes stored
zips by default; `zip` and most tools write deflated ones. Make deflated zips with

    python -m sharding.synth --out data/zips-deflated --compression deflated
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from benchmarks.report import missing_dir, write_report
from sharding.shard_format import read_manifest
from sharding.synth import COMPRESSION


class BenchmarkError(Exception):
    """A run that cannot be measured; the message names the file."""


def _warm(zips: list[str]) -> None:
    for path in zips:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def zip_compression(zips: list[str]) -> dict:
    """How the zips' members are compressed: ``method`` (one name, or "mixed") and counts."""
    names = {code: name for name, code in COMPRESSION.items()}
    counts: dict[str, int] = {}
    for path in zips:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    name = names.get(info.compress_type, f"method {info.compress_type}")
                    counts[name] = counts.get(name, 0) + 1
    method = next(iter(counts)) if len(counts) == 1 else "mixed" if counts else "empty"
    return {"method": method, "members": dict(sorted(counts.items()))}


def time_unzip(zips: list[str], workdir: Path) -> tuple[float, str]:
    """Extract every zip into ``workdir``; return seconds and the tool used."""
    start = time.perf_counter()
    if shutil.which("unzip"):
        for path in zips:
            subprocess.run(["unzip", "-q", "-o", path, "-d", str(workdir)], check=True)
        tool = "unzip"
    else:  # no Info-ZIP here: Python's extractor does the same work
        for path in zips:
            with zipfile.ZipFile(path) as zf:
                zf.extractall(workdir)
        tool = "python zipfile"
    return time.perf_counter() - start, tool


def time_build(zips: list[str], workdir: Path, workers: int, verify: str) -> tuple[float, dict]:
    """Run ``python -m sharding.build`` as a user would, start-up included."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "sharding.build", *zips, "--out", str(workdir / "shards")]
    cmd += ["--workers", str(workers), "--verify", verify]
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise BenchmarkError(f"sharding.build failed: {reason}")
    return elapsed, read_manifest(workdir / "shards")


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option has a help string."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.shard_vs_unzip",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("zips", nargs="+", help="the batch*_images.zip files to unzip and to build")
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="build workers")
    p.add_argument(
        "--verify",
        choices=("header", "decode"),
        default="header",
        help="the build's JPEG check (sharding.build --verify)",
    )
    p.add_argument("--tmp", help="an existing directory for the outputs (default: system temp)")
    return p


def _check_paths(a: argparse.Namespace) -> str | None:
    """The first path problem, as a one-line message, or None."""
    for path in a.zips:
        if not os.path.isfile(path):
            what = "is a directory, expected a batch zip" if os.path.isdir(path) else "no such file"
            return f"{path}: {what}"
    if a.tmp is not None and not os.path.isdir(a.tmp):
        return f"--tmp {a.tmp}: no such directory"
    if problem := missing_dir(a.json):
        return problem
    return None


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    problem = _check_paths(a)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        compression = zip_compression(a.zips)
        _warm(a.zips)
        with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
            unzip_s, tool = time_unzip(a.zips, Path(tmp) / "unzipped")
            shutil.rmtree(Path(tmp) / "unzipped")
            build_s, manifest = time_build(a.zips, Path(tmp), a.workers, a.verify)
    except (BenchmarkError, subprocess.CalledProcessError, zipfile.BadZipFile, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    samples = sum(s["samples"] for s in manifest["splits"].values())
    zip_bytes = sum(os.path.getsize(z) for z in a.zips)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "date": datetime.date.today().isoformat(),
        },
        "zips": len(a.zips),
        "zip_bytes": zip_bytes,
        "zip_compression": compression,
        "samples": samples,
        "unzip": {"seconds": round(unzip_s, 3), "tool": tool},
        "build": {
            "seconds": round(build_s, 3),
            "workers": a.workers,
            "verify": a.verify,
            "samples_per_s": round(samples / build_s, 1),
        },
        "build_over_unzip": round(build_s / unzip_s, 3),
    }
    print(f"{len(a.zips)} zips, {zip_bytes / 1e6:,.1f} MB, members {compression['method']}")
    print(f"{'step':<28}{'seconds':>10}{'samples/s':>12}")
    print(f"{tool + ' (loose files)':<28}{unzip_s:>10.2f}{samples / unzip_s:>12,.0f}")
    label = f"sharding.build ({a.workers}w, {a.verify})"
    print(f"{label:<28}{build_s:>10.2f}{samples / build_s:>12,.0f}")
    verdict = "meets" if build_s <= unzip_s else "misses"
    print(f"build / unzip = {build_s / unzip_s:.2f} ({verdict} the goal build <= unzip)")
    write_report(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
