"""The training recipes' values: the one source of every model, loss and optimisation default.

``training.recipe`` turns them into train.py's options, optimizer and schedule; ``UNetConfig``
and ``LossConfig`` take their defaults from the ``default`` recipe, so that ``UNetConfig()``,
``LossConfig()``, ``TrainConfig()`` and a train.py run with no options build the same model
and loss. The table sits here, below both, because the model package may not import the
training package. Plain values only: no torch, no I/O.

``default`` is AdamW with a linear warm-up and a cosine decay sized from the run's total
steps; ``reference`` is the reference solution's recipe exactly: SGD lr 0.01 momentum 0.9,
StepLR(2 epochs, 0.1), loss ``2 * BCE + (1 - SSIM)``, the plain UNet; ``few-objects`` is the
default with flips, object jitter and soft Dice, for training sets with few foreground objects.
The measurements that chose them are in README.md and benchmarks/RESULTS.md.
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "default": dict(
        optimizer="adamw",
        lr=0.01,
        momentum=0.9,
        weight_decay=1e-4,
        schedule="cosine",
        warmup=0.05,
        cooldown=1.0,  # measured: 0.25 gave +0.005 IoU, -0.001 depth SSIM (benchmarks/RESULTS.md)
        lr_step=2,
        lr_gamma=0.1,
        mask_weight=4.0,
        dice_weight=0.0,  # measured: +0.001 IoU, -0.013 depth SSIM (benchmarks/RESULTS.md)
        depth_weight=1.0,
        depth_l1_weight=0.0,  # measured: -0.005 IoU, -0.005 depth SSIM (benchmarks/RESULTS.md)
        depth_grad_weight=2.0,
        # measured: depth SSIM 0.919 -> 0.945, IoU 0.942 -> 0.942, means of three seeds (RESULTS.md)
        depth_aux_weight=0.5,
        diff_input=True,
        skip="add",
        context=True,
        widths=(16, 32, 64, 192, 384),
        # On by "few-objects"; here they cost depth SSIM on benchmarks.quality's set (below).
        flip=False,
        object_jitter=0.0,
        # measured: drawn apart, IoU 0.840 at 6 foregrounds, below the floor (RESULTS.md)
        paired_jitter=True,
    ),
    "reference": dict(
        optimizer="sgd",
        lr=0.01,
        momentum=0.9,
        weight_decay=1e-5,
        schedule="step",
        warmup=0.0,
        cooldown=1.0,
        lr_step=2,
        lr_gamma=0.1,
        mask_weight=2.0,
        dice_weight=0.0,
        depth_weight=1.0,
        depth_l1_weight=0.0,
        depth_grad_weight=0.0,
        depth_aux_weight=0.0,
        diff_input=False,
        skip="concat",
        context=False,
        widths=(16, 32, 64, 128, 256),
        flip=False,
        object_jitter=0.0,
        paired_jitter=False,
    ),
}
# The default plus flips, object jitter and soft Dice, for few training objects: over the
# foreground-diversity sweep's 3 seeds, IoU 0.883 / 0.896 / 0.901 at 6 / 20 / 100 foregrounds
# (the default, seed 0: 0.840 / 0.877 / 0.899), but on benchmarks.quality's 100-background set
# depth SSIM 0.894 and IoU 0.937 over 3 seeds (benchmarks/RESULTS.md).
RECIPES["few-objects"] = {
    **RECIPES["default"],
    "dice_weight": 1.0,
    "flip": True,
    "object_jitter": 0.95,
}
DEFAULT = RECIPES["default"]
