"""``build_loader``: one entry point over the DALI and torch backends, with epoch semantics.

An epoch is a pure function of (seed, epoch, shard_id): the shard order is permuted with
(seed, epoch) identically on every rank, each rank takes its contiguous slice of the samples
in that order (DALI's sharding rule), and shuffles within it with a seed from
(seed, epoch, shard_id). Each train ``epoch(e)`` starts from a fresh pipeline, so a resumed run
sees the same data as an uninterrupted one; the test split, never shuffled or augmented, keeps
its DALI pipeline and resets it between evaluations, which gives the same batches.

Where the batches are finished (float cast, normalisation, augmentation) is
``LoaderConfig.augment_in``: inside the DALI graph, or in torch (``pipeline.augment``); see
``resolve_augment_in``.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.augment import finish_batch, noise_bank
from pipeline.config import LoaderConfig, LoaderError, resolve_shard
from pipeline.source import DataSource, resolve_source
from sharding.shard_format import SPLITS

log = logging.getLogger(__name__)


def dali_available() -> bool:
    """True when nvidia.dali can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


_MALLOC_TUNED = False


def keep_freed_batch_memory() -> None:
    """Stop glibc from unmapping freed batch buffers, once per process (Linux/glibc only).

    Each RGB batch allocates ~30 MB float tensors; by default glibc maps and unmaps them every
    batch, and the first write to each page then faults: ~9,900 page faults per RGB batch,
    43 -> 28 ms of post-processing per 100 samples when they are reused (measured). Freed
    memory stays in the heap for reuse instead (up to 256 MB kept).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        # 32 MB is the largest threshold glibc accepts on 64-bit.
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 256 << 20)
    except (OSError, AttributeError):
        ok = False  # not glibc (e.g. musl): nothing to tune
    log.info("glibc malloc tuned to keep freed batch buffers: %s", bool(ok))


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers, stable across processes and Python versions."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def resolve_augment_in(cfg: LoaderConfig, backend: str) -> str:
    """Where batches are finished: "dali" (in the DALI graph) or "torch" (pipeline.augment).

    "auto" picks DALI's graph for the DALI backend on CUDA, where its GPU operators overlap the
    training step; on the CPU the fused torch ops measured faster than DALI's CPU operators.
    """
    if cfg.augment_in == "dali" and backend != "dali":
        raise LoaderError(
            f"augment_in='dali' needs the DALI backend, but the backend is {backend!r} "
            "(the torch backend always augments in torch); use augment_in='auto' or 'torch'"
        )
    if cfg.augment_in == "auto":
        return "dali" if backend == "dali" and cfg.device.startswith("cuda") else "torch"
    return cfg.augment_in


def shard_span(total: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """[start, stop) of this rank's samples; DALI's rule, so both backends split alike."""
    return total * shard_id // num_shards, total * (shard_id + 1) // num_shards


class Loader:
    """Batches of one split for one rank; iterate ``loader.epoch(e)`` once per epoch."""

    def __init__(self, source: DataSource, split: str, cfg: LoaderConfig, backend: str):
        self.source, self.split, self.cfg, self.backend = source, split, cfg, backend
        self.channels = source.channels
        self.shard_id, self.num_shards = resolve_shard(cfg)
        start, stop = shard_span(source.num_samples, self.shard_id, self.num_shards)
        self.num_samples = stop - start
        self.augment = cfg.augment and split == "train"
        self.shuffle = split == "train"
        self.augment_in = resolve_augment_in(cfg, backend)
        self._bank = None
        self._dali = None  # pipeline.dali.DaliEpochs, made on the first epoch

    def __len__(self) -> int:
        if self.cfg.last_batch == "drop":
            return self.num_samples // self.cfg.batch_size
        return -(-self.num_samples // self.cfg.batch_size)

    def __repr__(self) -> str:
        return (
            f"Loader({self.source.origin!r}, split={self.split!r}, backend={self.backend!r}, "
            f"samples={self.num_samples}, batches={len(self)}, "
            f"shard={self.shard_id}/{self.num_shards}, augment={self.augment}, "
            f"augment_in={self.augment_in!r})"
        )

    def shard_order(self, epoch: int) -> list:
        """The shards in this epoch's order, the same on every rank."""
        shards = list(self.source.shards)
        if self.shuffle:
            order = np.random.default_rng(derive_seed(self.cfg.seed, epoch)).permutation(
                len(shards)
            )
            shards = [shards[i] for i in order]
        return shards

    def epoch(self, epoch: int) -> Iterator[dict]:
        """Yield this rank's batches for ``epoch``; same (seed, epoch, shard) -> same batches."""
        if epoch < 0:
            raise LoaderError(f"epoch={epoch} must be 0 or more")
        shards = self.shard_order(epoch)
        seed = derive_seed(self.cfg.seed, epoch, self.shard_id)
        if self.backend == "torch":
            from pipeline import torch_backend

            span = shard_span(self.source.num_samples, self.shard_id, self.num_shards)
            yield from torch_backend.iterate_epoch(
                shards, self.channels, self.cfg, epoch, seed, span, self.shuffle, self.augment
            )
            return
        from pipeline import dali  # defer the DALI import: `import pipeline` works without it

        if self._dali is None:
            graph = dali.Graph(
                channels=self.channels,
                sizes=self.source.sizes,
                shard=(self.shard_id, self.num_shards),
                shuffle=self.shuffle,
                fill=max(1, min(self.cfg.shuffle_buffer, self.num_samples)),
                in_graph=self.augment_in == "dali",
                augment=self.augment,
                cfg=self.cfg,
            )
            self._dali = dali.DaliEpochs(graph, self.num_samples, self.source.num_samples)
        batches = self._dali.epoch(shards, seed)
        if self.augment_in == "dali":
            yield from batches  # already the model's batch, made on the pipeline's device
            return
        bank = self._noise_bank() if self.augment else None
        for raw in batches:
            keys = raw.pop("key")
            yield finish_batch(raw, keys, self.cfg, epoch, self.augment, bank)

    def _noise_bank(self) -> torch.Tensor | None:
        if self._bank is None and self.cfg.noise_std > 0:
            self._bank = noise_bank(self.cfg.seed, self.cfg.device)
        return self._bank


def build_loader(source: str | os.PathLike, split: str, cfg: LoaderConfig) -> Loader:
    """A loader over a dataset directory (with manifest.json) or a shard URL such as
    'DIR/train-{000000..000003}.tar'; augmentation only ever applies to split "train"."""
    if split not in SPLITS:
        raise LoaderError(f"split={split!r} is not one of {SPLITS}")
    backend = cfg.backend
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
    elif backend == "dali" and not dali_available():
        raise LoaderError(
            "backend='dali' but nvidia.dali is not installed; "
            "pip install nvidia-dali-cuda120, or use backend='torch'"
        )
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise LoaderError(f"device={cfg.device!r} but CUDA is not available; use device='cpu'")
    if cfg.augment_in == "dali" and backend == "torch" and cfg.backend == "auto":
        raise LoaderError(
            "augment_in='dali' but nvidia.dali is not installed (backend='auto' chose torch); "
            "pip install nvidia-dali-cuda120, or use augment_in='auto'"
        )
    resolve_augment_in(cfg, backend)  # fail on a bad combination before reading anything
    data = resolve_source(source, split)
    loader = Loader(data, split, cfg, backend)
    if backend == "dali" and cfg.device == "cpu":
        keep_freed_batch_memory()
    if loader.num_samples == 0:
        raise LoaderError(
            f"{data.origin}: rank {loader.shard_id} of {loader.num_shards} gets no samples "
            f"of split {split!r} ({data.num_samples} in all)"
        )
    log.info("%r", loader)
    return loader
