"""Evaluation: the loss parts and metrics of a model over a test loader, all ranks together.

``train.py`` runs it after every epoch and once at the end (both capped by ``--max-batches``),
and for ``--test-only``. A failure on one rank (a batch it cannot read, an exception in the
forward pass) stops every rank with the same error (:func:`training.distributed.agree`),
instead of leaving the others waiting for it in the final all-reduce.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

from model import MaskDepthMetrics
from training import figures
from training.checkpoint import TrainState
from training.distributed import Runtime, agree
from training.logger import LossTotals
from training.step import USER_ERRORS, forward_loss


@torch.no_grad()
def evaluate(
    state: TrainState, loader: Any, max_batches: int | None, rt: Runtime, preview: int = 0
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Loss parts and metrics over this rank's test batches, all-reduced over ranks, and the
    first ``preview`` samples (inputs, targets, predictions, IoU) on the CPU."""
    model = state.model.eval()
    metrics, totals = MaskDepthMetrics(threshold=0.5, device=rt.device), LossTotals(rt.device)
    shown, error = None, None
    try:  # a failure on this rank is agreed on below, before the all-reduces it would skip
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
    except Exception as e:  # agree() re-raises a bug as it is, on this rank
        error = e
    # Once per evaluation, not per batch: the batches hold no collective, so the other ranks
    # finish theirs, then every rank stops with the failing rank's line (on the gloo control
    # group: no GPU sync). In a single process: no collective, the error is raised as it is.
    agree(error, rt, user_errors=USER_ERRORS)
    result, samples = totals.means(rt)
    computed = metrics.compute()
    result.update({k: v for k, v in computed.items() if k != "samples"}, samples=samples)
    if shown is not None:  # the first samples of this rank are the first rows of per_sample
        shown["iou"] = [row["iou"] for row in metrics.per_sample[: len(shown["bg"])]]
    return result, shown
