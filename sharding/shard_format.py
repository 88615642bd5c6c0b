"""The shard format, in one place: what ``sharding.build`` writes and every reader expects.

A shard directory (or an ``s3://`` prefix, see ``sharding.storage``) holds::

    train-000000.tar  train-000000.idx  ...  test-000000.tar  test-000000.idx  ...  manifest.json

Each tar is a WebDataset shard: per sample, the members ``{key}.bg.jpg``, ``{key}.fg_bg.jpg``,
``{key}.mask.jpg``, ``{key}.depth.jpg`` and ``{key}.json`` (its source). Each ``.idx`` beside
it is the DALI index that ``wds2idx`` would write. ``manifest.json`` is written last and lists
every shard with its sample count and sha256, so its presence means the build finished.

The dataset's geometry, ``GEOMETRY`` (bg, fg_bg and mask 160x160, depth 80x80), lives here
too, so that the loader's output sizes and the model's input and output sizes default to the
same numbers. Nothing here imports torch: ``sharding`` stays light.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from sharding import storage

FORMAT = "maskdepth-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
PARTS = ("bg", "fg_bg", "mask", "depth")
META_EXT = "json"  # the member that records where a sample came from
TAR_SUFFIX = ".tar"
INDEX_SUFFIX = ".idx"
INDEX_VERSION = "v1.2"  # what wds2idx writes: ext, offset, size and name per member
# What a build names its shards: train-000000.tar, test-000012.idx, ...
SHARD_FILE = re.compile(
    rf"(?:{'|'.join(SPLITS)})-\d{{6}}(?:{re.escape(TAR_SUFFIX)}|{re.escape(INDEX_SUFFIX)})"
)


# --- geometry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Side lengths of the square images a model sees: bg, fg_bg and mask, and depth."""

    image_size: int = 160
    depth_size: int = 80

    def __post_init__(self) -> None:
        for name in ("image_size", "depth_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive number of pixels")


GEOMETRY = Geometry()  # the EVA dataset's: 160x160 images and masks, 80x80 depth maps


# --- members of a sample --------------------------------------------------------------------


def image_ext(part: str) -> str:
    """The extension of one part's JPEG inside a sample: ``bg`` -> ``bg.jpg``."""
    if part not in PARTS:
        raise ValueError(f"part {part!r} is not one of {PARTS}")
    return f"{part}.jpg"


IMAGE_EXTS = tuple(image_ext(part) for part in PARTS)
MEMBER_EXTS = (*IMAGE_EXTS, META_EXT)  # every member of a complete sample, in tar order


def member_name(key: str, ext: str) -> str:
    """The tar member name ``{key}.{ext}``; the key must not contain '.' or '/'."""
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty and free of '.' and '/'")
    return f"{key}.{ext}"


def split_member(name: str) -> tuple[str, str]:
    """``(key, ext)`` of a tar member name: everything before the first dot is the key."""
    key, _, ext = name.partition(".")
    return key, ext


def shard_stem(split: str, number: int) -> str:
    """``train-000003``: the name of a shard's tar and index without their suffixes."""
    return f"{split}-{number:06d}"


def index_path_for(tar_path: str) -> str | None:
    """The DALI index that belongs beside a tar (``x.tar`` -> ``x.idx``), or None."""
    if not tar_path.endswith(TAR_SUFFIX):
        return None
    return tar_path[: -len(TAR_SUFFIX)] + INDEX_SUFFIX


def not_a_dataset(path: str) -> str | None:
    """Why a local ``path`` given as a dataset is not one (a zip, another file), or None.

    Every command that takes a shard directory answers a zip or a stray file with this line.
    """
    import zipfile

    if storage.is_url(path) or os.path.isdir(path):
        return None
    if not os.path.exists(path):
        if not path.lower().endswith(".zip"):
            return None
        what = "no such file"
    else:
        what = "is a zip" if zipfile.is_zipfile(path) else "is a file"
    return (
        f"{path}: {what}; a shard directory (with {MANIFEST}) is needed here. "
        "Build shards from zips with: python -m sharding.build ZIPS --out DIR"
    )


# --- the DALI index -------------------------------------------------------------------------

IndexEntry = tuple[str, int, int, str | None]  # ext, data offset, size, member name (v1.2)


class IndexFormatError(ValueError):
    """An index file does not follow the ``wds2idx`` format; the message says where."""


def format_index(samples: list[list[IndexEntry]]) -> str:
    """The text ``wds2idx`` writes: a version line, then ``ext offset size name`` per member."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for components in samples:
        lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in components))
    return "\n".join(lines) + "\n"


def parse_index(text: str) -> list[list[IndexEntry]]:
    """Read an index written by ``format_index`` or ``wds2idx`` (v1.2, or v1.1 without names).

    Raises ``IndexFormatError`` for a bad header, a malformed line, or a sample count that
    does not match the header.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise IndexFormatError("empty index")
    head = lines[0].split()
    if len(head) != 2 or head[0] not in ("v1.1", INDEX_VERSION) or not head[1].isdigit():
        raise IndexFormatError(f"bad index header {lines[0]!r}")
    width = 4 if head[0] == INDEX_VERSION else 3
    samples = []
    for line in lines[1:]:
        fields = line.split()
        if len(fields) % width:
            raise IndexFormatError(f"bad index line {line!r}")
        try:
            samples.append(
                [
                    (
                        fields[i],
                        int(fields[i + 1]),
                        int(fields[i + 2]),
                        fields[i + 3] if width == 4 else None,
                    )
                    for i in range(0, len(fields), width)
                ]
            )
        except ValueError:
            raise IndexFormatError(f"bad index line {line!r}") from None
    if len(samples) != int(head[1]):
        raise IndexFormatError(f"index says {head[1]} samples but lists {len(samples)}")
    return samples


def index_data_end(samples: list[list[IndexEntry]]) -> int:
    """The byte just past the last member's data: a tar shorter than this is truncated."""
    return max((offset + size for entries in samples for _, offset, size, _ in entries), default=0)


# --- the manifest ---------------------------------------------------------------------------
#
# ``images`` describes the JPEGs in the shards, per part: ``mode`` and ``size`` are the most
# common (every image of a part declares the same size: the build skips the others), and
# ``modes`` counts greyscale (``L``) and colour (``RGB``) images, which may be mixed: both
# loaders convert every image to the split's ``channels``. ``variants`` counts each (mode,
# size). ``modes`` came later than the rest; readers must not require it.


def image_summary(stats: dict[tuple[str, str, int, int], int]) -> dict[str, dict]:
    """The manifest's ``images`` from counts of (part, mode, width, height)."""
    summary = {}
    for part in PARTS:
        variants = {(m, w, h): n for (p, m, w, h), n in stats.items() if p == part}
        if not variants:
            continue
        mode, w, h = max(variants, key=lambda k: (variants[k], k))
        modes: dict[str, int] = {}
        for (m, _, _), n in variants.items():
            modes[m] = modes.get(m, 0) + n
        summary[part] = {
            "mode": mode,
            "size": [w, h],
            "modes": dict(sorted(modes.items())),
            "variants": [
                {"mode": m, "size": [vw, vh], "count": n}
                for (m, vw, vh), n in sorted(variants.items())
            ],
        }
    return summary


def split_channels(images: dict[str, dict]) -> int:
    """The channels bg and fg_bg are loaded with: 3 when most fg_bg images are colour, else 1.

    The loaders convert every image to it, so a few grey images in a colour set (or the other
    way round) load like the rest.
    """
    return 3 if images.get("fg_bg", {}).get("mode") == "RGB" else 1


class ManifestError(ValueError):
    """A shard directory's manifest is missing or malformed; the message names the path."""


class ManifestMissing(ManifestError):
    """There is no ``manifest.json``: the build did not finish, or this is no shard directory."""


_SHARD_KEYS = {"file": str, "index": str, "samples": int, "bytes": int, "sha256": str}


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Read ``root/manifest.json`` and check the parts every reader relies on.

    ``root`` is a directory or an ``s3://`` prefix; storage that cannot be reached raises
    ``storage.StorageError``.
    """
    root = os.fspath(root)
    path = storage.join(root, MANIFEST)
    if not storage.is_url(root) and not os.path.isdir(root):
        raise ManifestMissing(f"{root}: no such directory")
    try:
        text = storage.read_text(path)
    except storage.NotFound:
        raise ManifestMissing(
            f"{path}: not found; the build did not finish, or this is not a shard directory "
            "(build one with `python -m sharding.build ZIPS --out DIR`)"
        ) from None
    except IsADirectoryError:
        raise ManifestMissing(f"{path}: is a directory, not a manifest") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from None
    except storage.StorageError:
        raise
    except OSError as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from None
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: not a manifest (a JSON object was expected)")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}"
            f", expected {FORMAT!r} version {FORMAT_VERSION}; rebuild with python -m sharding.build"
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise ManifestError(f"{path}: {problem}; rebuild with python -m sharding.build")
    return manifest


def _manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a manifest of the right format version, or None."""
    if manifest.get("channels") not in (1, 3):
        return f"channels is {manifest.get('channels')!r}, expected 1 or 3"
    images = manifest.get("images")
    if not isinstance(images, dict):
        return "no 'images' object"
    for part, info in images.items():
        size = info.get("size") if isinstance(info, dict) else None
        if not (isinstance(size, list) and len(size) == 2 and all(type(s) is int for s in size)):
            return f"images.{part}.size is {size!r}, expected [width, height]"
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or set(splits) - set(SPLITS):
        return f"splits is {splits!r:.80}, expected an object with keys among {SPLITS}"
    for split, info in splits.items():
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            return f"splits.{split} has no 'shards' list"
        if not isinstance(info.get("samples"), int):
            return f"splits.{split}.samples is {info.get('samples')!r}, expected a count"
        for i, shard in enumerate(info["shards"]):
            for key, kind in _SHARD_KEYS.items():
                if not isinstance(shard, dict) or not isinstance(shard.get(key), kind):
                    return f"splits.{split}.shards[{i}] lacks {key!r} ({kind.__name__})"
    return None


def write_manifest(root: str | os.PathLike, manifest: dict[str, Any]) -> str:
    """Write ``root/manifest.json`` atomically; call it last, once every shard is in place."""
    path = storage.join(root, MANIFEST)
    # Sorted keys and a one-space indent: two builds of the same zips are byte-identical.
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    storage.write_bytes(path, text.encode("utf-8"))
    return path
