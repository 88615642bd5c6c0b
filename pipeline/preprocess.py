"""The one image preprocessing: decode to the split's channels, resize, normalise.

The torch backend decodes shard members with :func:`decode`, and ``predict.py`` prepares its
input files with :func:`decode` and :func:`normalize`, so a model sees at prediction time
what the test loader fed it: the same conversion to gray or RGB, the same bilinear resize,
and the same ``(x / 255 - mean) / std`` (:func:`normalize`, the loader's un-augmented path).
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

from pipeline.augment import to_float
from pipeline.config import LoaderConfig


def image_mode(channels: int) -> str:
    """The PIL mode of an image with ``channels`` channels: ``L`` (1) or ``RGB`` (3)."""
    return "L" if channels == 1 else "RGB"


def decode(source: bytes | bytearray | str | os.PathLike, mode: str, size: int) -> np.ndarray:
    """Image bytes or an image file -> uint8 ``(size, size, C)`` in PIL ``mode`` (``L``/``RGB``).

    Any size, gray or colour, is converted to ``mode`` and resized bilinearly.
    """
    with Image.open(
        io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    ) as image:
        image = image.convert(mode)
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array


def normalize(images: torch.Tensor, cfg: LoaderConfig) -> torch.Tensor:
    """uint8 ``(B, H, W, C)`` -> float32 ``(B, C, H, W)`` normalised with ``cfg.mean``/``cfg.std``.

    The kernel the loader runs on a batch it does not augment (the test split).
    """
    return to_float(images, cfg.mean, cfg.std)
