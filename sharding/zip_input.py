"""The build's input: finding the batch zips, pairing each sample's four members, and
reading members fast.

``scan_zips`` lists every zip once and pairs each fg_bg with its bg, mask and depth into a
``SampleRef``; ``choose_test_zips`` picks the zips of the test split; ``zip_reader`` gives each
process one ``ZipReader`` per zip, which reads members straight from a memory map. The zips
are read in place, never extracted.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sharding.build_config import BuildError, ShardConfig
from sharding.layout import ZipLayout, batch_number, classify, zip_tag
from sharding.shard_format import MEMBER_EXTS, member_name
from sharding.tario import ustar_header

# A zip member larger than this is refused unread: a 160x160 JPEG is a few kB.
MAX_MEMBER_BYTES = 64 * 1024 * 1024
# What a directory given in place of zips stands for.
BATCH_ZIP_GLOB = "batch*_images.zip"


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
        """Record one sample (or, for ``bad_name``, one member) left out, and why."""
        item = {"zip": zip_name, "member": member, "reason": reason}
        if reason != "bad_name":  # a name that does not parse names no sample
            item["sample"] = member
        if detail:
            item["detail"] = detail
        self.items.append(item)

    def summary(self) -> dict:
        """The manifest's ``skipped`` entry: the count, the count per reason, every item."""
        return {
            "count": len(self.items),
            "by_reason": dict(sorted(Counter(i["reason"] for i in self.items).items())),
            "samples": self.items,
        }


# --- finding and pairing the members --------------------------------------------------------


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


# --- reading members ------------------------------------------------------------------------


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


def zip_reader(path: str) -> ZipReader:
    """This process's reader for the zip at ``path``, opened on first use."""
    # One reader per zip per process: reopening per shard would re-read the directory. Keyed
    # by pid because a forked worker inherits the parent's handles, and two processes seeking
    # one shared file descriptor read each other's bytes (seen as "Bad CRC-32").
    key = (os.getpid(), path)
    if key not in _open_zips:
        _open_zips[key] = ZipReader(path, _scanned.get(path))
    return _open_zips[key]


def close_readers() -> None:
    """Close this process's readers; a forked worker's inherited ones are left to it."""
    for key in [k for k in _open_zips if k[0] == os.getpid()]:
        _open_zips.pop(key).close()
