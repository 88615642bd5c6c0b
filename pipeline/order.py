"""The sample order: one permutation per (seed, epoch), cut into global batches, sliced by rank.

Order is data here, not a side effect of a reader. A split's samples are numbered 0..N-1 in
the manifest's shard order (``pipeline.samples.SampleTable``). For each (seed, epoch) the train
split is one permutation of those numbers, the same on every rank and for every world size;
the test split keeps them in order. The order is cut into *global batches* of
``batch_size × world_size`` samples, and rank r takes the r-th slice of each. So:

- the ranks' batches of one step, joined in rank order, are exactly the batch a single process
  with the same global batch would see, and both backends read the same order;
- every rank takes the same number of steps (train drops the last partial global batch), so
  DDP needs no ``Join``;
- resuming is an offset: ``start`` counts the samples of the global order already consumed,
  and the rest of the epoch is the same whatever the world size, as long as the global batch
  is the same (mosaicml-streaming calls this elastic determinism).

The test split keeps its last partial global batch and splits it as evenly as the ranks allow,
so every test sample is evaluated exactly once whatever the world size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers, stable across processes and Python versions."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The global order of one epoch: a permutation of range(num_samples) per (seed, epoch),
    or range(num_samples) itself when not shuffled."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    rng = np.random.default_rng(derive_seed(seed, epoch))
    return rng.permutation(num_samples).astype(np.int64)


@dataclass(frozen=True)
class Slicing:
    """How one rank cuts the global order: ``batch_size`` per rank, ``world_size`` ranks."""

    batch_size: int
    rank: int = 0
    world_size: int = 1
    drop_last: bool = True  # drop the last partial global batch (always, for training)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"batch_size={self.batch_size}, rank={self.rank}, world_size={self.world_size}: "
                "need batch_size >= 1 and 0 <= rank < world_size"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def end(self, num_samples: int) -> int:
        """Where an epoch's order stops: past the last whole global batch when dropping."""
        if self.drop_last:
            return num_samples // self.global_batch * self.global_batch
        return num_samples

    def steps(self, num_samples: int, start: int = 0) -> int:
        """Batches every rank takes from sample ``start`` of the order to the epoch's end."""
        rest = max(0, self.end(num_samples) - start)
        if self.drop_last:
            return rest // self.global_batch
        return -(-rest // self.global_batch)

    def batches(self, order: np.ndarray, start: int = 0) -> list[np.ndarray]:
        """This rank's batches of ``order`` from global position ``start``: sample numbers.

        A partial last global batch (kept only without ``drop_last``) is split evenly:
        rank r takes ``[n*r//W, n*(r+1)//W)`` of its n samples, which for a whole global batch
        is ``[r*B, (r+1)*B)``; a rank whose share is empty gets no batch there.
        """
        if start < 0:
            raise ValueError(f"start={start} must be 0 or more")
        size, w, r = self.global_batch, self.world_size, self.rank
        out = []
        for step in range(self.steps(len(order), start)):
            chunk = order[start + step * size : start + (step + 1) * size]
            n = len(chunk)
            piece = chunk[n * r // w : n * (r + 1) // w]
            if len(piece):
                out.append(piece)
        return out
