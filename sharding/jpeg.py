"""Cheap JPEG validation: markers and a header parse, without decoding the pixels.

Real DALI cannot skip a corrupt JPEG mid-training, so the build rejects them here. A full decode
(``--verify decode``) is optional because it costs as much as training's own decode.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

# Start-of-frame markers that carry the image size: baseline, extended, progressive, lossless, …
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_MODES = {1: "L", 3: "RGB", 4: "CMYK"}
# Encoders sometimes pad after EOI; look for it near the end rather than at the last byte.
_EOI_WINDOW = 4096


class JpegError(ValueError):
    """The bytes are not a valid JPEG; the message says why."""


@dataclass(frozen=True)
class JpegInfo:
    mode: str  # "L" or "RGB"
    width: int
    height: int


def parse_header(data: bytes) -> JpegInfo:
    """Check the SOI/EOI markers and walk segments to the frame header; return mode and size."""
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        raise JpegError("missing JPEG start marker")
    if data.rfind(b"\xff\xd9", max(0, len(data) - _EOI_WINDOW)) < 0:
        raise JpegError("missing JPEG end marker (truncated?)")
    # Every segment up to the start of scan is walked, not just those before the frame header:
    # libjpeg (PIL) skips a damaged marker after the frame header with a warning, while DALI's
    # parser stops the pipeline on it ("Invalid marker"), mid-epoch.
    pos = 2
    frame = None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise JpegError(f"bad segment marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > len(data):
            raise JpegError(f"segment at byte {pos} runs past the end")
        if marker in _SOF:
            if frame is not None:
                raise JpegError(f"a second frame header at byte {pos}")
            if length < 8:
                raise JpegError("frame header too short")
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            components = data[pos + 9]
            if width == 0 or height == 0:
                raise JpegError("zero image size in frame header")
            if components not in _MODES:
                raise JpegError(f"unsupported component count {components}")
            frame = JpegInfo(_MODES[components], width, height)
        if marker == 0xDA:  # start of scan: the entropy-coded data follows
            if frame is None:
                break
            return frame
        pos += 2 + length
    if frame is None:
        raise JpegError("no frame header found")
    raise JpegError("no start of scan after the frame header")


def decode_check(data: bytes) -> None:
    """Decode every pixel with PIL; raise ``JpegError`` if the entropy-coded data is broken."""
    from PIL import Image  # deferred: the header-only path needs no PIL

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError or ValueError for broken data
        raise JpegError(f"decode failed: {e}") from None
