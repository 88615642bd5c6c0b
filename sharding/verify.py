"""Check a shard directory, or an s3:// prefix, against its manifest.

    python -m sharding.verify data/shards [--decode]
    python -m sharding.verify s3://bucket/shards

Checks each shard's sha256 and sample count, that its index matches the tar byte for byte, that
every sample has all five members, and that no key appears twice. Exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tarfile

from tqdm import tqdm

from sharding import storage
from sharding.jpeg import JpegError, decode_check, parse_header
from sharding.shard_format import (
    IMAGE_EXTS,
    MANIFEST,
    MEMBER_EXTS,
    IndexFormatError,
    ManifestError,
    not_a_dataset,
    parse_index,
    read_manifest,
    split_member,
)


class VerifyError(Exception):
    """The shards do not match the manifest; the message names the file."""


def load_manifest(data_dir: str) -> dict:
    """Read and sanity-check ``manifest.json``."""
    try:
        return read_manifest(data_dir)
    except ManifestError as e:
        raise VerifyError(str(e)) from None


def verify_shard(data_dir: str, shard: dict, decode: bool, seen: set[str]) -> int:
    """Check one shard; return its sample count. ``seen`` collects keys across shards."""
    tar_path = storage.join(data_dir, shard["file"])
    idx_path = storage.join(data_dir, shard["index"])
    # One shard at a time in memory: its hash, its tar and its JPEGs all come from here.
    data = _read_listed(tar_path)
    index_text = _read_listed(idx_path).decode("utf-8", errors="replace")
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        raise VerifyError(f"{tar_path}: sha256 does not match the manifest")
    try:
        index = parse_index(index_text)
    except IndexFormatError as e:
        raise VerifyError(f"{idx_path}: {e}") from None
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            key, ext = split_member(info.name)
            samples.setdefault(key, {})[ext] = info
    if len(samples) != shard["samples"] or len(index) != shard["samples"]:
        raise VerifyError(
            f"{tar_path}: manifest says {shard['samples']} samples, tar has {len(samples)}, "
            f"index has {len(index)}"
        )
    for components in index:
        for ext, offset, size, name in components:
            if name is None:
                raise VerifyError(f"{idx_path}: an index without member names; rebuild the shards")
            info = samples.get(split_member(name)[0], {}).get(ext)
            if info is None or info.offset_data != offset or info.size != size:
                raise VerifyError(f"{idx_path}: entry for {name} does not match the tar")
    for key, members in samples.items():
        missing = [ext for ext in MEMBER_EXTS if ext not in members]
        if missing:
            raise VerifyError(f"{tar_path}: sample {key} lacks {', '.join(missing)}")
        if key in seen:
            raise VerifyError(f"{tar_path}: sample {key} appears in more than one place")
        seen.add(key)
        for ext in IMAGE_EXTS:
            info = members[ext]
            blob = data[info.offset_data : info.offset_data + info.size]
            try:
                parse_header(blob)
                if decode:
                    decode_check(blob)
            except JpegError as e:
                raise VerifyError(f"{tar_path}: {info.name}: {e}") from None
    return len(samples)


def _read_listed(path: str) -> bytes:
    """A file the manifest lists; ``VerifyError`` when it is gone."""
    try:
        return storage.read_bytes(path)
    except storage.NotFound:
        raise VerifyError(f"{path}: missing") from None


def verify(data_dir: str, decode: bool = False, progress: bool = True) -> dict:
    """Verify every shard listed in the manifest; return per-split sample counts."""
    manifest = load_manifest(data_dir)
    counts = {}
    seen: set[str] = set()
    for split, info in manifest["splits"].items():
        total = 0
        for shard in tqdm(
            info["shards"], desc=f"verify {split}", disable=None if progress else True
        ):
            total += verify_shard(data_dir, shard, decode, seen)
        if total != info["samples"]:
            raise VerifyError(
                f"{storage.join(data_dir, MANIFEST)}: {split} lists {info['samples']} samples, "
                f"shards hold {total}"
            )
        counts[split] = total
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sharding.verify",
        description="Check shards against manifest.json: sha256, counts, indexes, completeness.",
    )
    p.add_argument("data", help="shard directory or s3://BUCKET/PREFIX (with manifest.json)")
    p.add_argument("--decode", action="store_true", help="also decode every JPEG fully")
    a = p.parse_args(argv)
    wrong = not_a_dataset(a.data)
    if wrong:
        print(f"error: {wrong}", file=sys.stderr)
        return 1
    try:
        counts = verify(a.data, decode=a.decode)
    except (VerifyError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, tarfile.TarError) as e:
        print(f"error: {a.data}: {e}", file=sys.stderr)
        return 1
    checked = " (every JPEG decoded)" if a.decode else ""
    print(f"ok: {a.data}: " + ", ".join(f"{k} {v} samples" for k, v in counts.items()) + checked)
    return 0


if __name__ == "__main__":
    sys.exit(main())
