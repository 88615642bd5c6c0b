"""The node-local shard cache: remote shards fetched whole, once per node, verified, read locally.

Both loaders read samples by offset from memory-mapped tars (``pipeline.samples``), so a
split on ``s3://`` is made local: every tar and ``.idx`` of the split is downloaded whole
(in parallel, large objects in parallel ranged parts), written atomically, and checked against
the manifest's size and sha256. A fetch is one GET per object (or per part of a large one),
never one per tar member, and the torch backend's workers read the same local files.

Training starts before the split is local. The manifest and the ``.idx`` files come first
(they are small, and the sample table is built from them); the tars then arrive in the
background (``ShardFetch``, ``FETCH_THREADS`` at a time per process, with a progress bar), in
the order in which this rank's batches first need them, while training runs. Before a batch's
samples are read, the reader waits until every tar the batch touches is local and verified,
and a tar is memory-mapped only then. An error of the background fetch (a full disk, a
damaged object, the network) is raised at the next such wait, as the same one line.

The trade-off: with one global permutation per epoch, the first batch of a large split
touches nearly as many shards as it has samples, so the time to the first step falls only by
the share of the split's shards the first batch (and, for DALI, the ``prefetch - 1`` batches it
reads ahead) does not touch. An order that shuffles within a window of shards (mosaicml's
``py1e``) would start sooner, at the cost of a less random order; it is not built.

Where: ``--cache-dir``, else ``$MASKDEPTH_CACHE``, else ``~/.cache/maskdepth``; inside it one
folder per source URL (a hash of it, with the URL written in ``SOURCE``). The ranks of a node
share it: each object is fetched under its own lock and stamped once verified
(``pipeline.cache_object``), so no object is fetched twice, later epochs and runs send no
request for it, and one that changed is fetched again. The manifest is copied in once every
tar of the split is, so the folder is then a dataset directory of its own.

``cache_limit``: the split must fit, or the loader refuses in one line naming both sizes.
Clean-up is deleting the folder; nothing else points into it.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from pipeline.cache_object import (
    POLL_S,
    FetchStats,
    Remote,
    make_local,
    stamped,
)
from pipeline.config import LoaderError
from sharding.atomic import write_json
from sharding.shard_format import MANIFEST

log = logging.getLogger(__name__)

ENV = "MASKDEPTH_CACHE"
CACHE_DIR_HELP = f"node-local cache of s3:// shards (default: ${ENV} or ~/.cache/maskdepth)"
FETCH_THREADS = 4


def default_cache_dir() -> Path:
    """``$MASKDEPTH_CACHE``, else ``~/.cache/maskdepth``."""
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "maskdepth")


def cache_folder(cache_dir: str | os.PathLike | None, origin: str) -> Path:
    """The folder that caches one source URL."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    digest = hashlib.sha256(origin.rstrip("/").encode()).hexdigest()[:16]
    return root / digest


def open_folder(
    origin: str, cache_dir: str | os.PathLike | None, needed: int, cache_limit: int | None
) -> Path:
    """The cache folder of ``origin``, created, once ``needed`` bytes fit in ``cache_limit``."""
    folder = cache_folder(cache_dir, origin)
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
    return folder


def localize(
    objects: list[Remote], folder: Path, progress: bool = True
) -> tuple[dict[str, str], FetchStats]:
    """{url: local path} for every object, fetching now, in parallel, what the cache lacks."""
    local = {o.url: folder / os.path.basename(o.url) for o in objects}
    stats = FetchStats()
    missing = [o for o in objects if not stamped(local[o.url])]
    if missing:
        from tqdm import tqdm

        bar = tqdm(
            total=sum(o.bytes or 0 for o in missing) or None,
            unit="B",
            unit_scale=True,
            desc=f"fetching {len(missing)} files to the cache",
            disable=not progress,
            file=sys.stderr,
        )
        with bar, ThreadPoolExecutor(FETCH_THREADS) as pool:
            list(pool.map(lambda o: make_local(o, local[o.url], stats, bar.update), missing))
    return {url: str(path) for url, path in local.items()}, stats


def local_shards(
    shards, origin: str, cache_dir=None, cache_limit=None, progress=True, manifest=None
):
    """The same shards (``pipeline.source.Shard``) with local paths, and the ``ShardFetch``
    that brings their tars into the cache in the background; the ``.idx`` files are local on
    return. ``manifest`` (the dict read from ``origin``) is copied beside the tars once they
    are all there, so that the cache folder is then a dataset directory of its own."""
    folder = open_folder(origin, cache_dir, sum(s.bytes or 0 for s in shards), cache_limit)
    indexes, _ = localize([Remote(s.index) for s in shards if s.index], folder, progress)
    out = [replace(s, path=str(folder / os.path.basename(s.path))) for s in shards]
    out = [replace(s, index=indexes[s.index]) if s.index else s for s in out]

    def copy_manifest() -> None:
        if manifest is not None:
            write_json(folder / MANIFEST, manifest)

    tars = [Remote(s.path, s.bytes, s.sha256) for s in shards]
    fetch = ShardFetch(tars, [Path(s.path) for s in out], progress, when_done=copy_manifest)
    return out, fetch


class ShardFetch:
    """The tars of one split, arriving in the cache in the background, most needed first.

    ``wait(numbers)`` blocks until those tars (numbered in the manifest's order) are local and
    verified, or raises the fetch's error. In the process that made it, it waits on the
    fetching threads; in another one (a DataLoader worker) it looks for each tar's stamp on
    disk, and gives up when the fetch has failed.
    """

    def __init__(
        self,
        tars: list[Remote],
        paths: list[Path],
        progress: bool = True,
        when_done: Callable[[], None] | None = None,
    ):
        self.tars, self.paths = tars, [str(p) for p in paths]
        self.error: LoaderError | None = None
        self.stats = FetchStats()
        self._owner = os.getpid()
        # Seen by forked DataLoader workers, which cannot see this process's threads.
        self._failed = multiprocessing.RawValue("b", 0)
        self._ready = {n for n, p in enumerate(paths) if stamped(p)}
        self._pending = [n for n in range(len(tars)) if n not in self._ready]
        self._cancelled = False
        self._busy = 0
        self._when_done = when_done
        self._bar = None
        if not self._pending:
            self._finish()
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=sum(tars[n].bytes or 0 for n in self._pending) or None,
            unit="B",
            unit_scale=True,
            desc=f"fetching {len(self._pending)} shards to the cache",
            disable=not progress,
            file=sys.stderr,
        )
        _scheduler().add(self)

    def __getstate__(self) -> dict:
        # A worker started by spawn or forkserver gets what the disk wait needs, no threads.
        return {
            "paths": self.paths,
            "_owner": self._owner,
            "_failed": self._failed,
            "_ready": set(self._ready),
            "error": None,
        }

    @property
    def complete(self) -> bool:
        """True once every tar is local and verified."""
        return len(self._ready) == len(self.paths)

    def is_ready(self, number: int) -> bool:
        """True when tar ``number`` is local and verified (in this process's view)."""
        return number in self._ready

    def prioritise(self, numbers: Iterable[int], first: bool = True) -> None:
        """Fetch these tars next, in this order, the rest after them; ``first``: before the
        tars of every other fetch of this process (the epoch being read goes first)."""
        sched = _scheduler()
        with sched.cond:
            pending = set(self._pending)
            wanted = list(dict.fromkeys(n for n in numbers if n in pending))
            chosen = set(wanted)
            self._pending = wanted + [n for n in self._pending if n not in chosen]
            if first and self in sched.fetches:
                sched.fetches.remove(self)
                sched.fetches.insert(0, self)

    def wait(self, numbers: Iterable[int]) -> None:
        """Block until tars ``numbers`` are local and verified; raise the fetch's error."""
        if self.complete:
            return
        numbers = list(numbers)
        if os.getpid() != self._owner:
            self._wait_on_disk(numbers)
            return
        sched = _scheduler()
        with sched.cond:
            while True:
                if self.error is not None:
                    raise LoaderError(str(self.error)) from None
                if all(n in self._ready for n in numbers):
                    return
                if self._cancelled:
                    raise LoaderError(f"{self.paths[0]}: the shard fetch was cancelled")
                sched.cond.wait()

    def wait_all(self) -> None:
        """Block until every tar is local and verified."""
        self.wait(range(len(self.paths)))

    def cancel(self) -> None:
        """Fetch no more: drop what is pending and abort the downloads in flight."""
        sched = _scheduler()
        with sched.cond:
            self._cancelled = True
            self._pending.clear()
            sched.cond.notify_all()
            if self._busy == 0:
                self._close_bar()

    def close(self) -> None:
        """Cancel, and return once no download of this fetch is in flight."""
        self.cancel()
        sched = _scheduler()
        with sched.cond:
            while self._busy:
                sched.cond.wait()

    def _wait_on_disk(self, numbers: list[int]) -> None:
        for n in numbers:
            while n not in self._ready:
                if stamped(Path(self.paths[n])):
                    self._ready.add(n)  # this process's copy
                elif self._failed.value:
                    # The process that fetches raises the fetch's own error at its next wait.
                    raise LoaderError(f"{self.paths[n]}: the background fetch of the cache failed")
                else:
                    time.sleep(POLL_S)

    # --- the fetching threads' side, under the scheduler's lock where it says so

    def _take(self) -> int | None:
        """The next tar to fetch (under the lock), or None."""
        if self._cancelled or self.error is not None or not self._pending:
            return None
        self._busy += 1
        return self._pending.pop(0)

    def _run(self, number: int) -> None:
        """Make tar ``number`` local (outside the lock), then record the outcome."""
        error = None
        try:
            make_local(self.tars[number], Path(self.paths[number]), self.stats, self._progress)
        except LoaderError as exc:
            error = exc
        except _Cancelled:
            pass
        except Exception as exc:  # anything else must reach the waiting reader, not end a thread
            error = LoaderError(f"{self.tars[number].url}: cannot fetch into the cache ({exc})")
        sched = _scheduler()
        with sched.cond:
            self._busy -= 1
            if error is not None and self.error is None and not self._cancelled:
                self.error = error
                self._failed.value = 1
                self._pending.clear()
            elif error is None and not self._cancelled:
                self._ready.add(number)
            sched.cond.notify_all()
            finished = self._busy == 0 and (
                self.complete or self.error is not None or self._cancelled
            )
        if finished:
            self._close_bar()
            if self.complete:
                self._finish()

    def _finish(self) -> None:
        if self._when_done is None:
            return
        try:
            self._when_done()
        except OSError as exc:  # the manifest copy only: the tars are all there
            log.warning("cache: could not copy the manifest beside the shards (%s)", exc)

    def _progress(self, size: int) -> None:
        if self._cancelled:
            raise _Cancelled  # aborts the download: its temporary file is removed
        if self._bar is not None:
            self._bar.update(size)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _Cancelled(Exception):
    """Raised from a download's progress callback to abort it."""


class _Scheduler:
    """The fetching threads of one process, shared by its ``ShardFetch``es: the tars of the
    first fetch in ``fetches`` go first."""

    def __init__(self):
        self.cond = threading.Condition()
        self.fetches: list[ShardFetch] = []
        self.threads = 0
        self.pid = os.getpid()

    def add(self, fetch: ShardFetch) -> None:
        with self.cond:
            self.fetches.append(fetch)
            while self.threads < FETCH_THREADS:
                self.threads += 1
                threading.Thread(target=self._work, name="shard-fetch", daemon=True).start()
            self.cond.notify_all()

    def _next(self) -> tuple[ShardFetch, int] | None:
        for fetch in list(self.fetches):
            number = fetch._take()
            if number is not None:
                return fetch, number
            if not fetch._pending:
                self.fetches.remove(fetch)  # nothing left to start; its last ones may run on
        return None

    def _work(self) -> None:
        while True:
            with self.cond:
                task = self._next()
                if task is None:
                    self.threads -= 1  # started again by the next add()
                    return
            task[0]._run(task[1])

    def stop(self) -> None:
        """Cancel every fetch (at exit: abort downloads in flight rather than finish them)."""
        with self.cond:
            fetches = list(self.fetches)
        for fetch in fetches:
            fetch.cancel()


_SCHEDULER: _Scheduler | None = None


def _scheduler() -> _Scheduler:
    global _SCHEDULER
    if _SCHEDULER is None or _SCHEDULER.pid != os.getpid():  # a forked child has no threads
        _SCHEDULER = _Scheduler()
    return _SCHEDULER


def _stop_at_exit() -> None:
    if _SCHEDULER is not None and _SCHEDULER.pid == os.getpid():
        _SCHEDULER.stop()


# At exit, abort the downloads in flight before concurrent.futures joins boto3's transfer
# threads (its hook is registered the same way, earlier, so it runs after this one); a plain
# atexit hook would run only once every download in flight had finished.
getattr(threading, "_register_atexit", atexit.register)(_stop_at_exit)
