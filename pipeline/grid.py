"""The one grid renderer: tiles of equal-sized images with column headers and captions.

``pipeline.preview`` draws what the loader feeds the model with it; ``training.figures``
draws the TensorBoard grid, results.png and predict.py's figures with it, and
:func:`save_png` writes each of them atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sharding.atomic import atomic_path

HEADER_PX = 16
CAPTION_PX = 14
GAP_PX = 4


def to_pil(image: torch.Tensor, size: int | None = None) -> Image.Image:
    """``(C, H, W)`` in [0, 1] with C = 1 or 3 to an RGB PIL image, resized to ``size`` if given."""
    array = (image.detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    array = np.repeat(array, 3, axis=0) if array.shape[0] == 1 else array
    pil = Image.fromarray(array.transpose(1, 2, 0), mode="RGB")
    return pil.resize((size, size), Image.BILINEAR) if size and pil.size != (size, size) else pil


def compose(
    rows: list[list[Image.Image]],
    headers: list[str] | tuple[str, ...] | None = None,
    captions: list[list[str]] | None = None,
) -> Image.Image:
    """Tile ``rows`` of equal-sized images; ``headers`` above columns, ``captions`` under cells."""
    cell_w, cell_h = rows[0][0].size
    n_cols = max(len(row) for row in rows)
    header_h = HEADER_PX if headers else 0
    row_h = cell_h + (CAPTION_PX if captions else 0) + GAP_PX
    canvas = Image.new(
        "RGB", (n_cols * (cell_w + GAP_PX) + GAP_PX, header_h + len(rows) * row_h + GAP_PX), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for c, header in enumerate(headers or []):
        draw.text((GAP_PX + c * (cell_w + GAP_PX), 2), header, fill="black")
    for r, row in enumerate(rows):
        top = header_h + GAP_PX + r * row_h
        for c, image in enumerate(row):
            left = GAP_PX + c * (cell_w + GAP_PX)
            canvas.paste(image, (left, top))
            if captions and captions[r][c]:
                draw.text((left, top + cell_h + 1), captions[r][c], fill="black")
    return canvas


def save_png(image: Image.Image, path: str | Path) -> None:
    """Write ``image`` as a PNG atomically: no half-written file under ``path`` on a crash."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
