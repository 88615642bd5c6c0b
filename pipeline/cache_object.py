"""One object of the node-local shard cache (``pipeline.cache``): fetched whole under its own
lock, checked against the manifest's size and sha256, and stamped.

A POSIX lock per object (``.<name>.lock``) lets one process of the node fetch it while the
others wait and then find it verified; forked DataLoader workers do not inherit it, and the
kernel drops the lock of a process that dies, so the next one that needs the object fetches
it. The stamp (``.<name>.ok``: size, mtime and sha256) lets later epochs and runs use
it without a request, and a file that no longer matches its stamp is hashed, and fetched
again with one line if it changed. Every error is one ``LoaderError`` line.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import LoaderError
from sharding import storage
from sharding.atomic import TMP_PREFIX, write_json

_HASH_CHUNK = 1 << 22
POLL_S = 0.02  # how often a waiter looks again: a lock the kernel called a deadlock, a stamp


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
_STATS_LOCK = threading.Lock()  # the background fetch adds to FETCHED from its threads


def _count(stats: FetchStats, objects: int = 0, size: int = 0, refetched: int = 0) -> None:
    with _STATS_LOCK:
        for counter in (stats, FETCHED):
            counter.objects += objects
            counter.bytes += size
            counter.refetched += refetched


def make_local(obj: Remote, path: Path, stats: FetchStats, progress) -> None:
    """Fetch ``obj`` into ``path`` unless it is there, verified; under the object's lock, so
    that a rank that finds another one fetching it waits and then finds it here."""
    with _thread_lock(path):  # a POSIX lock is the process's: one thread of it at a time
        try:
            lock = open(path.with_name(f".{path.name}.lock"), "a")  # noqa: SIM115 (with below)
        except OSError as exc:
            raise LoaderError(
                f"{path.parent}: cannot lock the shard cache ({exc.strerror})"
            ) from None
        with lock:
            # A POSIX (fcntl) lock, not flock: a forked DataLoader worker does not inherit it
            # (an inherited flock would be held until that worker exits), and the kernel drops
            # it when this process dies, so the next process that needs the object fetches it.
            _lock_exclusive(lock, path)
            if _verified(obj, path, stats):
                progress(obj.bytes or 0)  # fetched by another rank meanwhile, or already here
                return
            _remove_leftovers(path)
            size = _fetch(obj, path, progress)
            _count(stats, objects=1, size=size)


def _lock_exclusive(lock, path: Path) -> None:
    """Wait for the POSIX lock of ``lock``'s file. The kernel treats a process's threads as
    one owner, so two ranks whose threads each hold one object and wait on the other's look
    deadlocked to it (EDEADLK) while neither is: wait a moment and ask again."""
    while True:
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX)
            return
        except OSError as exc:
            if exc.errno != errno.EDEADLK:
                raise LoaderError(
                    f"{path.parent}: cannot lock the shard cache ({exc.strerror})"
                ) from None
        time.sleep(POLL_S)


_THREAD_LOCKS: tuple[int, threading.Lock, dict] = (-1, threading.Lock(), {})


def _thread_lock(path: Path) -> threading.Lock:
    """This process's lock of one cached object (made afresh in a forked child, where a copy
    could have been taken while held)."""
    global _THREAD_LOCKS
    if _THREAD_LOCKS[0] != os.getpid():
        _THREAD_LOCKS = (os.getpid(), threading.Lock(), {})
    _, guard, locks = _THREAD_LOCKS
    with guard:
        return locks.setdefault(str(path), threading.Lock())


def _remove_leftovers(path: Path) -> None:
    """Delete what a killed fetch of ``path`` left (``.tmp-<pid>-<name>``): only the holder
    of the object's lock writes it, and that is now this thread."""
    suffix = f"-{path.name}"
    try:
        with os.scandir(path.parent) as entries:
            for entry in entries:
                name = entry.name
                ours = name.startswith(TMP_PREFIX) and name.endswith(suffix)
                if ours and name[len(TMP_PREFIX) : -len(suffix)].isdigit():
                    Path(entry.path).unlink(missing_ok=True)
    except OSError:
        pass  # a leftover costs disk space only; the fetch itself reports a real problem


def _stamp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.ok")


def stamped(path: Path) -> bool:
    """True when ``path`` is as it was when last verified (its stamp's size and mtime)."""
    try:
        st = path.stat()
        stamp = json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("size") == st.st_size and stamp.get("mtime_ns") == st.st_mtime_ns


def _verified(obj: Remote, path: Path, stats: FetchStats) -> bool:
    """True when ``path`` holds ``obj`` as last verified; a changed file is re-hashed."""
    if stamped(path):
        return True
    if not path.exists():
        return False
    if (obj.bytes is None or path.stat().st_size == obj.bytes) and (
        obj.sha256 is None or _sha256(path) == obj.sha256
    ):
        _write_stamp(path, obj)
        return True
    from tqdm import tqdm

    # tqdm.write: on a line of its own, above the download's bar if one is drawn
    tqdm.write(f"cache: {path} changed since it was verified; fetching it again", sys.stderr)
    _count(stats, refetched=1)
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
