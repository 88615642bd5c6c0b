"""Repack the dataset's batch zips into shuffled WebDataset shards with DALI indexes.

    python -m sharding.build data/zips/batch*_images.zip --out data/shards
    python -m sharding.build data/zips --out data/shards    # the batch*_images.zip in it

    python -m sharding.build data/zips/batch*_images.zip --out s3://bucket/shards

The zips are read in place, never extracted. Every JPEG is validated, so a broken file is
caught here rather than halfway through training. What the shards, indexes and manifest look
like is defined in ``sharding.shard_format``. Workers stage each shard under a temporary name;
the finished shards are renamed into place and ``manifest.json`` is written last, only on
success: its presence means the shards are complete.

With an ``s3://`` ``--out`` (``sharding.storage``) the workers stage shards in a local temporary
directory, and the parent uploads each one under its final name as soon as it and every shard
before it are done, then deletes the local copy: the local disk holds a few shards, never the
whole set. A failed or killed build leaves shards but no manifest, which a re-run clears.

The build's stages each have their own module: ``sharding.zip_input`` (finding the zips,
pairing each sample's members, reading them), ``sharding.sample_check`` (the per-sample JPEG
checks), ``sharding.shard_jobs`` (writing shards in parallel, and the s3:// upload order) and
``sharding.finalise`` (renaming shards into place, then the manifest). This module holds the
build's order of steps and its command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict

from sharding import storage
from sharding.atomic import TMP_PREFIX
from sharding.build_config import BuildError, ShardConfig
from sharding.finalise import finalise
from sharding.layout import batch_number
from sharding.sample_check import find_geometry
from sharding.shard_format import MANIFEST, SHARD_FILE, SPLITS
from sharding.shard_jobs import Uploader, plan_jobs, remove_staged, run_jobs
from sharding.signals import StopSignals, quiet_when_stdout_closes
from sharding.zip_input import (
    BATCH_ZIP_GLOB,
    Skips,
    choose_test_zips,
    expand_zip_dirs,
    scan_zips,
)

# What a build writes, and so what --overwrite or a re-run after a killed build may remove.
_OWN_FILE = re.compile(rf"{SHARD_FILE.pattern}|{re.escape(MANIFEST)}|{re.escape(TMP_PREFIX)}.*")
# Tar headers and the JSON member add about this much to each sample's JPEG bytes.
_SAMPLE_OVERHEAD = 5 * 1024 + 200


# --- the build ------------------------------------------------------------------------------


def prepare_out(cfg: ShardConfig) -> str:
    """Create ``--out``, refusing one with other content unless ``--overwrite``.

    ``--out`` is a directory or an ``s3://`` prefix; returns it as given.
    """
    out = cfg.out
    if not storage.is_url(out):
        if os.path.exists(out) and not os.path.isdir(out):
            raise BuildError(f"--out {out}: exists and is not a directory")
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise BuildError(f"--out {out}: cannot create ({e.strerror})") from None
    entries = storage.list_names(out)
    own = [name for name in entries if _OWN_FILE.fullmatch(name)]
    finished = MANIFEST in entries
    foreign = [name for name in entries if name not in own]
    if foreign or (finished and not cfg.overwrite):
        if not cfg.overwrite:
            what = "prefix" if storage.is_url(out) else "directory"
            raise BuildError(
                f"--out {out}: {what} is not empty ({len(entries)} entries); "
                f"pass --overwrite to replace a previous build, or choose another {what}"
            )
        if foreign:
            raise BuildError(
                f"--out {out}: holds files this tool did not write (e.g. {foreign[0]}); "
                "refusing to mix them with shards"
            )
    # Leftovers of a killed build (no manifest) are ours to clear; so is a build --overwrite'd.
    # The manifest goes first, so a half-replaced build never looks done.
    storage.delete([storage.join(out, MANIFEST)])
    storage.delete([storage.join(out, name) for name in own if name != MANIFEST])
    return out


def build(cfg: ShardConfig, progress: bool = True) -> dict:
    """Run the whole build; return the manifest. Raises ``BuildError`` on bad input."""
    if not cfg.zips:
        raise BuildError("no zips given")
    if cfg.verify not in ("header", "decode"):
        raise BuildError(f"--verify must be 'header' or 'decode', got {cfg.verify!r}")
    if cfg.workers < 1:
        raise BuildError(f"--workers must be at least 1, got {cfg.workers}")
    remote_zips = [z for z in cfg.zips if storage.is_url(z)]
    if remote_zips:
        raise BuildError(
            f"{remote_zips[0]}: zips are read from local disk; download them first "
            "(only --out may be an s3:// URL)"
        )
    # Sorted by batch number: the listing order on the command line must not change the bytes.
    zips = tuple(
        sorted(expand_zip_dirs(cfg.zips), key=lambda p: (batch_number(os.path.basename(p)) or 0, p))
    )
    cfg = ShardConfig(**{**asdict(cfg), "zips": zips})
    skips = Skips()
    samples, ignored, member_bytes = scan_zips(cfg, skips)  # fails before touching --out
    test_idx = choose_test_zips(cfg)
    if cfg.strict and skips.items:
        first = skips.items[0]
        raise BuildError(
            f"--strict: {first['zip']}: {first['member']}: {first['reason']} "
            f"({len(skips.items)} samples would be skipped)"
        )
    if not samples:
        raise BuildError("no complete samples found in the input zips")
    geometry = find_geometry(cfg, samples)
    per_shard = cfg.samples_per_shard or max(
        1, cfg.shard_bytes // (sum(member_bytes) // len(samples) + _SAMPLE_OVERHEAD)
    )
    out = prepare_out(cfg)
    remote = storage.is_url(out)
    # Workers write each shard here; for s3:// it is a local directory the uploads drain.
    staging = tempfile.mkdtemp(prefix="maskdepth-build-") if remote else out
    try:
        jobs = plan_jobs(samples, test_idx, per_shard, cfg, zips, staging, geometry)
        publish = Uploader(out, staging) if remote else None
        results = run_jobs(jobs, cfg.workers, len(samples), progress, staging, publish)
        for result in results:
            skips.items.extend(result["skipped"])
        problem = None
        if cfg.strict and skips.items:
            first = skips.items[0]
            problem = f"--strict: {first['zip']}: {first['member']}: {first['reason']}"
        for split in SPLITS:
            if not any(r["samples"] for j, r in zip(jobs, results) if j["split"] == split):
                reasons = dict(Counter(i["reason"] for i in skips.items))
                problem = problem or (
                    f"the {split} split would be empty: every one of its samples was skipped "
                    f"({reasons}); train.py needs both splits"
                )
        if problem:
            remove_staged(staging)
            raise BuildError(problem)
        return finalise(cfg, out, jobs, results, skips, ignored, per_shard, geometry)
    finally:
        if remote:
            shutil.rmtree(staging, ignore_errors=True)


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> ShardConfig:
    """Parse the command line into a ``ShardConfig``."""
    p = argparse.ArgumentParser(
        prog="python -m sharding.build",
        description="Repack batch zips into shuffled WebDataset shards with DALI indexes. "
        "The highest-numbered batch becomes the test split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "zips",
        nargs="+",
        help=f"batch zips, e.g. data/batch*_images.zip, or a directory: the {BATCH_ZIP_GLOB} in it",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output directory, or s3://BUCKET/PREFIX, for shards and manifest.json",
    )
    p.add_argument(
        "--test-zips",
        action="append",
        metavar="ZIP[,ZIP...]",
        help="zips (file names or batchN) for the test split, comma-separated or repeated; "
        "default: the highest-numbered batch",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the global shuffle of samples into shards"
    )
    p.add_argument("--shard-mb", type=float, default=100, help="target shard size in MB")
    p.add_argument("--samples-per-shard", type=int, help="samples per shard; overrides --shard-mb")
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="processes that read, check and write shards in parallel",
    )
    p.add_argument(
        "--image-size",
        type=int,
        help="side in pixels every bg, fg_bg and mask must declare; others are skipped "
        "(default: the first complete sample's)",
    )
    p.add_argument(
        "--depth-size",
        type=int,
        help="side in pixels every depth map must declare (default: the first complete sample's)",
    )
    p.add_argument(
        "--verify",
        choices=("header", "decode"),
        default="header",
        help="header: check markers and parse the header; decode: decode every image fully",
    )
    p.add_argument("--strict", action="store_true", help="fail on any skipped sample")
    p.add_argument("--overwrite", action="store_true", help="replace a previous build in --out")
    # Intermixed: zips may come before and after options (`--test-zips batch1 zips...`).
    a = p.parse_intermixed_args(argv)
    if a.samples_per_shard is not None and a.samples_per_shard < 1:
        p.error("--samples-per-shard must be at least 1")
    if a.workers < 1:
        p.error(f"--workers must be at least 1, got {a.workers}")
    for option in ("image_size", "depth_size"):
        if getattr(a, option) is not None and getattr(a, option) < 1:
            p.error(f"--{option.replace('_', '-')} must be at least 1 pixel")
    test_zips = None
    if a.test_zips is not None:
        test_zips = tuple(name for value in a.test_zips for name in value.split(",") if name)
        if not test_zips:
            p.error("--test-zips needs a zip name or batchN, e.g. --test-zips batch1")
    return ShardConfig(
        zips=tuple(a.zips),
        out=a.out,
        test_zips=test_zips,
        seed=a.seed,
        shard_bytes=int(a.shard_mb * 1e6),
        samples_per_shard=a.samples_per_shard,
        workers=a.workers,
        verify=a.verify,
        strict=a.strict,
        overwrite=a.overwrite,
        image_size=a.image_size,
        depth_size=a.depth_size,
    )


def print_summary(manifest: dict, elapsed: float, out: str) -> None:
    """Print what the build wrote: per split, per part, what was skipped or ignored."""
    splits = manifest["splits"]
    total = splits["train"]["samples"] + splits["test"]["samples"]
    skipped = manifest["skipped"]
    print(f"\nshards written to {out} in {elapsed:.1f} s ({total / elapsed:.0f} samples/s)")
    for name, split in splits.items():
        size = sum(s["bytes"] for s in split["shards"]) / 1e6
        print(
            f"  {name:5s} {_count(split['samples'], 'sample', ',d')} in "
            f"{_count(len(split['shards']), 'shard')}, {size:,.1f} MB"
        )
    for part, info in manifest["images"].items():
        print(f"  {part:6s} {info['mode']:3s} {info['size'][0]}x{info['size'][1]}")
    for part, info in manifest["images"].items():
        if len(info.get("modes", {})) > 1:
            mix = ", ".join(f"{n:,d} {mode}" for mode, n in info["modes"].items())
            print(f"  {part:6s} mixes {mix}; loaded as {manifest['channels']} channel(s)")
    print(f"  skipped {_count(skipped['count'], 'sample')} {skipped['by_reason'] or ''}")
    if manifest["ignored"]:
        print(f"  ignored members: {manifest['ignored']}")
    print(f"  manifest: {storage.join(out, MANIFEST)}")


def _count(n: int, noun: str, spec: str = "d") -> str:
    """``1 shard``, ``2 shards``."""
    return f"{n:{spec}} {noun}{'' if n == 1 else 's'}"


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (1: a one-line error, 130: interrupted)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)  # not "Found credentials in ..."
    cfg = parse_args(argv)
    start = time.perf_counter()
    try:
        with StopSignals():  # kill cleans up as Ctrl-C does; a second one is ignored
            return _run(cfg, start)
    except KeyboardInterrupt:  # cleaned up on the way out (run_jobs); nothing more to do
        print("interrupted: no manifest was written; re-run the same command", file=sys.stderr)
        return 130


def _run(cfg: ShardConfig, start: float) -> int:
    try:
        manifest = build(cfg)
    except (BuildError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenProcessPool:
        print(
            "error: a worker process died (killed, or out of memory?); no manifest was written, "
            "re-run the same command (with fewer --workers if memory is short)",
            file=sys.stderr,
        )
        return 1
    except OSError as e:  # anything the specific checks did not foresee still gets one line
        print(f"error: {e.filename or cfg.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print_summary(manifest, time.perf_counter() - start, cfg.out)
    return 0


if __name__ == "__main__":
    sys.exit(quiet_when_stdout_closes(main))
