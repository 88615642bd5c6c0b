"""Random access to a split's samples: where each JPEG lies in its tar, read by memory map.

Both backends read through a ``SampleTable``: sample i of a split (numbered in the manifest's
shard order, the numbers ``pipeline.order`` permutes) is four byte ranges in one local tar,
found from the shard's DALI index (``.idx``, the data offset and size of every member) or, for
a shard without one, by one scan of its tar headers. Reading a sample is then four slices of a
memory-mapped file: no per-member request and no tar walk per epoch, and any order costs the
same. Remote shards arrive in the node-local cache in the background (``pipeline.cache``):
every read waits first until the tars it touches are local and verified (``wait_for``), and a
tar is memory-mapped only then, never while it is still being written.
"""

from __future__ import annotations

import mmap
import os
import tarfile
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import LoaderError
from sharding.shard_format import (
    IMAGE_EXTS,
    PARTS,
    IndexFormatError,
    parse_index,
    split_member,
)


@dataclass(frozen=True)
class SampleTable:
    """Where every sample of one split lies: its tar, and the data offset and size of each
    of its four JPEGs (columns in ``PARTS`` order)."""

    paths: tuple[str, ...]  # local tar files, in the manifest's order
    shard: np.ndarray  # (N,) index into paths
    offsets: np.ndarray  # (N, 4) int64
    sizes: np.ndarray  # (N, 4) int64
    keys: tuple[str, ...]
    # pipeline.cache.ShardFetch while remote tars are still arriving, else None
    fetch: object | None = field(default=None, compare=False, repr=False)
    _maps: dict = field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    def keys_of(self, indices: np.ndarray) -> list[str]:
        """The sample keys of these sample numbers."""
        return [self.keys[i] for i in indices.tolist()]

    def where(self, index: int) -> str:
        """'path: key' of one sample, for messages."""
        return f"{self.paths[self.shard[index]]}: sample {self.keys[index]}"

    def shards_of(self, indices: np.ndarray) -> list[int]:
        """The tars (numbers into ``paths``) these samples lie in, in order of first use."""
        shards = self.shard[indices]
        _, first = np.unique(shards, return_index=True)
        return shards[np.sort(first)].tolist()

    def wait_for(self, indices: np.ndarray) -> None:
        """Block until every tar these samples lie in is local and verified (remote shards
        arrive in the background); raises the fetch's LoaderError if it failed."""
        if self.fetch is not None and not self.fetch.complete:
            self.fetch.wait(self.shards_of(indices))

    def encoded(self, indices: np.ndarray) -> list[list[np.ndarray]]:
        """The JPEG bytes of these samples, per part (in ``PARTS`` order): uint8 views of the
        memory-mapped tars, valid while this table lives."""
        self.wait_for(indices)
        shard, offsets, sizes = self.shard[indices], self.offsets[indices], self.sizes[indices]
        maps = [self._bytes(s) for s in shard.tolist()]
        return [
            [m[o : o + n] for m, o, n in zip(maps, offsets[:, p].tolist(), sizes[:, p].tolist())]
            for p in range(len(PARTS))
        ]

    def padded(self, indices: np.ndarray) -> list[np.ndarray]:
        """The JPEG bytes of these samples, per part, as one (B, L) uint8 array each: row i
        holds sample i's JPEG followed by zeros up to the longest one in the batch.

        What DALI's feed sends: one dense array per part is one copy into DALI's buffer, where a
        list of B arrays costs DALI ~6 us of Python per array (~12 ms per batch of 512). A JPEG
        decoder stops at the image's end marker, so the zeros after it are never read.
        """
        self.wait_for(indices)
        shard, offsets, sizes = self.shard[indices], self.offsets[indices], self.sizes[indices]
        maps = [self._bytes(s) for s in shard.tolist()]
        out = []
        for p in range(len(PARTS)):
            lengths = sizes[:, p].tolist()
            rows = np.zeros((len(indices), max(lengths, default=0)), dtype=np.uint8)
            for row, data, start, length in zip(rows, maps, offsets[:, p].tolist(), lengths):
                row[:length] = data[start : start + length]
            out.append(rows)
        return out

    def _bytes(self, shard: int) -> np.ndarray:
        """A tar's bytes, memory-mapped: one map per tar and process (a forked DataLoader
        worker inherits its parent's maps, read-only, and opens the rest itself). Only called
        after ``wait_for``: a tar still being fetched is never mapped."""
        key = (os.getpid(), shard)
        if key not in self._maps:
            with open(self.paths[shard], "rb") as f:
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[key] = np.frombuffer(data, dtype=np.uint8)
        return self._maps[key]


def build_table(shards, fetch=None) -> SampleTable:
    """A table over local shards (``pipeline.source.Shard``), from their indexes or tars;
    ``fetch`` (a ``pipeline.cache.ShardFetch``) when tars are still arriving: a shard whose
    index does not name its members is then waited for, to scan its tar."""
    paths, shard_of, offsets, sizes, keys = [], [], [], [], []
    for number, shard in enumerate(shards):
        samples = _from_index(shard) if shard.index else None
        if samples is None:
            if fetch is not None:
                fetch.wait([number])
            samples = scan_tar(shard.path)
        paths.append(shard.path)
        for key, members in samples:
            missing = [ext for ext in IMAGE_EXTS if ext not in members]
            if missing:
                raise LoaderError(f"{shard.path}: sample {key} lacks {missing}")
            shard_of.append(number)
            keys.append(key)
            offsets.append([members[ext][0] for ext in IMAGE_EXTS])
            sizes.append([members[ext][1] for ext in IMAGE_EXTS])
    return SampleTable(
        paths=tuple(paths),
        shard=np.asarray(shard_of, dtype=np.int64),
        offsets=np.asarray(offsets, dtype=np.int64).reshape(-1, len(PARTS)),
        sizes=np.asarray(sizes, dtype=np.int64).reshape(-1, len(PARTS)),
        keys=tuple(keys),
        fetch=fetch,
    )


def read_member(path: str, offset: int, size: int) -> bytes:
    """``size`` bytes of a local file from ``offset``: one member's data."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _from_index(shard) -> list[tuple[str, dict]] | None:
    """The samples as the shard's index lists them; None when it names no members."""
    try:
        with open(shard.index, encoding="utf-8") as f:
            entries = parse_index(f.read())
    except (OSError, UnicodeDecodeError, IndexFormatError) as exc:
        raise LoaderError(
            f"{shard.index}: unreadable DALI index ({exc}); rebuild the shards"
        ) from None
    if any(name is None for components in entries for *_, name in components):
        return None  # a v1.1 index names no members: the keys are in the tar
    samples = []
    for components in entries:
        key = split_member(components[0][3])[0]
        samples.append((key, {ext: (offset, size) for ext, offset, size, _ in components}))
    return samples


def scan_tar(path: str) -> list[tuple[str, dict]]:
    """(key, {ext: (data offset, size)}) per sample, in tar order, from the tar's headers: the
    one tar reader of the pipeline (a shard without an index, a URL source's first sample,
    the benchmarks' loose files)."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                if member.isfile():
                    key, ext = split_member(os.path.basename(member.name))
                    samples.setdefault(key, {})[ext] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise LoaderError(f"{path}: corrupt or truncated tar ({exc})") from exc
    return list(samples.items())
