"""The global order (pipeline.order) and the loaders that follow it, on any world size.

Properties of the slicing are checked with Hypothesis on plain integers; the loaders are then
checked on the tiny shards with both backends, so that what the properties promise is what
training reads.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import LoaderConfig, build_loader
from pipeline.loader import dali_available
from pipeline.order import Slicing, epoch_order

BACKENDS = ["dali", "torch"] if dali_available() else ["torch"]


def rank_batches(n: int, batch: int, world: int, drop: bool, start: int, order) -> list:
    return [Slicing(batch, r, world, drop).batches(order, start) for r in range(world)]


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(0, 200),
    batch=st.integers(1, 9),
    world=st.sampled_from([1, 2, 3, 4]),
    drop=st.booleans(),
    seed=st.integers(0, 5),
    epoch=st.integers(0, 5),
    start_steps=st.integers(0, 30),
    offset=st.integers(0, 3),
)
def test_ranks_joined_are_the_single_process_batches(
    n, batch, world, drop, seed, epoch, start_steps, offset
):
    order = epoch_order(n, seed, epoch, shuffle=True)
    start = start_steps * batch * world + offset
    ranks = rank_batches(n, batch, world, drop, start, order)
    single = Slicing(batch * world, 0, 1, drop).batches(order, start)
    if drop:  # training: every rank takes the same number of steps
        assert len({len(r) for r in ranks}) == 1
        assert all(len(b) == batch for r in ranks for b in r)
    steps = max(len(r) for r in ranks)
    assert steps == len(single)
    for step in range(steps):
        joined = np.concatenate([r[step] for r in ranks if step < len(r)])
        np.testing.assert_array_equal(joined, single[step])
    read = np.concatenate([*single, np.empty(0, dtype=np.int64)])
    assert len(set(read.tolist())) == len(read)  # nothing twice
    if not drop:  # evaluation: every sample from start on, exactly once
        np.testing.assert_array_equal(read, order[start:])
    else:
        assert len(read) == (max(0, (n // (batch * world)) * batch * world - start)) // (
            batch * world
        ) * (batch * world)


@given(n=st.integers(1, 300), seed=st.integers(0, 9), epoch=st.integers(0, 9))
def test_the_order_is_a_permutation_per_seed_and_epoch(n, seed, epoch):
    order = epoch_order(n, seed, epoch, shuffle=True)
    assert sorted(order.tolist()) == list(range(n))
    np.testing.assert_array_equal(order, epoch_order(n, seed, epoch, shuffle=True))
    np.testing.assert_array_equal(epoch_order(n, seed, epoch, shuffle=False), np.arange(n))


def test_orders_differ_between_epochs_and_seeds():
    first = epoch_order(1000, 0, 0, shuffle=True)
    assert not np.array_equal(first, epoch_order(1000, 0, 1, shuffle=True))
    assert not np.array_equal(first, epoch_order(1000, 1, 0, shuffle=True))


def test_slicing_refuses_a_bad_rank():
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        Slicing(4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="start=-1"):
        Slicing(4).batches(np.arange(10), start=-1)


# ----------------------------------------------------------------------------- the loaders


def keys_per_step(data, split: str, cfg: LoaderConfig, world: int, epoch: int, start: int = 0):
    """Per step, the keys of every rank joined in rank order."""
    per_rank = []
    for rank in range(world):
        loader = build_loader(data, split, replace(cfg, rank=rank, world_size=world))
        per_rank.append([b["key"] for b in loader.epoch(epoch, start)])
    steps = max(len(r) for r in per_rank)
    return [[k for r in per_rank if s < len(r) for k in r[s]] for s in range(steps)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_any_world_size_reads_the_single_process_order(backend, split, tiny_shards):
    """W = 1, 2 and 4 ranks with the same global batch (8): the same keys at every step, on
    both backends, and the test split evaluates every sample exactly once."""
    cfg = LoaderConfig(backend=backend, augment=False, num_threads=1, seed=5)
    single = keys_per_step(tiny_shards, split, replace(cfg, batch_size=8), 1, epoch=1)
    assert sum(len(k) for k in single) == 32 and len({k for s in single for k in s}) == 32
    for world in (2, 4):
        batch = 8 // world
        assert keys_per_step(tiny_shards, split, replace(cfg, batch_size=batch), world, 1) == single
    if split == "test":
        # 32 samples in global batches of 12: the last 8 are split evenly over 4 ranks
        uneven = keys_per_step(tiny_shards, split, replace(cfg, batch_size=3), 4, epoch=0)
        assert [len(s) for s in uneven] == [12, 12, 8]
        flat = [k for step in uneven for k in step]
        assert flat == [k for step in single for k in step]  # in order, each once


def test_both_backends_read_the_same_order(tiny_shards):
    if len(BACKENDS) < 2:
        pytest.skip("nvidia.dali not installed")
    cfg = LoaderConfig(augment=False, num_threads=1, seed=2, batch_size=4, rank=1, world_size=2)
    dali, torch_keys = (
        [b["key"] for b in build_loader(tiny_shards, "train", replace(cfg, backend=be)).epoch(3)]
        for be in ("dali", "torch")
    )
    assert dali == torch_keys and len(dali) == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_from_start_yields_exactly_the_rest(backend, tiny_shards):
    cfg = LoaderConfig(backend=backend, num_threads=1, seed=1, batch_size=4, noise_std=0.0)
    loader = build_loader(tiny_shards, "train", cfg)
    whole = [(b["key"], b["bg"]) for b in loader.epoch(2)]
    for start in (0, 8, 28, 32):
        rest = [(b["key"], b["bg"]) for b in loader.epoch(2, start)]
        assert [k for k, _ in rest] == [k for k, _ in whole[start // 4 :]]
        for (_, got), (_, expected) in zip(rest, whole[start // 4 :]):
            assert (got - expected).abs().max() == 0  # the same augmentation, per key
    assert len(loader) == 8 and loader.num_samples == 32
