"""Find the shards of a split, from a dataset directory or a WebDataset URL, and check them early.

A dataset directory may be an ``s3://bucket/prefix`` and a URL an ``s3://`` brace pattern;
their shards are made local through the node-local cache (``pipeline.cache``), and a storage
failure becomes a one-line ``LoaderError``. With ``prefetch`` a prefix's tars may still be
arriving when the source is returned (``DataSource.fetch``); such a tar is checked against its
index and the manifest's size now, and against the manifest's sha256 when it lands.
Every check here is cheap (file sizes, tar magic, the index's last offset), so a missing,
truncated or foreign file fails at ``build_loader`` with its path instead of deep inside a
DALI worker thread or a DataLoader worker. The manifest, index and member formats come from
``sharding.shard_format``, which the build writes with.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field, replace

from pipeline.config import LoaderError
from pipeline.samples import read_member, scan_tar
from sharding import storage
from sharding.shard_format import (
    IMAGE_EXTS,
    MANIFEST,
    PARTS,
    TAR_SUFFIX,
    IndexFormatError,
    ManifestError,
    ManifestMissing,
    image_ext,
    index_data_end,
    index_path_for,
    not_a_dataset,
    parse_index,
    read_manifest,
)

log = logging.getLogger(__name__)

_TAR_BLOCK = 512


@dataclass(frozen=True)
class Shard:
    """One tar file, its DALI index (None when absent) and its sample count; ``bytes`` and
    ``sha256`` as the manifest lists them (None for shards given by URL)."""

    path: str
    index: str | None
    samples: int
    bytes: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class DataSource:
    """The resolved shards of one split, with the stored image geometry."""

    shards: tuple[Shard, ...]
    channels: int  # of bg and fg_bg; mask and depth are always single-channel
    sizes: dict  # part -> (height, width) as stored
    origin: str  # what the user passed, for messages
    # pipeline.cache.ShardFetch of remote shards (tars perhaps still arriving), else None
    fetch: object | None = field(default=None, compare=False, repr=False)

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)


def resolve_source(
    source: str | os.PathLike,
    split: str,
    cache_dir: str | os.PathLike | None = None,
    cache_limit: int | None = None,
    prefetch: bool = False,
    progress: bool = True,
) -> DataSource:
    """Resolve a dataset directory or s3:// prefix (with manifest.json), or a brace URL of
    shards, into checked local shards; remote ones are fetched into the cache first.

    Args:
        prefetch: return once an s3:// prefix's indexes are local, its tars still arriving
            in the background (``DataSource.fetch``; readers wait for them); otherwise
            return once every tar is local.
        progress: show the download's progress bar.
    """
    text = os.fspath(source)
    fetch = None
    try:
        manifest = None
        if is_shard_pattern(text):
            shards, sizes = _listed_by_url(text), None
        elif storage.is_url(text) or os.path.isdir(text):
            manifest = _read_manifest(text)
            shards, sizes, channels = _listed_by_manifest(manifest, text, split)
        else:
            wrong = not_a_dataset(text)
            raise LoaderError(
                wrong or f"{text}: no such dataset directory (one with manifest.json) or shard file"
            )
        if storage.is_url(text):
            from pipeline.cache import local_shards

            origin = text if manifest is not None else text.rsplit("/", 1)[0]
            shards, fetch = local_shards(
                shards, origin, cache_dir, cache_limit, progress, manifest=manifest
            )
    except storage.StorageError as exc:
        raise LoaderError(str(exc)) from None
    try:
        if fetch is not None and not prefetch:
            fetch.wait_all()
        checked = [_checked(shard, number, fetch) for number, shard in enumerate(shards)]
        if sizes is None:
            channels, sizes = _probe_first_sample(checked[0].path)
    except BaseException:
        if fetch is not None:
            fetch.cancel()  # the source is refused: fetch no more of it
        raise
    return DataSource(tuple(checked), channels, sizes, text, fetch)


def _checked(shard: Shard, number: int, fetch) -> Shard:
    """The shard with its sample count, checked; a tar still arriving by its index alone."""
    if fetch is not None and not fetch.is_ready(number):
        if shard.index and shard.bytes is not None:
            # The fetch checks its size and sha256 against the manifest when it lands.
            samples = _count_by_index(shard.path, shard.index, shard.bytes)
        else:  # a shard listed by URL has no manifest entry to check it against: wait for it
            fetch.wait([number])
            samples = check_shard(shard.path, shard.index)
    else:
        samples = check_shard(shard.path, shard.index)
    if shard.samples >= 0 and samples != shard.samples:
        raise LoaderError(
            f"{shard.path}: holds {samples} samples but the manifest says {shard.samples}; "
            "the shard was replaced or the build was interrupted, rebuild it"
        )
    return replace(shard, samples=samples)


def is_shard_pattern(text: str) -> bool:
    """True for a shard file or brace pattern, False for a dataset directory or prefix."""
    return any(c in text for c in "{}") or text.rstrip("/").endswith(TAR_SUFFIX)


def _read_manifest(root: str) -> dict:
    try:
        return read_manifest(root)
    except ManifestMissing as exc:
        raise LoaderError(
            f"{exc}, or pass a shard URL such as 'DIR/train-{{000000..000009}}.tar'"
        ) from None
    except ManifestError as exc:
        raise LoaderError(str(exc)) from None


def _listed_by_manifest(manifest: dict, root: str, split: str) -> tuple[list[Shard], dict, int]:
    manifest_path = storage.join(root, MANIFEST)
    splits = manifest["splits"]
    if split not in splits:
        raise LoaderError(f"{manifest_path}: no split {split!r} (has {sorted(splits)})")
    shards = []
    for entry in splits[split]["shards"]:
        path = storage.join(root, entry["file"])
        index = storage.join(root, entry["index"]) if entry.get("index") else None
        if index and not storage.is_url(index) and not os.path.exists(index):
            raise LoaderError(f"{index}: DALI index listed in {manifest_path} is missing")
        shards.append(Shard(path, index, entry["samples"], entry["bytes"], entry["sha256"]))
    if not shards:
        raise LoaderError(f"{manifest_path}: split {split!r} has no shards")
    sizes = {
        part: (int(info["size"][1]), int(info["size"][0]))
        for part, info in manifest["images"].items()
        if part in PARTS
    }
    return shards, sizes, int(manifest["channels"])


def expand_url(url: str) -> list[str]:
    """Expand a WebDataset brace pattern of local paths or s3:// URLs, rejecting what DALI
    cannot read."""
    from braceexpand import UnbalancedBracesError, braceexpand

    if ("://" in url and not storage.is_url(url)) or url.startswith("pipe:"):
        raise LoaderError(
            f"{url}: only local shard paths and s3:// URLs are supported, not other URLs or pipes"
        )
    try:
        paths = list(braceexpand(url))
    except UnbalancedBracesError as exc:
        raise LoaderError(f"{url}: bad shard pattern ({exc})") from exc
    bad = [p for p in paths if "{" in p or "}" in p]
    if bad:
        raise LoaderError(
            f"{url}: bad shard pattern, {bad[0]!r} is left unexpanded; "
            "use e.g. 'DIR/train-{000000..000009}.tar'"
        )
    return paths


def _listed_by_url(url: str) -> list[Shard]:
    shards = []
    for path in expand_url(url):
        index = index_path_for(path)
        index = index if index and storage.exists(index) else None
        if not storage.exists(path):
            raise LoaderError(f"{path}: shard not found")
        shards.append(Shard(path, index, -1))  # counted once local
    return shards


def check_shard(path: str, index: str | None) -> int:
    """Return the local shard's sample count, or raise LoaderError naming what is wrong."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            # Every tar member header carries "ustar" at byte 257; garbage or another format
            # does not.
            head = f.read(_TAR_BLOCK)
    except FileNotFoundError:
        raise LoaderError(f"{path}: shard not found") from None
    except OSError as exc:
        raise LoaderError(f"{path}: cannot read shard ({exc.strerror})") from None
    if len(head) < _TAR_BLOCK or head[257:262] != b"ustar":
        raise LoaderError(f"{path}: not a tar archive (no ustar header); the shard is corrupt")
    if index is None:
        return len(scan_tar(path))
    return _count_by_index(path, index, size)


def _count_by_index(path: str, index: str, size: int) -> int:
    try:
        with open(index, encoding="utf-8") as f:
            samples = parse_index(f.read())
    except FileNotFoundError:
        raise LoaderError(f"{index}: DALI index is missing") from None
    except (OSError, UnicodeDecodeError, IndexFormatError) as exc:
        raise LoaderError(f"{index}: unreadable DALI index ({exc}); rebuild the shards") from exc
    end = index_data_end(samples)  # the data of every member must end inside the file
    if end > size:
        raise LoaderError(
            f"{path}: truncated ({size} bytes, its index {index} needs {end}); "
            "re-copy or rebuild the shard"
        )
    return len(samples)


def _probe_first_sample(path: str) -> tuple[int, dict]:
    """Channels and stored sizes, read from the first sample (URL sources have no manifest)."""
    from PIL import Image

    samples = scan_tar(path)
    members = samples[0][1] if samples else {}
    missing = [p for p in PARTS if image_ext(p) not in members]
    if missing:
        raise LoaderError(f"{path}: first sample lacks {missing}; not a maskdepth shard")
    found = {}
    for part in PARTS:
        data = read_member(path, *members[image_ext(part)])
        try:
            with Image.open(io.BytesIO(data)) as image:
                found[part] = (image.mode, (image.height, image.width))
        except (OSError, ValueError, SyntaxError) as exc:
            raise LoaderError(f"{path}: {samples[0][0]}.{image_ext(part)}: {exc}") from None
    channels = 1 if found["bg"][0] == "L" else 3
    return channels, {part: size for part, (_, size) in found.items()}


def find_undecodable_samples(table, indices) -> str | None:
    """'path: member: reason' for the first JPEG of these samples that PIL cannot decode, or
    None. Only called after a decode failure, to turn DALI's anonymous error into a named file.
    """
    from PIL import Image

    for n, streams in zip(indices.tolist(), zip(*table.encoded(indices))):
        for ext, data in zip(IMAGE_EXTS, streams):
            try:
                with Image.open(io.BytesIO(data.tobytes())) as image:
                    image.load()
            except (OSError, ValueError, SyntaxError) as exc:
                shard = table.paths[table.shard[n]]
                return f"{shard}: {table.keys[n]}.{ext}: cannot decode ({exc})"
    return None
