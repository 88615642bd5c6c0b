"""Image grids drawn with PIL: the per-epoch TensorBoard grid, results.png, predict figures."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

COLUMNS = ("bg", "fg_bg", "mask (true)", "mask (pred)", "depth (true)", "depth (pred)")
HEADER_PX = 16
CAPTION_PX = 14
GAP_PX = 4


def to_pil(image: torch.Tensor, size: int | None = None) -> Image.Image:
    """``(C, H, W)`` in [0, 1] with C = 1 or 3 to an RGB PIL image, resized to ``size`` if given."""
    array = (image.detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    array = np.repeat(array, 3, axis=0) if array.shape[0] == 1 else array
    pil = Image.fromarray(array.transpose(1, 2, 0), mode="RGB")
    return pil.resize((size, size), Image.BILINEAR) if size and pil.size != (size, size) else pil


def sample_rows(
    bg: torch.Tensor,
    fg_bg: torch.Tensor,
    mask_true: torch.Tensor,
    mask_prob: torch.Tensor,
    depth_true: torch.Tensor,
    depth_pred: torch.Tensor,
) -> list[list[Image.Image]]:
    """One row of :data:`COLUMNS` images per sample; all tensors (N, C, H, W) in [0, 1]."""
    size = bg.shape[-1]
    # Depth is predicted at a lower resolution; upsample so every cell has the same size.
    depth_true = F.interpolate(depth_true.float(), size=size, mode="bilinear", align_corners=False)
    depth_pred = F.interpolate(depth_pred.float(), size=size, mode="bilinear", align_corners=False)
    columns = (bg, fg_bg, mask_true, mask_prob, depth_true, depth_pred)
    return [[to_pil(column[i], size) for column in columns] for i in range(bg.shape[0])]


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


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image to a ``(3, H, W)`` uint8 tensor, as TensorBoard's ``add_image`` takes."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def mask_iou(
    mask_prob: torch.Tensor, mask_true: torch.Tensor, threshold: float = 0.5
) -> list[float]:
    """Per-sample IoU of ``mask_prob > threshold`` against ``mask_true`` (1.0 when both empty)."""
    pred = mask_prob.flatten(1) > threshold
    true = mask_true.flatten(1) > 0.5
    intersection = (pred & true).sum(1).float()
    union = (pred | true).sum(1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), 1.0).tolist()
