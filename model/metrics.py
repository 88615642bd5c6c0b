"""Evaluation metrics for the mask (IoU, Dice) and the depth map (RMSE, MAE, SSIM).

Conventions, stated once because every number in a report depends on them:

- A predicted pixel is foreground when ``sigmoid(logit) > threshold`` (strictly greater,
  so with the default 0.5 a logit of exactly 0 is background). A target pixel is
  foreground when it is ``> 0.5``, so {0, 1} masks of any dtype work.
- IoU and Dice are computed over the whole evaluated set, not averaged per sample:
  ``iou = sum(I) / sum(U)`` and ``dice = 2 * sum(I) / (sum(|P|) + sum(|T|))`` over all
  pixels of all samples (of all ranks). This is what ``sklearn.metrics.jaccard_score`` and
  ``f1_score`` give on the flattened pixels.
- When the union is empty (no foreground predicted and none in the target), the prediction
  is perfect, so IoU and Dice are 1.0. sklearn returns 0.0 with a warning there instead.
- Depth RMSE is ``sqrt(mean squared error)`` and MAE the mean absolute error, both over all
  pixels. Depth SSIM is the mean of the per-sample SSIM values, so each sample counts once.
- ``per_sample`` holds the rank-local samples only; ``compute`` covers all ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from model.losses import depth_ssim, gaussian_window


class MaskDepthMetrics:
    """Accumulates mask and depth metrics over batches, on device, without host syncs.

    Args:
        threshold: probability above which a predicted pixel is foreground.
        device: where the running sums live. Use the model's device: NCCL can only
            all-reduce CUDA tensors, and keeping them there avoids a copy per batch.
    """

    def __init__(self, threshold: float = 0.5, device: torch.device | str | None = None) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(
                f"threshold={threshold} must be in [0, 1]: it is compared with sigmoid(logits), "
                "a probability"
            )
        self.threshold = threshold
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # Built once on the device: pytorch_msssim would otherwise build it on the CPU and
        # copy it over on every update, and a host-to-device copy waits for the GPU.
        self._ssim_win = gaussian_window(1).to(self.device)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        # Counts as int64 so they stay exact; error sums as float64 so millions of pixels
        # of small squared errors do not lose their low bits.
        self._counts = torch.zeros(4, dtype=torch.int64, device=self.device)
        self._sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        # Known on the host from shapes alone, so they need no device tensor until compute.
        self._samples = 0
        self._depth_pixels = 0
        self._per_sample: list[torch.Tensor] = []
        self._keys: list[str] = []

    # Slots of self._counts and self._sums.
    _INTER, _UNION, _PRED, _TRUE, _SAMPLES, _DEPTH_PIXELS = range(6)  # the last two join in compute
    _SQ_ERR, _ABS_ERR, _SSIM = range(3)

    @torch.no_grad()
    def update(
        self,
        mask_logits: torch.Tensor,
        depth_pred: torch.Tensor,
        mask_true: torch.Tensor,
        depth_true: torch.Tensor,
        keys: Sequence[str] | None = None,
    ) -> None:
        """Add one batch: logits ``(B, 1, H, W)``, depth ``(B, 1, h, w)``, and their targets.

        ``keys`` names the samples in ``per_sample``; without it they are numbered in the
        order seen on this rank.
        """
        if mask_logits.shape != mask_true.shape:
            raise ValueError(
                f"mask logits {tuple(mask_logits.shape)} and target {tuple(mask_true.shape)} "
                "must have the same shape"
            )
        if depth_pred.shape != depth_true.shape:
            raise ValueError(
                f"depth prediction {tuple(depth_pred.shape)} and target "
                f"{tuple(depth_true.shape)} must have the same shape"
            )
        batch = mask_logits.shape[0]
        if depth_pred.shape[0] != batch:
            raise ValueError(
                f"mask batch {batch} and depth batch {depth_pred.shape[0]} differ; pass the "
                "two outputs of one forward pass"
            )
        if keys is not None and len(keys) != batch:
            raise ValueError(f"got {len(keys)} keys for a batch of {batch}; pass one per sample")

        pred = torch.sigmoid(mask_logits.float()) > self.threshold
        true = mask_true > 0.5
        dims = tuple(range(1, pred.dim()))
        inter = (pred & true).sum(dim=dims)  # (B,) int64
        union = (pred | true).sum(dim=dims)
        pred_area = pred.sum(dim=dims)
        true_area = true.sum(dim=dims)

        err = depth_pred.double() - depth_true.double()
        sq_err = err.pow(2).flatten(1).sum(1)  # (B,)
        abs_err = err.abs().flatten(1).sum(1)
        ssim = depth_ssim(depth_pred, depth_true, win=self._ssim_win, size_average=False)
        ssim = ssim.double()  # (B,)

        batch_counts = torch.stack([inter.sum(), union.sum(), pred_area.sum(), true_area.sum()])
        batch_sums = torch.stack([sq_err.sum(), abs_err.sum(), ssim.sum()])
        # A no-op when the metrics live on the inputs' device (the advised setup); otherwise
        # a blocking copy, since an async device-to-host copy could be read before it lands.
        self._counts += batch_counts.to(self.device)
        self._sums += batch_sums.to(self.device)
        self._samples += batch
        self._depth_pixels += depth_pred.numel()
        pixels_per_sample = depth_pred[0].numel()
        per_sample = torch.stack(
            [
                _ratio(inter, union),
                _ratio(2 * inter, pred_area + true_area),
                (sq_err / pixels_per_sample).sqrt(),
                abs_err / pixels_per_sample,
                ssim,
            ],
            dim=1,
        )  # (B, 5)
        # Kept as tensors: turning them into floats now would sync with the device per batch.
        self._per_sample.append(per_sample.to(self.device))
        if keys is None:
            start = len(self._keys)
            keys = [f"{i:06d}" for i in range(start, start + batch)]
        self._keys.extend(str(k) for k in keys)

    def totals(self) -> torch.Tensor:
        """This rank's running sums as one float64 vector on the metrics' device: what
        :meth:`compute` sums over ranks, so that a caller can sum it in one collective
        together with its own figures (``training.evaluate`` does)."""
        host = torch.tensor([self._samples, self._depth_pixels], dtype=torch.float64)
        # Counts as float64 stay exact up to 2**53 pixels: 350 million 160x160 masks.
        return torch.cat([self._counts.double(), host.to(self.device), self._sums])

    def compute(self, totals: torch.Tensor | None = None) -> dict[str, float]:
        """Metrics over everything seen, summed over all ranks when distributed.

        ``totals``: the :meth:`totals` of every rank already summed by the caller. Without
        it, under torch.distributed every rank must call this (it all-reduces). Returns
        ``iou``, ``dice``, ``depth_rmse``, ``depth_mae``, ``depth_ssim`` and ``samples``.
        """
        if totals is None:
            totals = self.totals()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        # One sync here, once per evaluation, instead of one per batch.
        values = totals.tolist()
        samples = round(values[self._SAMPLES])
        if samples == 0:
            raise RuntimeError("no samples to compute metrics on; call update() first")
        inter, union = values[self._INTER], values[self._UNION]
        pred_area, true_area = values[self._PRED], values[self._TRUE]
        pixels = values[self._DEPTH_PIXELS]
        sums = values[self._DEPTH_PIXELS + 1 :]
        return {
            "iou": inter / union if union else 1.0,
            "dice": 2 * inter / (pred_area + true_area) if pred_area + true_area else 1.0,
            "depth_rmse": math.sqrt(sums[self._SQ_ERR] / pixels),
            "depth_mae": sums[self._ABS_ERR] / pixels,
            "depth_ssim": sums[self._SSIM] / samples,
            "samples": samples,
        }

    @property
    def per_sample(self) -> list[dict[str, float | str]]:
        """One dict per sample seen on this rank: key, iou, dice, depth_rmse, depth_mae, depth_ssim.

        Rank-local: under DDP each rank holds only the samples it evaluated. train.py
        captions the masks in results.png with these ``iou`` values.
        """
        if not self._per_sample:
            return []
        rows = torch.cat(self._per_sample).tolist()  # syncs; fine, this is read once
        names = ("iou", "dice", "depth_rmse", "depth_mae", "depth_ssim")
        return [
            {"key": key, **dict(zip(names, row, strict=True))}
            for key, row in zip(self._keys, rows, strict=True)
        ]


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator as float64, 1.0 where the denominator is 0 (both masks empty)."""
    num = numerator.double()
    den = denominator.double()
    return torch.where(den > 0, num / den.clamp(min=1), torch.ones_like(num))
