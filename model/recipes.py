"""The training recipes' values: the one source of every model, loss and optimisation default.

``training.recipe`` turns them into train.py's options, optimizer and schedule; ``UNetConfig``
and ``LossConfig`` take their defaults from the ``default`` recipe, so that ``UNetConfig()``,
``LossConfig()``, ``TrainConfig()`` and a train.py run with no options build the same model
and loss. The table sits here, below both, because the model package may not import the
training package. Plain values only: no torch, no I/O.

``default`` is AdamW with a linear warm-up and a cosine decay sized from the run's total
steps, with bg and fg_bg jittered alike (``paired_jitter``); ``reference`` is the reference
solution's recipe exactly: SGD lr 0.01 momentum 0.9, StepLR(2 epochs, 0.1), loss
``2 * BCE + (1 - SSIM)``, the plain UNet, its jitter drawn apart for bg and fg_bg;
``few-objects`` is the default with flips, object jitter and soft Dice, for training sets with
few foreground objects. The measurements that chose them are in README.md and
benchmarks/RESULTS.md.
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
        # measured: sweep IoU 0.916 / 0.928 / 0.940 over 3 seeds; drawn apart, 0.854 at 6
        # foregrounds (floor 0.849) and 0.942 / 0.934 on benchmarks.quality's set (RESULTS.md)
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
# The default plus flips, object jitter and soft Dice, for few training objects. On the
# foreground-diversity sweep at seed 0, IoU 0.925 / 0.934 / 0.943 at 6 / 20 / 100 foregrounds
# against the default's 0.918 / 0.931 / 0.941: less than the seeds' spread; and on
# benchmarks.quality's set depth SSIM 0.916 against 0.950, 3 seeds (benchmarks/RESULTS.md).
RECIPES["few-objects"] = {
    **RECIPES["default"],
    "dice_weight": 1.0,
    "flip": True,
    "object_jitter": 0.95,
}
DEFAULT = RECIPES["default"]
