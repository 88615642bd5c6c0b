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
from concurrent.futures.process import BrokenProcessPool
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
    MEMBER_EXTS,
    META_EXT,
    PARTS,
    SHARD_FILE,
    SPLITS,
    TAR_SUFFIX,
    image_ext,
    image_summary,
    member_name,
    shard_stem,
    split_channels,
    write_manifest,
)
from sharding.signals import STOP_SIGNALS, StopSignals, quiet_when_stdout_closes
from sharding.tario import ShardWriter, ustar_header

log = logging.getLogger(__name__)

# What a build writes, and so what --overwrite or a re-run after a killed build may remove.
_OWN_FILE = re.compile(rf"{SHARD_FILE.pattern}|{re.escape(MANIFEST)}|{re.escape(TMP_PREFIX)}.*")
# Tar headers and the JSON member add about this much to each sample's JPEG bytes.
_SAMPLE_OVERHEAD = 5 * 1024 + 200
# A zip member larger than this is refused unread: a 160x160 JPEG is a few kB.
MAX_MEMBER_BYTES = 64 * 1024 * 1024
# What a directory given in place of zips stands for.
BATCH_ZIP_GLOB = "batch*_images.zip"


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
    image_size: int | None = None  # bg, fg_bg and mask side; None: the first accepted sample's
    depth_size: int | None = None  # depth side; None: the first accepted sample's


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
        if reason != "bad_name":  # a name that does not parse names no sample
            item["sample"] = member
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


def expand_zip_dirs(paths: tuple[str, ...]) -> tuple[str, ...]:
    """The zips given, with a directory standing for the ``batch*_images.zip`` files in it."""
    zips: list[str] = []
    for path in paths:
        if not os.path.isdir(path):
            zips.append(path)
            continue
        found = sorted(str(p) for p in Path(path).glob(BATCH_ZIP_GLOB))
        if not found:
            raise BuildError(
                f"{path}: a directory without {BATCH_ZIP_GLOB} files; give the batch zips, or "
                "the directory that holds them"
            )
        zips.extend(found)
    return tuple(zips)


def open_zip(path: str) -> zipfile.ZipFile:
    """Open a zip or raise a one-line ``BuildError`` naming the file."""
    if not os.path.exists(path):
        if re.fullmatch(r"batch_?\d+", path, re.IGNORECASE):  # `--test-zips batch1 batch2`
            raise BuildError(
                f"{path}: no such file; to name several test zips, join them with commas: "
                "--test-zips batch1,batch2"
            )
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
            listing = zf.infolist()
        infos = {i.filename: i for i in listing}
        _scanned[path] = infos
        layout = classify([i.filename for i in listing])
        if not layout.found_any_folder:
            raise BuildError(
                f"{path}: none of the expected folders (bg_jpg/, fg_bg_jpg/, mask_black_jpg/, "
                "depth_fg_bg_jpg/) found; is this a dataset batch zip?"
            )
        ignored.update(junk=layout.junk, extra=layout.extra, other=layout.other)
        for member, _part in layout.unparsed:
            skips.add(name, member, "bad_name")
        paired = list(_pair(zip_index, name, layout, skips, ignored))
        if paired:
            _check_key_fits(path, max((ref.key for ref in paired), key=len))
        member_bytes.extend(infos[m].file_size for ref in paired for m in ref.members)
        samples.extend(paired)
    _check_distinct(cfg.zips)  # after the loop: a missing or broken zip is the first error
    return samples, dict(sorted(ignored.items())), member_bytes


def _check_distinct(zips: tuple[str, ...]) -> None:
    """Refuse a zip given twice, or two zips whose samples would get the same keys."""
    seen: dict[str, str] = {}
    for path in zips:
        real = os.path.realpath(path)
        if real in seen:
            raise BuildError(f"{path}: given twice (as {seen[real]} too); list each zip once")
        seen[real] = path
    tags: dict[str, str] = {}
    for path in zips:
        tag = zip_tag(os.path.basename(path))
        if tag in tags:
            raise BuildError(
                f"{path} and {tags[tag]} would both name their samples {tag}-...; rename one "
                "(sample keys come from the batch number, or else the zip's name)"
            )
        tags[tag] = path


def _check_key_fits(path: str, key: str) -> None:
    """Every tar member name must fit USTAR's 100 bytes; the zip's name sets the key's prefix."""
    longest = max(MEMBER_EXTS, key=len)
    try:
        ustar_header(member_name(key, longest), 0)
    except ValueError as e:
        raise BuildError(
            f"{path}: sample keys such as {key!r} are too long for a tar shard ({e}); "
            "give the zip a shorter name, such as batch1_images.zip"
        ) from None


def _pair(zip_index: int, name: str, layout: ZipLayout, skips: Skips, ignored: Counter):
    tag = zip_tag(name)
    duplicated = {part_id for part_id in layout.duplicates}
    for sample_id in sorted(layout.fg_bg):
        f, b, flip, n = sample_id
        fg_bg = layout.fg_bg[sample_id]
        if ("fg_bg", sample_id) in duplicated:
            # Which of the same-named images is the sample? Neither is taken; each is counted.
            for member in layout.duplicates[("fg_bg", sample_id)]:
                skips.add(name, member, "duplicate", "more than one member names this sample")
            continue
        found = {
            "bg": layout.bg.get(b),
            "mask": layout.mask.get(sample_id),
            "depth": layout.depth.get(sample_id),
        }
        missing = [part for part, member in found.items() if member is None]
        if missing:
            skips.add(name, fg_bg, f"missing_{missing[0]}")
            continue
        clash = [
            part
            for part, ident in (("bg", b), ("mask", sample_id), ("depth", sample_id))
            if (part, ident) in duplicated
        ]
        if clash:
            others = layout.duplicates[(clash[0], b if clash[0] == "bg" else sample_id)]
            skips.add(name, fg_bg, "duplicate", f"{clash[0]} is ambiguous: {', '.join(others)}")
            continue
        key = f"{tag}-{f}_{b}_{flip}_{n}"
        yield SampleRef(
            zip_index, key, f, b, flip, n, (found["bg"], fg_bg, found["mask"], found["depth"])
        )
    ignored["orphan"] += len(set(layout.mask) - set(layout.fg_bg))
    ignored["orphan"] += len(set(layout.depth) - set(layout.fg_bg))


def choose_test_zips(cfg: ShardConfig) -> set[int]:
    """Indexes of the zips that form the test split: by default the highest-numbered batch.

    Both splits get at least one zip: train.py evaluates on the test split every epoch.
    """
    if len(cfg.zips) == 1:
        raise BuildError(
            f"only one zip given ({cfg.zips[0]}): the test split is made of whole zips, so give "
            "two or more (the highest batch is the test split, or name it with --test-zips)"
        )
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
        if len(chosen) == len(cfg.zips):
            raise BuildError(
                f"--test-zips {','.join(cfg.test_zips)}: names every input zip, which leaves "
                "no zip for the train split"
            )
        return chosen
    numbers = [batch_number(os.path.basename(p)) for p in cfg.zips]
    if None in numbers:
        raise BuildError(
            "cannot tell which zip is the test batch: name them batch{N}_images.zip or "
            "pass --test-zips"
        )
    return {numbers.index(max(numbers))}


def find_geometry(cfg: ShardConfig, samples: list[SampleRef]) -> dict[str, tuple[int, int]]:
    """(width, height) every image of each part must declare: ``--image-size``/``--depth-size``
    where given, else the first accepted sample's (in zip and name order).

    Every later image is checked against it from its frame header alone, so one 8000x8000
    fg_bg is skipped here instead of stopping a DALI batch mid-epoch.
    """
    given = {}
    if cfg.image_size is not None:
        given.update(dict.fromkeys(("bg", "fg_bg", "mask"), (cfg.image_size, cfg.image_size)))
    if cfg.depth_size is not None:
        given["depth"] = (cfg.depth_size, cfg.depth_size)
    if len(given) == len(PARTS):
        return given
    for ref in samples:
        zf = _zip(cfg.zips[ref.zip_index])
        sizes = {}
        try:
            for part, member in zip(PARTS, ref.members):
                _, info = _read_checked(zf, member, "header", given.get(part))
                sizes[part] = (info.width, info.height)
        except (JpegError, Rejected, zipfile.BadZipFile, OSError):
            continue  # not accepted: the workers skip it with its reason
        # Per part: the loaders resize each part from its stored size, which must be one size.
        return sizes
    if given:  # caught before --out is touched: a previous build there stays as it was
        wanted = ", ".join(f"{p} {w}x{h}" for p, (w, h) in given.items())
        raise BuildError(
            f"no sample in the zips has every image at the size given ({wanted}); "
            "check --image-size and --depth-size, or leave them out to use the zips' own"
        )
    return given


# --- writing shards (runs in worker processes) -----------------------------------------------


class ZipReader:
    """Reads one zip's members straight from a memory map, stored or deflated.

    ``ZipFile.read`` costs a file object, a seek and a header parse per member; slicing a map,
    inflating it with zlib and checking the CRC ourselves is several times faster. Only other
    compression methods (bzip2, lzma), which the dataset's zips never use, go through zipfile.
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
        """The member's bytes, CRC-checked; ``zipfile.BadZipFile`` says what is wrong."""
        info = self.infos[name]
        if info.flag_bits & 0x1:
            raise zipfile.BadZipFile(f"{name!r} is encrypted")
        if info.file_size > MAX_MEMBER_BYTES:  # no JPEG of this dataset comes near; a zip bomb
            raise zipfile.BadZipFile(
                f"{name!r} is {info.file_size:,} bytes, over the {MAX_MEMBER_BYTES:,} a JPEG "
                "of this dataset could need"
            )
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            try:
                return self.zipfile.read(name)
            except (NotImplementedError, RuntimeError, EOFError, ValueError, zlib.error) as e:
                raise zipfile.BadZipFile(f"cannot read {name!r} ({e})") from None
        offset = info.header_offset
        if self.map[offset : offset + 4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"bad local header for {name!r}")
        name_len, extra_len = struct.unpack_from("<HH", self.map, offset + 26)
        start = offset + 30 + name_len + extra_len
        data = self.map[start : start + info.compress_size]
        if len(data) != info.compress_size:
            raise zipfile.BadZipFile(f"{name!r} runs past the end of the zip")
        if info.compress_type == zipfile.ZIP_DEFLATED:
            # A raw deflate stream (wbits -15); never inflate past the declared size.
            inflater = zlib.decompressobj(-15)
            try:
                data = inflater.decompress(data, info.file_size + 1)
            except zlib.error as e:
                raise zipfile.BadZipFile(f"cannot inflate {name!r} ({e})") from None
            if len(data) != info.file_size or not inflater.eof:
                raise zipfile.BadZipFile(
                    f"{name!r} inflates to {len(data):,} bytes, not the {info.file_size:,} "
                    "its directory entry says"
                )
        if zlib.crc32(data) != info.CRC:
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


class Rejected(Exception):
    """A readable JPEG the dataset cannot use; ``reason`` is the skip reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _read_checked(zf: ZipReader, member: str, verify: str, expected: tuple[int, int] | None):
    """Read, CRC-check and header-check one JPEG; check its declared size before any decode."""
    data = zf.read(member)  # checks the CRC
    info = parse_header(data)
    if info.mode == "CMYK":
        # DALI's CPU decoder and PIL convert CMYK alike (within 1), but the GPU decoders and
        # Adobe's inverted CMYK are not tested here; no image of this dataset is CMYK.
        raise Rejected("cmyk", "4-component (CMYK) JPEG; save it as greyscale or RGB")
    if expected is not None and (info.width, info.height) != expected:
        # Checked from the frame header alone, so a decompression bomb is never decoded.
        raise Rejected(
            "size",
            f"declares {info.width}x{info.height}, the dataset's images are "
            f"{expected[0]}x{expected[1]}",
        )
    if verify == "decode":
        decode_check(data)
    return data, info


def _read_part(zf, ref, part, member, verify, geometry, bg_cache):
    """One part of a sample; one bg serves thousands of samples, so it is read once."""
    expected = geometry.get(part) if geometry else None
    if part != "bg":
        return _read_checked(zf, member, verify, expected)
    cache_key = (ref.zip_index, member)
    if cache_key not in bg_cache:
        try:
            bg_cache[cache_key] = _read_checked(zf, member, verify, expected)
        except (JpegError, Rejected, zipfile.BadZipFile, OSError) as e:
            bg_cache[cache_key] = e
    cached = bg_cache[cache_key]
    if isinstance(cached, Exception):
        raise cached
    return cached


def write_shard(job: dict) -> dict:
    """Stage one shard's tar and index under temporary names; return its record and skips."""
    zips, verify, out, staged = job["zips"], job["verify"], Path(job["out"]), job["staged"]
    geometry = job.get("geometry")
    writer = ShardWriter()
    skipped: list[dict] = []
    image_stats: Counter = Counter()
    bg_cache: dict[tuple[int, str], tuple[bytes, object] | Exception] = {}
    for ref in job["samples"]:
        zf = _zip(zips[ref.zip_index])
        members: dict[str, bytes] = {}
        infos = []
        for part, member in zip(PARTS, ref.members):
            try:
                data, info = _read_part(zf, ref, part, member, verify, geometry, bg_cache)
            except Rejected as e:
                skipped.append(_skip(zips, ref, member, e.reason, str(e)))
                break
            except JpegError as e:
                skipped.append(_skip(zips, ref, member, f"corrupt_{part}", str(e)))
                break
            except (zipfile.BadZipFile, OSError) as e:
                skipped.append(_skip(zips, ref, member, "unreadable_member", str(e)))
                break
            members[image_ext(part)] = data
            infos.append((part, info))
        else:
            meta = {
                "fg": ref.fg,
                "bg": ref.bg,
                "flip": ref.flip,
                "placement": ref.n,
                "zip": os.path.basename(zips[ref.zip_index]),
            }
            members[META_EXT] = json.dumps(meta, sort_keys=True).encode()
            try:
                writer.add_sample(ref.key, members)
            except ValueError as e:  # a name tar cannot hold; scan_zips should have caught it
                raise BuildError(f"{zips[ref.zip_index]}: {ref.members[1]}: {e}") from None
            # Counted only for samples that went in, so the manifest describes the shards.
            for part, info in infos:
                image_stats[(part, info.mode, info.width, info.height)] += 1
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
        "member": member,  # the image that failed
        "sample": ref.members[1],  # the sample's fg_bg, which names it
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


def _worker_init() -> None:
    # The parent handles Ctrl-C and SIGTERM, which `timeout` and a terminal send to the whole
    # group, and kills the workers itself. They were forked with both signals blocked (see
    # _start_pool), so none can reach the parent's Python handler in here first.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


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
        publish = _Uploader(out, staging) if remote else None
        results = _run_jobs(jobs, cfg.workers, len(samples), progress, staging, publish)
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
            _remove_tmp(staging)
            raise BuildError(problem)
        return _finalise(cfg, out, jobs, results, skips, ignored, per_shard, geometry)
    finally:
        if remote:
            shutil.rmtree(staging, ignore_errors=True)


def plan_jobs(
    samples, test_idx, per_shard, cfg: ShardConfig, zips, staging: str, geometry=None
) -> list[dict]:
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
                    "geometry": geometry,
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
    pool = None
    try:
        if workers > 1:
            pool, futures = _start_pool(workers, jobs)
            outcomes = (future.result() for future in futures)
        else:
            outcomes = (write_shard(job) for job in jobs)
        for job, result in zip(jobs, outcomes):
            if publish:
                publish(job, result)
            results.append(result)
            bar.update(result["samples"] + len(result["skipped"]))
    except BaseException:
        if pool is not None:
            _stop_pool(pool)  # before the cleanup: a live worker could still stage a shard
        _remove_tmp(out)
        raise
    else:
        if pool is not None:
            pool.shutdown()
    finally:
        bar.close()
        for key in [k for k in _open_zips if k[0] == os.getpid()]:
            _open_zips.pop(key).close()
    return results


def _start_pool(workers: int, jobs: list[dict]):
    """A process pool with every job submitted; the workers ignore SIGINT and SIGTERM."""
    pool = ProcessPoolExecutor(workers, initializer=_worker_init)
    # With fork, the first submit starts every worker; block the stop signals meanwhile so
    # that each worker starts with them blocked. One that arrives now reaches the parent
    # when the block lifts.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        futures = [pool.submit(write_shard, job) for job in jobs]
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    return pool, futures


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Kill the workers now: ``shutdown`` alone would wait for every queued shard."""
    # The pool keeps its processes in a private attribute; there is no public way to end
    # them, and waiting for the queue is what once made an interrupted build hang.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.join(timeout=5)


def _remove_tmp(out: str) -> None:
    for p in Path(out).glob(f"{TMP_PREFIX}*"):
        p.unlink(missing_ok=True)


def _finalise(cfg, out: str, jobs, results, skips: Skips, ignored, per_shard, geometry) -> dict:
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
    images = image_summary(stats)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "channels": split_channels(images),
        "images": images,
        "splits": splits,
        "skipped": skips.summary(),
        "ignored": ignored,
        "config": {
            **asdict(cfg),
            "zips": [os.path.basename(z) for z in cfg.zips],  # no absolute paths: keeps builds
            "out": None,  # byte-identical wherever they are written
            "samples_per_shard": per_shard,
            # What every image was checked against: given, or the first accepted sample's.
            "geometry": {part: list(size) for part, size in sorted(geometry.items())},
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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)  # not "Found credentials in ..."
    cfg = parse_args(argv)
    start = time.perf_counter()
    try:
        with StopSignals():  # kill cleans up as Ctrl-C does; a second one is ignored
            return _run(cfg, start)
    except KeyboardInterrupt:  # cleaned up on the way out (_run_jobs); nothing more to do
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
