"""What a shard build is asked to do, and the one error it reports to the user.

Every stage of the build (``sharding.zip_input``, ``sharding.sample_check``,
``sharding.shard_jobs``, ``sharding.finalise``) takes the ``ShardConfig`` and raises
``BuildError``; they live here, below all of them, so that none imports the CLI in
``sharding.build`` (and ``python -m sharding.build`` raises and catches the same class).
"""

from __future__ import annotations

from dataclasses import dataclass


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
