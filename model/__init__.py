"""Depthwise-separable UNet for foreground mask and depth, with its loss and metrics.

No file I/O happens in this package: data comes from ``pipeline``, checkpoints are
written by ``train.py``.
"""

from model.losses import LOSS_WEIGHTS, LossConfig, MaskDepthLoss, depth_ssim
from model.metrics import MaskDepthMetrics
from model.unet import RECOMMENDED_MEMORY_FORMAT, SKIPS, UNet, UNetConfig, count_parameters

__all__ = [
    "LOSS_WEIGHTS",
    "RECOMMENDED_MEMORY_FORMAT",
    "SKIPS",
    "LossConfig",
    "MaskDepthLoss",
    "MaskDepthMetrics",
    "UNet",
    "UNetConfig",
    "count_parameters",
    "depth_ssim",
]
