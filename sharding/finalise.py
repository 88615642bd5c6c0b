"""The end of a build: staged shards renamed to their final, contiguous names, then the
manifest written last.

``manifest.json`` (its format is ``sharding.shard_format``'s) is written only after every
shard is in place, so its presence means the build is complete.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict

from sharding import storage
from sharding.build_config import BuildError
from sharding.shard_format import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_SUFFIX,
    MANIFEST,
    SPLITS,
    TAR_SUFFIX,
    image_summary,
    shard_stem,
    split_channels,
    write_manifest,
)
from sharding.zip_input import Skips


def finalise(cfg, out: str, jobs, results, skips: Skips, ignored, per_shard, geometry) -> dict:
    """Rename finished shards to contiguous names, then write the manifest last.

    For an s3:// ``out`` the ``sharding.shard_jobs.Uploader`` has already stored them under
    those names.
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
