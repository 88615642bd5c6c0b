"""Training loss: weighted mask BCE and soft Dice, depth (1 - SSIM), L1, gradient L1 and the
auxiliary (deep supervision) depth maps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim
from torch import nn

from model.recipes import DEFAULT, RECIPES

# pytorch_msssim's defaults; an 11-pixel window fits the 80x80 depth map with room to spare.
SSIM_WIN_SIZE = 11
SSIM_WIN_SIGMA = 1.5


# The LossConfig fields that weigh a term, in the order the loss adds them.
LOSS_WEIGHTS = (
    "mask_weight",
    "dice_weight",
    "depth_weight",
    "depth_l1_weight",
    "depth_grad_weight",
    "depth_aux_weight",
)


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms: ``total = mask_weight * bce + dice_weight * (1 - dice)
    + depth_weight * (1 - ssim) + depth_l1_weight * l1 + depth_grad_weight * grad
    + depth_aux_weight * aux``, where ``aux`` is :func:`aux_depth_loss` of the model's
    auxiliary depth maps (``UNet.forward(x, aux=True)``).

    The defaults are the ``default`` recipe's (:mod:`model.recipes`); the reference
    solution's loss, ``2 * bce + (1 - ssim)``, is ``RECIPES["reference"]``'s.
    """

    mask_weight: float = DEFAULT["mask_weight"]
    depth_weight: float = DEFAULT["depth_weight"]
    dice_weight: float = DEFAULT["dice_weight"]
    depth_l1_weight: float = DEFAULT["depth_l1_weight"]
    depth_grad_weight: float = DEFAULT["depth_grad_weight"]
    depth_aux_weight: float = DEFAULT["depth_aux_weight"]

    def __post_init__(self) -> None:
        weights = {k: getattr(self, k) for k in LOSS_WEIGHTS}
        negative = {k: v for k, v in weights.items() if v < 0}
        if negative:
            raise ValueError(
                f"{negative} must be >= 0: a negative weight would reward the model for "
                "getting worse"
            )
        if not any(weights.values()):
            reference = RECIPES["reference"]
            raise ValueError(
                f"{', '.join(LOSS_WEIGHTS)} are all 0, so the loss is constant; set at least "
                f"one above 0 (the reference loss: mask_weight={reference['mask_weight']}, "
                f"depth_weight={reference['depth_weight']})"
            )


def gaussian_window(channels: int = 1) -> torch.Tensor:
    """1-D Gaussian window in the layout ``pytorch_msssim.ssim(win=...)`` expects."""
    coords = torch.arange(SSIM_WIN_SIZE, dtype=torch.float32) - SSIM_WIN_SIZE // 2
    g = torch.exp(-(coords**2) / (2 * SSIM_WIN_SIGMA**2))
    g = g / g.sum()
    return g.reshape(1, 1, 1, -1).repeat(channels, 1, 1, 1)  # (C, 1, 1, win)


def depth_ssim(
    depth_pred: torch.Tensor,
    depth_true: torch.Tensor,
    win: torch.Tensor | None = None,
    size_average: bool = True,
) -> torch.Tensor:
    """SSIM of depth maps in [0, 1], computed in fp32 even under autocast.

    Returns a scalar, or one value per sample when ``size_average`` is False.
    """
    if depth_pred.shape != depth_true.shape:
        raise ValueError(
            f"depth prediction {tuple(depth_pred.shape)} and target {tuple(depth_true.shape)} "
            "must have the same shape; the target depth map must be at the model's depth_size"
        )
    if min(depth_pred.shape[-2:]) < SSIM_WIN_SIZE:
        raise ValueError(
            f"depth maps of size {tuple(depth_pred.shape[-2:])} are smaller than the SSIM window "
            f"({SSIM_WIN_SIZE}); use a depth_size of at least {SSIM_WIN_SIZE}"
        )
    # SSIM divides small variances; bf16 has 8 bits of mantissa, far too few for that.
    with torch.autocast(device_type=depth_pred.device.type, enabled=False):
        return ssim(
            depth_pred.float(),
            depth_true.float(),
            data_range=1.0,
            size_average=size_average,
            win_size=SSIM_WIN_SIZE,
            win_sigma=SSIM_WIN_SIGMA,
            win=win,
        )


def depth_gradient_l1(depth_pred: torch.Tensor, depth_true: torch.Tensor) -> torch.Tensor:
    """Mean L1 of the horizontal plus the vertical neighbour differences, prediction vs target.

    It asks for the target's edges where it has them and for flatness where it is flat (the
    far wall), which SSIM's structure term punishes hard; the edges carry little weight in
    a per-pixel L1 or SSIM because they are few pixels.
    """
    p, t = depth_pred.float(), depth_true.float()
    return F.l1_loss(p.diff(dim=-1), t.diff(dim=-1)) + F.l1_loss(p.diff(dim=-2), t.diff(dim=-2))


def aux_depth_loss(
    aux_depths: Sequence[torch.Tensor],
    depth_true: torch.Tensor,
    grad_weight: float,
    win: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over the coarse depth maps of ``(1 - SSIM) + grad_weight * gradient L1`` against
    the target average-pooled to each map's size.

    A coarser map's gradient term is scaled by its size over the target's, so that a ramp,
    whose neighbour differences grow as the map shrinks, weighs as it does at full size.
    """
    total = depth_true.new_zeros(())
    for aux in aux_depths:
        aux = aux.float()
        target = F.adaptive_avg_pool2d(depth_true.float(), aux.shape[-2:])
        scale = aux.shape[-1] / depth_true.shape[-1]
        grad = depth_gradient_l1(aux, target) * scale
        total = total + (1.0 - depth_ssim(aux, target, win=win)) + grad_weight * grad
    return total


def soft_dice(mask_logits: torch.Tensor, mask_true: torch.Tensor) -> torch.Tensor:
    """Soft Dice of ``sigmoid(mask_logits)`` and the target over the whole batch, in [0, 1]."""
    prob = torch.sigmoid(mask_logits.float())
    intersection = (prob * mask_true).sum()
    # +1 on both sides: a batch with no foreground anywhere scores 1 when nothing is predicted.
    return (2 * intersection + 1) / (prob.sum() + mask_true.sum() + 1)


class MaskDepthLoss(nn.Module):
    """``mask_weight * BCEWithLogits(mask) + dice_weight * (1 - soft Dice(mask))
    + depth_weight * (1 - SSIM(depth)) + depth_l1_weight * L1(depth)
    + depth_grad_weight * depth_gradient_l1(depth) + depth_aux_weight * aux_depth_loss(aux)``.

    ``forward`` returns a dict of scalar tensors: ``objective`` (the total to backpropagate),
    ``loss`` (the same total without the auxiliary term: the loss of the model's two outputs,
    which training and evaluation both log, so the two compare) and the unweighted terms
    ``mask_bce``, ``mask_dice_loss``, ``depth_ssim_loss``, ``depth_l1``, ``depth_grad`` and
    ``depth_aux`` (0 without ``aux_depths``) for logging; every term is computed even at
    weight 0 so logs compare across recipes. Move the module to the training device so the
    SSIM window is not copied there every step.
    """

    def __init__(self, cfg: LossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else LossConfig()
        self.register_buffer("ssim_win", gaussian_window(1), persistent=False)

    def forward(
        self,
        mask_logits: torch.Tensor,
        depth_pred: torch.Tensor,
        mask_true: torch.Tensor,
        depth_true: torch.Tensor,
        aux_depths: Sequence[torch.Tensor] = (),
    ) -> dict[str, torch.Tensor]:
        """Loss terms for logits ``(B, 1, H, W)``, depth in [0, 1] ``(B, 1, h, w)`` and the
        model's auxiliary depth maps, if any (coarser, also in [0, 1])."""
        if mask_logits.shape != mask_true.shape:
            raise ValueError(
                f"mask logits {tuple(mask_logits.shape)} and target {tuple(mask_true.shape)} must "
                "have the same shape; the target mask must be at the model's mask_size"
            )
        # fp32 so the BCE of confident pixels does not round to 0 under bf16 autocast.
        mask_true = mask_true.float()
        mask_bce = F.binary_cross_entropy_with_logits(mask_logits.float(), mask_true)
        mask_dice_loss = 1.0 - soft_dice(mask_logits, mask_true)
        depth_ssim_loss = 1.0 - depth_ssim(depth_pred, depth_true, win=self.ssim_win)
        depth_l1 = F.l1_loss(depth_pred.float(), depth_true.float())
        depth_grad = depth_gradient_l1(depth_pred, depth_true)
        c = self.cfg
        total = (
            c.mask_weight * mask_bce
            + c.dice_weight * mask_dice_loss
            + c.depth_weight * depth_ssim_loss
            + c.depth_l1_weight * depth_l1
            + c.depth_grad_weight * depth_grad
        )
        depth_aux = aux_depth_loss(aux_depths, depth_true, c.depth_grad_weight, self.ssim_win)
        objective = total + c.depth_aux_weight * depth_aux if aux_depths else total
        return {
            "objective": objective,
            "loss": total,
            "mask_bce": mask_bce,
            "mask_dice_loss": mask_dice_loss,
            "depth_ssim_loss": depth_ssim_loss,
            "depth_l1": depth_l1,
            "depth_grad": depth_grad,
            "depth_aux": depth_aux,
        }
