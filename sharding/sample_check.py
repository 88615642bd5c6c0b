"""The per-sample JPEG checks: what every image must be for a sample to go into a shard.

Each image is read with its CRC checked, its header parsed and its declared size compared with
the dataset's geometry before any decode; ``--verify decode`` decodes it fully as well. A
readable image the dataset cannot use raises ``Rejected`` with the skip reason.
"""

from __future__ import annotations

import zipfile

from sharding.build_config import BuildError, ShardConfig
from sharding.jpeg import JpegError, decode_check, parse_header
from sharding.shard_format import PARTS
from sharding.zip_input import SampleRef, ZipReader, zip_reader


class Rejected(Exception):
    """A readable JPEG the dataset cannot use; ``reason`` is the skip reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# Every way one image can fail its checks: the sample it belongs to is skipped, not the build.
UNUSABLE = (JpegError, Rejected, zipfile.BadZipFile, OSError)


def read_checked(zf: ZipReader, member: str, verify: str, expected: tuple[int, int] | None):
    """Read, CRC-check and header-check one JPEG; check its declared size before any decode."""
    data = zf.read(member)  # checks the CRC
    info = parse_header(data)
    if info.mode == "CMYK":
        # DALI's CPU decoder and PIL convert CMYK alike (within 1), but the GPU decoders and
        # Adobe's inverted CMYK are not tested here; no image of this dataset is CMYK.
        raise Rejected("cmyk", "4-component (CMYK) JPEG; save it as greyscale or RGB")
    if expected is not None and (info.width, info.height) != expected:
        # Checked from the frame header alone, so a decompression bomb is never decoded.
        raise Rejected(
            "size",
            f"declares {info.width}x{info.height}, the dataset's images are "
            f"{expected[0]}x{expected[1]}",
        )
    if verify == "decode":
        decode_check(data)
    return data, info


def read_part(zf, ref, part, member, verify, geometry, bg_cache):
    """One part of a sample; one bg serves thousands of samples, so it is read once."""
    expected = geometry.get(part) if geometry else None
    if part != "bg":
        return read_checked(zf, member, verify, expected)
    cache_key = (ref.zip_index, member)
    if cache_key not in bg_cache:
        try:
            bg_cache[cache_key] = read_checked(zf, member, verify, expected)
        except UNUSABLE as e:
            bg_cache[cache_key] = e
    cached = bg_cache[cache_key]
    if isinstance(cached, Exception):
        raise cached
    return cached


def find_geometry(cfg: ShardConfig, samples: list[SampleRef]) -> dict[str, tuple[int, int]]:
    """(width, height) every image of each part must declare: ``--image-size``/``--depth-size``
    where given, else the first accepted sample's (in zip and name order).

    Every later image is checked against it from its frame header alone, so one 8000x8000
    fg_bg is skipped here instead of stopping a DALI batch mid-epoch.
    """
    given = {}
    if cfg.image_size is not None:
        given.update(dict.fromkeys(("bg", "fg_bg", "mask"), (cfg.image_size, cfg.image_size)))
    if cfg.depth_size is not None:
        given["depth"] = (cfg.depth_size, cfg.depth_size)
    if len(given) == len(PARTS):
        return given
    for ref in samples:
        zf = zip_reader(cfg.zips[ref.zip_index])
        sizes = {}
        try:
            for part, member in zip(PARTS, ref.members):
                _, info = read_checked(zf, member, "header", given.get(part))
                sizes[part] = (info.width, info.height)
        except UNUSABLE:
            continue  # not accepted: the workers skip it with its reason
        # Per part: the loaders resize each part from its stored size, which must be one size.
        return sizes
    if given:  # caught before --out is touched: a previous build there stays as it was
        wanted = ", ".join(f"{p} {w}x{h}" for p, (w, h) in given.items())
        raise BuildError(
            f"no sample in the zips has every image at the size given ({wanted}); "
            "check --image-size and --depth-size, or leave them out to use the zips' own"
        )
    return given
