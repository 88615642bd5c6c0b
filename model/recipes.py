"""The training recipes' values: the one source of every model, loss and optimisation default.

``training.recipe`` turns them into train.py's options, optimizer and schedule; ``UNetConfig``
and ``LossConfig`` take their defaults from the ``default`` recipe, so that ``UNetConfig()``,
``LossConfig()``, ``TrainConfig()`` and a train.py run with no options build the same model
and loss. The table sits here, below both, because the model package may not import the
training package. Plain values only: no torch, no I/O.

``default`` is AdamW with a linear warm-up and a cosine decay sized from the run's total
steps; ``reference`` is the reference solution's recipe exactly: SGD lr 0.01 momentum 0.9,
StepLR(2 epochs, 0.1), loss ``2 * BCE + (1 - SSIM)``, the plain UNet. The measurements that
chose the default are in README.md and benchmarks/RESULTS.md.
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
        # With flip and object jitter: +0.007 IoU at 6 foregrounds, seed 0 (RESULTS.md, sweep)
        dice_weight=1.0,
        depth_weight=1.0,
        depth_l1_weight=0.0,  # measured: -0.005 IoU, -0.005 depth SSIM (benchmarks/RESULTS.md)
        depth_grad_weight=2.0,
        # measured: depth SSIM 0.919 -> 0.945, IoU 0.942 -> 0.942, means of three seeds (RESULTS.md)
        depth_aux_weight=0.5,
        diff_input=True,
        skip="add",
        context=True,
        widths=(16, 32, 64, 192, 384),
        # Unseen objects: IoU 0.840 -> 0.881 at 6 training foregrounds (floor 0.849), seed 0;
        # the foreground-diversity sweep and its ablation are in benchmarks/RESULTS.md.
        flip=True,
        object_jitter=0.95,
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
    ),
}
DEFAULT = RECIPES["default"]
