"""MaskDepthMetrics against sklearn, hand-worked cases, and a two-rank gloo all-reduce."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_msssim import ssim
from sklearn.metrics import f1_score, jaccard_score

from model import MaskDepthMetrics

BIG = 30.0  # a logit whose sigmoid is 1.0 (or 0.0 when negated) in float32


def logits_from(mask: torch.Tensor) -> torch.Tensor:
    """Confident logits that binarise to ``mask`` at any threshold in (0, 1)."""
    return torch.where(mask.bool(), BIG, -BIG)


def random_batch(batch: int, seed: int, mask_size: int = 32, depth_size: int = 16):
    generator = torch.Generator().manual_seed(seed)
    mask_logits = torch.randn(batch, 1, mask_size, mask_size, generator=generator)
    mask_true = (torch.rand(batch, 1, mask_size, mask_size, generator=generator) > 0.6).float()
    depth_pred = torch.rand(batch, 1, depth_size, depth_size, generator=generator)
    depth_true = torch.rand(batch, 1, depth_size, depth_size, generator=generator)
    return mask_logits, depth_pred, mask_true, depth_true


def test_iou_and_dice_match_sklearn():
    metrics = MaskDepthMetrics()
    batches = [random_batch(3, seed) for seed in range(3)]
    for batch in batches:
        metrics.update(*batch)
    result = metrics.compute()
    pred = np.concatenate([(torch.sigmoid(b[0]) > 0.5).flatten().numpy() for b in batches])
    true = np.concatenate([b[2].flatten().numpy() for b in batches]).astype(bool)
    assert result["iou"] == pytest.approx(jaccard_score(true, pred), abs=1e-12)
    assert result["dice"] == pytest.approx(f1_score(true, pred), abs=1e-12)
    assert result["samples"] == 9


def test_hand_worked_iou_and_dice():
    # Sample 1: pred {0,1}, true {1,2}: I=1, U=3. Sample 2: pred {0}, true {0}: I=1, U=1.
    pred = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]).reshape(2, 1, 2, 2)
    true = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]]).reshape(2, 1, 2, 2)
    depth = torch.zeros(2, 1, 11, 11)
    metrics = MaskDepthMetrics()
    metrics.update(logits_from(pred), depth, true, depth, keys=["a", "b"])
    result = metrics.compute()
    # Over the set: I = 2, U = 4, |P| + |T| = 3 + 3.
    assert result["iou"] == pytest.approx(2 / 4)
    assert result["dice"] == pytest.approx(4 / 6)
    rows = metrics.per_sample
    assert [r["key"] for r in rows] == ["a", "b"]
    assert rows[0]["iou"] == pytest.approx(1 / 3) and rows[0]["dice"] == pytest.approx(2 / 4)
    assert rows[1]["iou"] == 1.0 and rows[1]["dice"] == 1.0


def test_empty_masks():
    depth = torch.zeros(2, 1, 11, 11)
    empty = torch.zeros(2, 1, 4, 4)
    full = torch.ones(2, 1, 4, 4)

    both_empty = MaskDepthMetrics()
    both_empty.update(logits_from(empty), depth, empty, depth)
    result = both_empty.compute()
    assert result["iou"] == 1.0 and result["dice"] == 1.0
    assert all(r["iou"] == 1.0 and r["dice"] == 1.0 for r in both_empty.per_sample)

    missed = MaskDepthMetrics()
    missed.update(logits_from(empty), depth, full, depth)
    result = missed.compute()
    assert result["iou"] == 0.0 and result["dice"] == 0.0

    hallucinated = MaskDepthMetrics()
    hallucinated.update(logits_from(full), depth, empty, depth)
    assert hallucinated.compute()["iou"] == 0.0
    assert all(r["iou"] == 0.0 for r in hallucinated.per_sample)

    # One empty sample does not count as a perfect one in the set-level score.
    mixed = MaskDepthMetrics()
    mixed.update(logits_from(empty[:1]), depth[:1], empty[:1], depth[:1])
    mixed.update(logits_from(empty[:1]), depth[:1], full[:1], depth[:1])
    assert mixed.compute()["iou"] == 0.0


def test_threshold_applies_to_probabilities():
    # Probabilities 0.3, 0.5 (logit 0), 0.6, 0.9 against an all-foreground target.
    probs = torch.tensor([0.3, 0.5, 0.6, 0.9])
    logits = torch.logit(probs).reshape(1, 1, 2, 2)
    true = torch.ones(1, 1, 2, 2)
    depth = torch.zeros(1, 1, 11, 11)

    def iou_at(threshold: float) -> float:
        metrics = MaskDepthMetrics(threshold=threshold)
        metrics.update(logits, depth, true, depth)
        return metrics.compute()["iou"]

    assert iou_at(0.5) == pytest.approx(2 / 4)  # 0.5 itself is not above 0.5
    assert iou_at(0.55) == pytest.approx(2 / 4)
    assert iou_at(0.7) == pytest.approx(1 / 4)
    assert iou_at(0.2) == pytest.approx(4 / 4)
    with pytest.raises(ValueError, match=r"threshold=1\.5"):
        MaskDepthMetrics(threshold=1.5)


def test_many_updates_equal_one_big_update():
    batches = [random_batch(n, seed) for seed, n in enumerate([1, 4, 2])]
    piecewise = MaskDepthMetrics()
    for batch in batches:
        piecewise.update(*batch)
    whole = MaskDepthMetrics()
    whole.update(*(torch.cat(parts) for parts in zip(*batches, strict=True)))
    split, joined = piecewise.compute(), whole.compute()
    assert split.keys() == joined.keys()
    # Counts and float64 error sums are exact; SSIM runs in fp32 convs, whose rounding can
    # differ with the batch size.
    for key in joined:
        rel = 1e-6 if key == "depth_ssim" else 1e-12
        assert split[key] == pytest.approx(joined[key], rel=rel), key
    for row_split, row_joined in zip(piecewise.per_sample, whole.per_sample, strict=True):
        assert row_split.pop("key") == row_joined.pop("key")
        assert row_split == pytest.approx(row_joined, rel=1e-6)
    assert len(piecewise.per_sample) == 7


def test_depth_errors_and_ssim():
    mask_logits, depth_pred, mask_true, depth_true = random_batch(4, seed=7)
    metrics = MaskDepthMetrics()
    metrics.update(mask_logits, depth_pred, mask_true, depth_true)
    result = metrics.compute()
    err = (depth_pred.double() - depth_true.double()).numpy()
    assert result["depth_rmse"] == pytest.approx(math.sqrt((err**2).mean()), rel=1e-9)
    assert result["depth_mae"] == pytest.approx(np.abs(err).mean(), rel=1e-9)
    per_sample_ssim = ssim(depth_pred, depth_true, data_range=1.0, size_average=False)
    assert result["depth_ssim"] == pytest.approx(per_sample_ssim.mean().item(), rel=1e-6)
    rows = metrics.per_sample
    assert [r["depth_ssim"] for r in rows] == pytest.approx(per_sample_ssim.tolist(), rel=1e-6)
    sample_rmse = math.sqrt((err[0] ** 2).mean())
    assert rows[0]["depth_rmse"] == pytest.approx(sample_rmse, rel=1e-9)

    perfect = MaskDepthMetrics()
    perfect.update(mask_logits, depth_true, mask_true, depth_true)
    result = perfect.compute()
    assert result["depth_rmse"] == 0.0 and result["depth_mae"] == 0.0
    assert result["depth_ssim"] == pytest.approx(1.0, abs=1e-5)


def test_ssim_weights_each_sample_once():
    # Batches of 1 and 3 samples: the mean is over 4 samples, not over 2 batch means.
    batches = [random_batch(1, 1), random_batch(3, 2)]
    metrics = MaskDepthMetrics()
    for batch in batches:
        metrics.update(*batch)
    values = torch.cat([ssim(b[1], b[3], data_range=1.0, size_average=False) for b in batches])
    assert metrics.compute()["depth_ssim"] == pytest.approx(values.mean().item(), rel=1e-6)


def test_keys_default_to_running_numbers_and_reset_clears():
    metrics = MaskDepthMetrics()
    metrics.update(*random_batch(2, 0))
    metrics.update(*random_batch(1, 1))
    assert [r["key"] for r in metrics.per_sample] == ["000000", "000001", "000002"]
    metrics.reset()
    assert metrics.per_sample == []
    with pytest.raises(RuntimeError, match="call update"):
        metrics.compute()


def test_update_rejects_mismatched_inputs():
    mask_logits, depth_pred, mask_true, depth_true = random_batch(2, 0)
    metrics = MaskDepthMetrics()
    with pytest.raises(ValueError, match="mask logits"):
        metrics.update(mask_logits, depth_pred, mask_true[:, :, :8], depth_true)
    with pytest.raises(ValueError, match="depth prediction"):
        metrics.update(mask_logits, depth_pred, mask_true, depth_true[:1])
    with pytest.raises(ValueError, match="got 1 keys for a batch of 2"):
        metrics.update(mask_logits, depth_pred, mask_true, depth_true, keys=["only-one"])


def test_accepts_bool_and_uint8_targets():
    mask_logits, depth_pred, mask_true, depth_true = random_batch(2, 3)
    results = []
    for target in (mask_true, mask_true.bool(), mask_true.to(torch.uint8)):
        metrics = MaskDepthMetrics()
        metrics.update(mask_logits, depth_pred, target, depth_true)
        results.append(metrics.compute())
    assert results[0] == results[1] == results[2]


def _rank_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        metrics = MaskDepthMetrics()
        # Rank r sees batches r, r + 2, ...: together the ranks see batches 0..3.
        for seed in range(rank, 4, world_size):
            metrics.update(*random_batch(seed + 1, seed))
        result = metrics.compute()
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"result": result, "local": len(metrics.per_sample)}, f)
    finally:
        dist.destroy_process_group()


def test_compute_all_reduces_over_gloo_ranks(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = MaskDepthMetrics()
    for seed in range(4):
        single.update(*random_batch(seed + 1, seed))
    expected = single.compute()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        for key, value in expected.items():
            assert rank["result"][key] == pytest.approx(value, rel=1e-9), key
    # per_sample stays rank-local: batches of 1 + 3 and 2 + 4 samples.
    assert [rank["local"] for rank in ranks] == [4, 6]
