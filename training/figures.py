"""Figures of predictions: the per-epoch TensorBoard grid, results.png, predict figures.

The grid itself is drawn by :mod:`pipeline.grid`; this module lays out the columns of a
prediction figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import LoaderConfig, denormalize
from pipeline.grid import compose, save_png, to_pil

COLUMNS = ("bg", "fg_bg", "mask (true)", "mask (pred)", "depth (true)", "depth (pred)")
__all__ = [
    "COLUMNS",
    "pil_to_tensor",
    "preview_grid",
    "preview_samples",
    "sample_rows",
    "write_results_figure",
]


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


def preview_samples(batch: dict, out: Any, count: int) -> dict[str, torch.Tensor]:
    """The first ``count`` samples of a test batch and its :class:`training.step.StepOutput`,
    on the CPU: what :func:`preview_grid` draws."""
    shown = {"bg": batch["bg"], "fg_bg": batch["fg_bg"], "mask": out.mask, "depth": out.depth}
    shown.update(mask_prob=torch.sigmoid(out.mask_logits), depth_pred=out.depth_pred)
    return {k: v[:count].float().cpu() for k, v in shown.items()}


def preview_grid(shown: dict, loader_cfg: LoaderConfig, captions: bool = False) -> Image.Image:
    """The :data:`COLUMNS` grid of an evaluation preview (``train.evaluate``'s ``shown``).

    With ``captions``, each predicted mask is captioned with the sample's IoU from
    ``shown["iou"]`` (:class:`model.MaskDepthMetrics`' per-sample IoU).
    """
    rows = sample_rows(
        denormalize(shown["bg"], loader_cfg),
        denormalize(shown["fg_bg"], loader_cfg),
        shown["mask"],
        shown["mask_prob"],
        shown["depth"],
        shown["depth_pred"],
    )
    cells = [["", "", "", f"IoU {iou:.3f}", "", ""] for iou in shown["iou"]] if captions else None
    return compose(rows, COLUMNS, cells)


def write_results_figure(path: Path, shown: dict, loader_cfg: LoaderConfig) -> None:
    """results.png: per test sample the inputs, true and predicted mask (with IoU) and depth."""
    save_png(preview_grid(shown, loader_cfg, captions=True), path)
