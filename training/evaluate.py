"""Evaluation: the loss parts and metrics of a model over a test loader, all ranks together.

``train.py`` runs it once after every epoch (capped by ``--max-batches``), and once for
``--test-only``; the last epoch's is the run's final result. Each rank accumulates its
figures on the device and the ranks sum them in one collective at the end, which also
carries the failure flags: a failure on one rank (a batch it cannot read, an exception in
the forward pass) stops every rank with the same error
(:func:`training.distributed.agree_and_sum`) instead of leaving the others waiting for it.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

from model import MaskDepthMetrics
from training import figures
from training.checkpoint import TrainState
from training.distributed import Runtime, agree_and_sum
from training.logger import LossTotals
from training.step import TEST_LOSS_PARTS, USER_ERRORS, forward_loss


@torch.no_grad()
def evaluate(
    state: TrainState, loader: Any, max_batches: int | None, rt: Runtime, preview: int = 0
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Loss parts and metrics over this rank's test batches, summed over ranks, and the
    first ``preview`` samples (inputs, targets, predictions, IoU) on the CPU."""
    model = state.model.eval()
    metrics = MaskDepthMetrics(threshold=0.5, device=rt.device)
    totals = LossTotals(rt.device, TEST_LOSS_PARTS)
    shown, error = None, None
    try:  # a failure on this rank is agreed on below, in the one collective it would skip
        # The test split is read the same each time: always its epoch 0.
        iterator, total = iter(loader.epoch(0)), min(len(loader), max_batches or len(loader))
        bar = tqdm(range(total), desc="test", unit="batch", leave=False, disable=not rt.is_main)
        with bar:  # closed on errors too, so a message is not glued to a half-drawn bar
            for _ in bar:
                batch = next(iterator, None)
                if batch is None:
                    break
                out = forward_loss(model, state.loss_fn, batch, rt)
                metrics.update(
                    out.mask_logits, out.depth_pred, out.mask, out.depth, batch.get("key")
                )
                totals.add(out.losses, out.samples)
                if shown is None and preview:
                    shown = figures.preview_samples(batch, out, preview)
    except Exception as e:  # agree_and_sum() re-raises a bug as it is, on this rank
        error = e
    # Once per evaluation, not per batch: the batches hold no collective, so the other ranks
    # finish theirs, then every rank stops with the failing rank's line. In a single
    # process: no collective, the error is raised as it is.
    mine = torch.cat([totals.sums.double(), metrics.totals()])
    _, summed = agree_and_sum(mine, error, rt, user_errors=USER_ERRORS)
    split = len(totals.sums)
    result, samples = totals.means(summed[:split])
    computed = metrics.compute(summed[split:])
    result.update({k: v for k, v in computed.items() if k != "samples"}, samples=samples)
    if shown is not None:  # the first samples of this rank are the first rows of per_sample
        shown["iou"] = [row["iou"] for row in metrics.per_sample[: len(shown["bg"])]]
    return result, shown
