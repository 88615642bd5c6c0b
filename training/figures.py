"""Figures of predictions: the per-epoch TensorBoard grid, results.png, predict figures."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.grid import compose, to_pil

COLUMNS = ("bg", "fg_bg", "mask (true)", "mask (pred)", "depth (true)", "depth (pred)")
__all__ = ["COLUMNS", "compose", "pil_to_tensor", "sample_rows", "to_pil"]


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
