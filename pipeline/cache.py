"""The node-local shard cache: remote shards fetched whole, once per node, verified, read locally.

Both loaders read samples by offset from memory-mapped tars (``pipeline.samples``), so a
split on ``s3://`` is made local first: every tar and ``.idx`` of the split is downloaded whole
(in parallel, large objects in parallel ranged parts), written atomically, and checked against
the manifest's size and sha256. A fetch is one GET per object (or per part of a large one),
never one per tar member, and the torch backend's workers read the same local files.

Where: ``--cache-dir``, else ``$MASKDEPTH_CACHE``, else ``~/.cache/maskdepth``; inside it one
folder per source URL (a hash of it, with the URL written in ``SOURCE``). The ranks of a node
share it: a file lock makes one of them fetch while the others wait, and then they all find
every file verified. A verified file gets a stamp (``.<name>.ok``: size, mtime and sha256), so
later epochs and later runs send no request for it; a file whose size or mtime no longer match
its stamp is hashed again, and fetched again (with one line saying so) if it changed.

``cache_limit``: the split must fit, or the loader refuses in one line naming both sizes.
Clean-up is deleting the folder; nothing else points into it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.config import LoaderError
from sharding import storage
from sharding.atomic import write_json
from sharding.shard_format import MANIFEST

log = logging.getLogger(__name__)

ENV = "MASKDEPTH_CACHE"
CACHE_DIR_HELP = f"node-local cache of s3:// shards (default: ${ENV} or ~/.cache/maskdepth)"
FETCH_THREADS = 4
_HASH_CHUNK = 1 << 22


def default_cache_dir() -> Path:
    """``$MASKDEPTH_CACHE``, else ``~/.cache/maskdepth``."""
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "maskdepth")


def cache_folder(cache_dir: str | os.PathLike | None, origin: str) -> Path:
    """The folder that caches one source URL."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    digest = hashlib.sha256(origin.rstrip("/").encode()).hexdigest()[:16]
    return root / digest


@dataclass(frozen=True)
class Remote:
    """One object to make local, with what the manifest says of it (None: not known)."""

    url: str
    bytes: int | None = None
    sha256: str | None = None


@dataclass
class FetchStats:
    """What was fetched over the network, for the benchmark and the tests."""

    objects: int = 0
    bytes: int = 0
    refetched: int = 0


FETCHED = FetchStats()  # everything this process has fetched into any cache


def localize(
    objects: list[Remote],
    origin: str,
    cache_dir: str | os.PathLike | None = None,
    cache_limit: int | None = None,
    progress: bool = True,
) -> tuple[dict[str, str], FetchStats]:
    """{url: local path} for every object, fetching what the cache lacks; and what it sent."""
    folder = cache_folder(cache_dir, origin)
    needed = sum(o.bytes or 0 for o in objects)  # the tars; an index is a small fraction
    if cache_limit is not None and needed > cache_limit:
        raise LoaderError(
            f"{origin}: the split needs {needed:,} bytes of cache but --cache-limit is "
            f"{cache_limit:,}; raise the limit or free space in {folder.parent}"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "SOURCE").write_text(origin + "\n")
    except OSError as exc:
        raise LoaderError(f"{folder}: cannot create the shard cache ({exc.strerror})") from None
    local = {o.url: str(folder / os.path.basename(o.url)) for o in objects}
    stats = FetchStats()
    with _locked(folder):  # one rank of the node fetches; the others then find it all here
        missing = [o for o in objects if not _verified(o, Path(local[o.url]), stats)]
        if missing:
            _fetch_all(missing, local, stats, progress)
    return local, stats


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _stamp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.ok")


def _verified(obj: Remote, path: Path, stats: FetchStats) -> bool:
    """True when ``path`` holds ``obj`` as last verified; a changed file is re-hashed."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    try:
        stamp = json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
        stamp = {}
    if stamp.get("size") == st.st_size and stamp.get("mtime_ns") == st.st_mtime_ns:
        return True
    if (obj.bytes is None or st.st_size == obj.bytes) and (
        obj.sha256 is None or _sha256(path) == obj.sha256
    ):
        _write_stamp(path, obj)
        return True
    print(f"cache: {path} changed since it was verified; fetching it again", file=sys.stderr)
    stats.refetched += 1
    FETCHED.refetched += 1
    return False


def _write_stamp(path: Path, obj: Remote) -> None:
    st = path.stat()
    write_json(
        _stamp_path(path),
        {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": obj.sha256, "url": obj.url},
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_all(objects: list[Remote], local: dict, stats: FetchStats, progress: bool) -> None:
    from tqdm import tqdm

    total = sum(o.bytes or 0 for o in objects) or None
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"fetching {len(objects)} files to the cache",
        disable=not progress,
        file=sys.stderr,
    )
    with bar, ThreadPoolExecutor(FETCH_THREADS) as pool:
        for size in pool.map(lambda o: _fetch(o, Path(local[o.url]), bar.update), objects):
            for counter in (stats, FETCHED):
                counter.objects += 1
                counter.bytes += size


def _fetch(obj: Remote, path: Path, progress) -> int:
    try:
        storage.download(obj.url, path, progress=progress)
    except storage.StorageError as exc:
        raise LoaderError(str(exc)) from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise LoaderError(
                f"{path.parent}: the disk is full while caching {obj.url}; free space or "
                "point --cache-dir elsewhere"
            ) from None
        raise LoaderError(f"{path}: cannot write to the shard cache ({exc.strerror})") from None
    size = path.stat().st_size
    if obj.bytes is not None and size != obj.bytes:
        path.unlink(missing_ok=True)
        raise LoaderError(f"{obj.url}: fetched {size} bytes, the manifest says {obj.bytes}")
    if obj.sha256 is not None and _sha256(path) != obj.sha256:
        path.unlink(missing_ok=True)
        raise LoaderError(
            f"{obj.url}: its sha256 does not match the manifest's; the object was replaced "
            "after the build, rebuild the shards"
        )
    _write_stamp(path, obj)
    return size


def local_shards(
    shards, origin: str, cache_dir=None, cache_limit=None, progress=True, manifest=None
):
    """The same shards (``pipeline.source.Shard``) with local paths, fetched into the cache;
    ``manifest`` (the dict read from ``origin``) is kept beside them, so that the cache folder
    is a dataset directory of its own."""
    objects = []
    for s in shards:
        objects.append(Remote(s.path, s.bytes, s.sha256))
        if s.index:
            objects.append(Remote(s.index))
    local, stats = localize(objects, origin, cache_dir, cache_limit, progress)
    if manifest is not None:
        write_json(cache_folder(cache_dir, origin) / MANIFEST, manifest)
    out = [
        replace(s, path=local[s.path], index=local[s.index] if s.index else None) for s in shards
    ]
    return out, stats
