"""Writing shards in parallel, and the order in which an s3:// build uploads them.

``plan_jobs`` cuts each split's shuffled samples into one job per shard; ``run_jobs`` runs
``write_shard`` on each, in worker processes when there are several. A worker stages its shard
under a temporary name (``sharding.atomic.TMP_PREFIX``); ``sharding.finalise`` renames the
staged shards into place. For an s3:// ``--out`` the ``Uploader`` sends each shard up under its
final name as soon as it and every shard before it are done.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import zipfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from sharding import storage
from sharding.atomic import TMP_PREFIX, atomic_write
from sharding.build_config import BuildError, ShardConfig
from sharding.jpeg import JpegError
from sharding.sample_check import Rejected, read_part
from sharding.shard_format import (
    INDEX_SUFFIX,
    META_EXT,
    PARTS,
    SPLITS,
    TAR_SUFFIX,
    image_ext,
    shard_stem,
)
from sharding.signals import STOP_SIGNALS
from sharding.tario import ShardWriter
from sharding.zip_input import SampleRef, close_readers, zip_reader

# --- planning -------------------------------------------------------------------------------


def plan_shards(samples: list[SampleRef], per_shard: int) -> list[list[SampleRef]]:
    """Cut ``samples`` into consecutive shards of ``per_shard`` (the last one may be short)."""
    return [samples[i : i + per_shard] for i in range(0, len(samples), per_shard)]


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


# --- writing one shard (runs in worker processes) -------------------------------------------


def write_shard(job: dict) -> dict:
    """Stage one shard's tar and index under temporary names; return its record and skips."""
    zips, verify, out, staged = job["zips"], job["verify"], Path(job["out"]), job["staged"]
    geometry = job.get("geometry")
    writer = ShardWriter()
    skipped: list[dict] = []
    image_stats: Counter = Counter()
    bg_cache: dict[tuple[int, str], tuple[bytes, object] | Exception] = {}
    for ref in job["samples"]:
        zf = zip_reader(zips[ref.zip_index])
        members: dict[str, bytes] = {}
        infos = []
        for part, member in zip(PARTS, ref.members):
            try:
                data, info = read_part(zf, ref, part, member, verify, geometry, bg_cache)
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


# --- running the jobs -----------------------------------------------------------------------


class Uploader:
    """Uploads finished shards to an s3:// ``--out`` in job order, under their final names.

    Results arrive in job order, so a shard's final number (its split's count of non-empty
    shards before it) is known on arrival, as ``sharding.finalise`` will name it.
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


def run_jobs(jobs, workers, total, progress, out: str, publish=None) -> list[dict]:
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
        remove_staged(out)
        raise
    else:
        if pool is not None:
            pool.shutdown()
    finally:
        bar.close()
        close_readers()
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


def remove_staged(out: str) -> None:
    """Delete every staged (not yet renamed) file in the local directory ``out``."""
    for p in Path(out).glob(f"{TMP_PREFIX}*"):
        p.unlink(missing_ok=True)
