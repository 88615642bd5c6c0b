"""Repack the dataset's batch zips into shuffled WebDataset shards with DALI indexes.

    python -m sharding.build data/zips/batch*_images.zip --out data/shards

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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import mmap
import os
import random
import re
import shutil
import signal
import struct
import sys
import tempfile
import time
import zipfile
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from sharding import storage
from sharding.atomic import TMP_PREFIX, atomic_write
from sharding.jpeg import JpegError, decode_check, parse_header
from sharding.layout import ZipLayout, batch_number, classify, zip_tag
from sharding.shard_format import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_SUFFIX,
    MANIFEST,
    META_EXT,
    PARTS,
    SHARD_FILE,
    SPLITS,
    TAR_SUFFIX,
    image_ext,
    shard_stem,
    write_manifest,
)
from sharding.tario import ShardWriter

log = logging.getLogger(__name__)

# What a build writes, and so what --overwrite or a re-run after a killed build may remove.
_OWN_FILE = re.compile(rf"{SHARD_FILE.pattern}|{re.escape(MANIFEST)}|{re.escape(TMP_PREFIX)}.*")
# Tar headers and the JSON member add about this much to each sample's JPEG bytes.
_SAMPLE_OVERHEAD = 5 * 1024 + 200


@dataclass(frozen=True)
class ShardConfig:
    """How to build the shards; see ``--help`` for each field."""

    zips: tuple[str, ...]
    out: str
    test_zips: tuple[str, ...] | None = None
    seed: int = 0
    shard_bytes: int = 100_000_000
    samples_per_shard: int | None = None
    workers: int = 1
    verify: str = "header"  # "header" or "decode"
    strict: bool = False
    overwrite: bool = False


class BuildError(Exception):
    """A problem with the input or output the user can act on; the message says which file."""


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's four JPEGs live."""

    zip_index: int
    key: str
    fg: int
    bg: int
    flip: int
    n: int
    members: tuple[str, str, str, str]  # bg, fg_bg, mask, depth


@dataclass
class Skips:
    """Samples left out, with the reason for each."""

    items: list[dict] = field(default_factory=list)

    def add(self, zip_name: str, member: str, reason: str, detail: str = "") -> None:
        item = {"zip": zip_name, "member": member, "reason": reason}
        if detail:
            item["detail"] = detail
        self.items.append(item)

    def summary(self) -> dict:
        return {
            "count": len(self.items),
            "by_reason": dict(sorted(Counter(i["reason"] for i in self.items).items())),
            "samples": self.items,
        }


# --- reading the zips -----------------------------------------------------------------------


def open_zip(path: str) -> zipfile.ZipFile:
    """Open a zip or raise a one-line ``BuildError`` naming the file."""
    if not os.path.exists(path):
        raise BuildError(f"{path}: no such file")
    if os.path.isdir(path):
        raise BuildError(f"{path}: is a directory, expected a batch zip")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        with open(path, "rb") as f:
            starts_like_zip = f.read(4) == b"PK\x03\x04"
        what = "truncated or damaged zip" if starts_like_zip else "not a zip file"
        raise BuildError(f"{path}: {what} ({e})") from None
    except OSError as e:
        raise BuildError(f"{path}: cannot read ({e.strerror})") from None


def scan_zips(cfg: ShardConfig, skips: Skips) -> tuple[list[SampleRef], dict, list[int]]:
    """Pair every fg_bg with its bg, mask and depth; return samples, ignored counts, sizes."""
    samples: list[SampleRef] = []
    ignored: Counter = Counter()
    member_bytes: list[int] = []
    for zip_index, path in enumerate(cfg.zips):
        name = os.path.basename(path)
        with open_zip(path) as zf:
            infos = {i.filename: i for i in zf.infolist()}
        _scanned[path] = infos
        layout = classify(list(infos))
        if not layout.found_any_folder:
            raise BuildError(
                f"{path}: none of the expected folders (bg_jpg/, fg_bg_jpg/, mask_black_jpg/, "
                "depth_fg_bg_jpg/) found; is this a dataset batch zip?"
            )
        ignored.update(junk=layout.junk, extra=layout.extra, other=layout.other)
        for member, _part in layout.unparsed:
            skips.add(name, member, "bad_name")
        paired = list(_pair(zip_index, name, layout, skips, ignored))
        member_bytes.extend(infos[m].file_size for ref in paired for m in ref.members)
        samples.extend(paired)
    return samples, dict(sorted(ignored.items())), member_bytes


def _pair(zip_index: int, name: str, layout: ZipLayout, skips: Skips, ignored: Counter):
    tag = zip_tag(name)
    for sample_id in sorted(layout.fg_bg):
        f, b, flip, n = sample_id
        fg_bg = layout.fg_bg[sample_id]
        found = {
            "bg": layout.bg.get(b),
            "mask": layout.mask.get(sample_id),
            "depth": layout.depth.get(sample_id),
        }
        missing = [part for part, member in found.items() if member is None]
        if missing:
            skips.add(name, fg_bg, f"missing_{missing[0]}")
            continue
        key = f"{tag}-{f}_{b}_{flip}_{n}"
        yield SampleRef(
            zip_index, key, f, b, flip, n, (found["bg"], fg_bg, found["mask"], found["depth"])
        )
    ignored["orphan"] += len(set(layout.mask) - set(layout.fg_bg))
    ignored["orphan"] += len(set(layout.depth) - set(layout.fg_bg))


def choose_test_zips(cfg: ShardConfig) -> set[int]:
    """Indexes of the zips that form the test split: by default the highest-numbered batch."""
    if cfg.test_zips is not None:
        wanted = set(cfg.test_zips)
        chosen = {
            i
            for i, p in enumerate(cfg.zips)
            if p in wanted
            or os.path.basename(p) in wanted
            or zip_tag(os.path.basename(p)) in wanted
        }
        unknown = wanted - {
            x for p in cfg.zips for x in (p, os.path.basename(p), zip_tag(os.path.basename(p)))
        }
        if unknown:
            raise BuildError(f"--test-zips {' '.join(sorted(unknown))}: not among the input zips")
        return chosen
    if len(cfg.zips) == 1:
        log.warning("only one zip given: every sample goes to train and the test split is empty")
        return set()
    numbers = [batch_number(os.path.basename(p)) for p in cfg.zips]
    if None in numbers:
        raise BuildError(
            "cannot tell which zip is the test batch: name them batch{N}_images.zip or "
            "pass --test-zips"
        )
    return {numbers.index(max(numbers))}


# --- writing shards (runs in worker processes) -----------------------------------------------


class ZipReader:
    """Reads one zip's members; stored (uncompressed) ones straight from a memory map.

    ``ZipFile.read`` costs a file object, a seek and a header parse per member; slicing a map
    and checking the CRC ourselves is several times faster for the JPEGs zips usually store.
    """

    def __init__(self, path: str, infos: dict[str, zipfile.ZipInfo] | None = None):
        self.path = path
        self._zf: zipfile.ZipFile | None = None
        # The central directory of a 40,000-sample zip takes seconds to parse in Python; forked
        # workers reuse the parent's parse from scan_zips instead of repeating it per worker.
        self.infos = (
            infos if infos is not None else {i.filename: i for i in self.zipfile.infolist()}
        )
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    @property
    def zipfile(self) -> zipfile.ZipFile:
        if self._zf is None:
            self._zf = zipfile.ZipFile(self.path)
        return self._zf

    def read(self, name: str) -> bytes:
        info = self.infos[name]
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # deflated/encrypted
            return self.zipfile.read(name)
        offset = info.header_offset
        if self.map[offset : offset + 4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"bad local header for {name!r}")
        name_len, extra_len = struct.unpack_from("<HH", self.map, offset + 26)
        start = offset + 30 + name_len + extra_len
        data = self.map[start : start + info.compress_size]
        if len(data) != info.compress_size or zlib.crc32(data) != info.CRC:
            raise zipfile.BadZipFile(f"Bad CRC-32 for file {name!r}")
        return data

    def close(self) -> None:
        self.map.close()
        if self._zf is not None:
            self._zf.close()


_open_zips: dict[tuple[int, str], ZipReader] = {}
_scanned: dict[str, dict[str, zipfile.ZipInfo]] = {}  # filled by scan_zips, inherited by fork


def _zip(path: str) -> ZipReader:
    # One reader per zip per process: reopening per shard would re-read the directory. Keyed
    # by pid because a forked worker inherits the parent's handles, and two processes seeking
    # one shared file descriptor read each other's bytes (seen as "Bad CRC-32").
    key = (os.getpid(), path)
    if key not in _open_zips:
        _open_zips[key] = ZipReader(path, _scanned.get(path))
    return _open_zips[key]


def _read_checked(zf: ZipReader, member: str, verify: str):
    data = zf.read(member)  # checks the CRC
    info = parse_header(data)
    if verify == "decode":
        decode_check(data)
    return data, info


def write_shard(job: dict) -> dict:
    """Stage one shard's tar and index under temporary names; return its record and skips."""
    zips, verify, out, staged = job["zips"], job["verify"], Path(job["out"]), job["staged"]
    writer = ShardWriter()
    skipped: list[dict] = []
    image_stats: Counter = Counter()
    bg_cache: dict[tuple[int, str], tuple[bytes, object] | Exception] = {}
    for ref in job["samples"]:
        zf = _zip(zips[ref.zip_index])
        members: dict[str, bytes] = {}
        for part, member in zip(PARTS, ref.members):
            try:
                if part == "bg":  # one bg serves thousands of samples: read and check it once
                    cache_key = (ref.zip_index, member)
                    if cache_key not in bg_cache:
                        try:
                            bg_cache[cache_key] = _read_checked(zf, member, verify)
                        except (JpegError, zipfile.BadZipFile, OSError) as e:
                            bg_cache[cache_key] = e
                    cached = bg_cache[cache_key]
                    if isinstance(cached, Exception):
                        raise cached
                    data, info = cached
                else:
                    data, info = _read_checked(zf, member, verify)
            except JpegError as e:
                skipped.append(_skip(zips, ref, member, f"corrupt_{part}", str(e)))
                break
            except (zipfile.BadZipFile, OSError) as e:
                skipped.append(_skip(zips, ref, member, "unreadable_member", str(e)))
                break
            members[image_ext(part)] = data
            image_stats[(part, info.mode, info.width, info.height)] += 1
        else:
            meta = {
                "fg": ref.fg,
                "bg": ref.bg,
                "flip": ref.flip,
                "placement": ref.n,
                "zip": os.path.basename(zips[ref.zip_index]),
            }
            members[META_EXT] = json.dumps(meta, sort_keys=True).encode()
            writer.add_sample(ref.key, members)
    tar_chunks, index_bytes = writer.finish()
    count = len(writer.samples)
    digest = hashlib.sha256()
    for chunk in tar_chunks:
        digest.update(chunk)
    if count:
        _write_file(out / f"{staged}{TAR_SUFFIX}", tar_chunks)
        _write_file(out / f"{staged}{INDEX_SUFFIX}", [index_bytes])
    return {
        "staged": staged,
        "samples": count,
        "bytes": sum(map(len, tar_chunks)),
        "sha256": digest.hexdigest(),
        "skipped": skipped,
        "image_stats": [[*k, v] for k, v in sorted(image_stats.items())],
    }


def _skip(zips, ref: SampleRef, member: str, reason: str, detail: str) -> dict:
    return {
        "zip": os.path.basename(zips[ref.zip_index]),
        "member": member,
        "reason": reason,
        "detail": detail,
    }


def _write_file(path: Path, chunks: list[bytes]) -> None:
    """Write a staged file whole (atomically, fsynced) or not at all."""
    try:
        with atomic_write(path) as f:
            f.writelines(chunks)
    except OSError as e:
        raise BuildError(f"{path}: write failed ({e.strerror})") from None


def _ignore_sigint() -> None:
    # The parent handles Ctrl-C and cleans up; workers just stop when the pool shuts down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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


def plan_shards(samples: list[SampleRef], per_shard: int) -> list[list[SampleRef]]:
    return [samples[i : i + per_shard] for i in range(0, len(samples), per_shard)]


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
    zips = tuple(sorted(cfg.zips, key=lambda p: (batch_number(os.path.basename(p)) or 0, p)))
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
    per_shard = cfg.samples_per_shard or max(
        1, cfg.shard_bytes // (sum(member_bytes) // len(samples) + _SAMPLE_OVERHEAD)
    )
    out = prepare_out(cfg)
    remote = storage.is_url(out)
    # Workers write each shard here; for s3:// it is a local directory the uploads drain.
    staging = tempfile.mkdtemp(prefix="maskdepth-build-") if remote else out
    try:
        jobs = plan_jobs(samples, test_idx, per_shard, cfg, zips, staging)
        publish = _Uploader(out, staging) if remote else None
        results = _run_jobs(jobs, cfg.workers, len(samples), progress, staging, publish)
        for result in results:
            skips.items.extend(result["skipped"])
        if cfg.strict and skips.items:
            _remove_tmp(staging)
            first = skips.items[0]
            raise BuildError(f"--strict: {first['zip']}: {first['member']}: {first['reason']}")
        return _finalise(cfg, out, jobs, results, skips, ignored, per_shard)
    finally:
        if remote:
            shutil.rmtree(staging, ignore_errors=True)


def plan_jobs(samples, test_idx, per_shard, cfg: ShardConfig, zips, staging: str) -> list[dict]:
    """One job per shard: its split, samples, and the temporary name a worker writes it to."""
    jobs = []
    for split in SPLITS:
        split_samples = [s for s in samples if (s.zip_index in test_idx) == (split == "test")]
        # DALI only shuffles within a buffer, so a global shuffle on disk is what mixes batches.
        random.Random(f"{cfg.seed}-{split}").shuffle(split_samples)
        for i, shard in enumerate(plan_shards(split_samples, per_shard)):
            jobs.append(
                {
                    "split": split,
                    "samples": shard,
                    "zips": zips,
                    "verify": cfg.verify,
                    "out": staging,
                    # Staged under the atomic writer's prefix, so any cleanup finds it; renamed
                    # to its final, contiguous name only once every shard is written.
                    "staged": f"{TMP_PREFIX}{shard_stem(split, i)}",
                }
            )
    return jobs


class _Uploader:
    """Uploads finished shards to an s3:// ``--out`` in job order, under their final names.

    Results arrive in job order, so a shard's final number (its split's count of non-empty
    shards before it) is known on arrival, as ``_finalise`` will name it.
    """

    def __init__(self, out: str, staging: str):
        self.out, self.staging = out, staging
        self.numbers: Counter = Counter()

    def __call__(self, job: dict, result: dict) -> None:
        if not result["samples"]:
            return
        name = shard_stem(job["split"], self.numbers[job["split"]])
        self.numbers[job["split"]] += 1
        for suffix in (INDEX_SUFFIX, TAR_SUFFIX):
            staged = os.path.join(self.staging, f"{result['staged']}{suffix}")
            try:
                storage.upload(staged, storage.join(self.out, f"{name}{suffix}"))
            except storage.StorageError as e:
                raise BuildError(str(e)) from None
            os.unlink(staged)  # keep the local disk to a few shards


def _run_jobs(jobs, workers, total, progress, out: str, publish=None) -> list[dict]:
    """Run every job, in worker processes when ``workers > 1``; ``publish`` sees each result
    in job order as it arrives."""
    bar = tqdm(
        total=total, unit="sample", desc="build", disable=None if progress else True, smoothing=0.1
    )
    results = []
    try:
        if workers > 1:
            with ProcessPoolExecutor(workers, initializer=_ignore_sigint) as pool:
                for job, result in zip(jobs, pool.map(write_shard, jobs)):
                    if publish:
                        publish(job, result)
                    results.append(result)
                    bar.update(result["samples"] + len(result["skipped"]))
        else:
            for job in jobs:
                result = write_shard(job)
                if publish:
                    publish(job, result)
                results.append(result)
                bar.update(result["samples"] + len(result["skipped"]))
    except BaseException:
        _remove_tmp(out)
        raise
    finally:
        bar.close()
        for key in [k for k in _open_zips if k[0] == os.getpid()]:
            _open_zips.pop(key).close()
    return results


def _remove_tmp(out: str) -> None:
    for p in Path(out).glob(f"{TMP_PREFIX}*"):
        p.unlink(missing_ok=True)


def _finalise(cfg, out: str, jobs, results, skips: Skips, ignored, per_shard) -> dict:
    """Rename finished shards to contiguous names, then write the manifest last.

    For an s3:// ``out`` the ``_Uploader`` has already stored them under those names.
    """
    splits: dict[str, dict] = {s: {"samples": 0, "shards": []} for s in SPLITS}
    stats: Counter = Counter()
    for job, result in zip(jobs, results):
        for part, mode, w, h, n in result["image_stats"]:
            stats[(part, mode, w, h)] += n
        if not result["samples"]:
            continue  # every sample of this shard was skipped
        split = splits[job["split"]]
        name = shard_stem(job["split"], len(split["shards"]))
        if not storage.is_url(out):
            for suffix in (INDEX_SUFFIX, TAR_SUFFIX):
                os.replace(
                    os.path.join(out, f"{result['staged']}{suffix}"),
                    os.path.join(out, f"{name}{suffix}"),
                )
        split["samples"] += result["samples"]
        split["shards"].append(
            {
                "file": f"{name}{TAR_SUFFIX}",
                "index": f"{name}{INDEX_SUFFIX}",
                "samples": result["samples"],
                "bytes": result["bytes"],
                "sha256": result["sha256"],
            }
        )
    images = _image_summary(stats)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "channels": 3 if images.get("fg_bg", {}).get("mode") == "RGB" else 1,
        "images": images,
        "splits": splits,
        "skipped": skips.summary(),
        "ignored": ignored,
        "config": {
            **asdict(cfg),
            "zips": [os.path.basename(z) for z in cfg.zips],  # no absolute paths: keeps builds
            "out": None,  # byte-identical wherever they are written
            "samples_per_shard": per_shard,
        },
        "sources": [os.path.basename(z) for z in cfg.zips],
    }
    try:
        write_manifest(out, manifest)
    except storage.StorageError as e:
        raise BuildError(str(e)) from None
    except OSError as e:
        raise BuildError(f"{storage.join(out, MANIFEST)}: write failed ({e.strerror})") from None
    return manifest


def _image_summary(stats: Counter) -> dict:
    """Mode and size of each part (the most common), with every variant counted."""
    summary = {}
    for part in PARTS:
        variants = {(m, w, h): n for (p, m, w, h), n in stats.items() if p == part}
        if not variants:
            continue
        mode, w, h = max(variants, key=lambda k: (variants[k], k))
        summary[part] = {
            "mode": mode,
            "size": [w, h],
            "variants": [
                {"mode": m, "size": [vw, vh], "count": n}
                for (m, vw, vh), n in sorted(variants.items())
            ],
        }
    return summary


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> ShardConfig:
    """Parse the command line into a ``ShardConfig``."""
    p = argparse.ArgumentParser(
        prog="python -m sharding.build",
        description="Repack batch zips into shuffled WebDataset shards with DALI indexes. "
        "The highest-numbered batch becomes the test split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("zips", nargs="+", help="batch zips, e.g. data/batch*_images.zip")
    p.add_argument(
        "--out",
        required=True,
        help="output directory, or s3://BUCKET/PREFIX, for shards and manifest.json",
    )
    p.add_argument(
        "--test-zips",
        nargs="*",
        help="zips (file names or batchN) for the test split; default: the highest batch",
    )
    p.add_argument("--seed", type=int, default=0, help="global shuffle seed")
    p.add_argument("--shard-mb", type=float, default=100, help="target shard size in MB")
    p.add_argument("--samples-per-shard", type=int, help="overrides --shard-mb")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument(
        "--verify",
        choices=("header", "decode"),
        default="header",
        help="header: check markers and parse the header; decode: decode every image fully",
    )
    p.add_argument("--strict", action="store_true", help="fail on any skipped sample")
    p.add_argument("--overwrite", action="store_true", help="replace a previous build in --out")
    a = p.parse_args(argv)
    if a.samples_per_shard is not None and a.samples_per_shard < 1:
        p.error("--samples-per-shard must be at least 1")
    if a.workers < 1:
        p.error(f"--workers must be at least 1, got {a.workers}")
    return ShardConfig(
        zips=tuple(a.zips),
        out=a.out,
        test_zips=tuple(a.test_zips) if a.test_zips is not None else None,
        seed=a.seed,
        shard_bytes=int(a.shard_mb * 1e6),
        samples_per_shard=a.samples_per_shard,
        workers=a.workers,
        verify=a.verify,
        strict=a.strict,
        overwrite=a.overwrite,
    )


def print_summary(manifest: dict, elapsed: float, out: str) -> None:
    splits = manifest["splits"]
    total = splits["train"]["samples"] + splits["test"]["samples"]
    skipped = manifest["skipped"]
    print(f"\nshards written to {out} in {elapsed:.1f} s ({total / elapsed:.0f} samples/s)")
    for name, split in splits.items():
        size = sum(s["bytes"] for s in split["shards"]) / 1e6
        print(
            f"  {name:5s} {split['samples']:>9,d} samples in {len(split['shards'])} shards, "
            f"{size:,.1f} MB"
        )
    for part, info in manifest["images"].items():
        print(f"  {part:6s} {info['mode']:3s} {info['size'][0]}x{info['size'][1]}")
    print(f"  skipped {skipped['count']} samples {skipped['by_reason'] or ''}")
    if manifest["ignored"]:
        print(f"  ignored members: {manifest['ignored']}")
    print(f"  manifest: {storage.join(out, MANIFEST)}")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)  # not "Found credentials in ..."
    cfg = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # clean up on kill as on Ctrl-C
    start = time.perf_counter()
    try:
        manifest = build(cfg)
    except (BuildError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no manifest was written; re-run the same command", file=sys.stderr)
        return 130
    except OSError as e:  # anything the specific checks did not foresee still gets one line
        print(f"error: {e.filename or cfg.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print_summary(manifest, time.perf_counter() - start, cfg.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
