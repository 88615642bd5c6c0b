"""``build_loader``: one entry point over the DALI and torch backends, with epoch semantics.

An epoch is a pure function of (seed, epoch): one global order of the split's samples
(``pipeline.order``), cut into global batches of ``batch_size × world_size`` that each rank
slices, so the data a run sees does not depend on how many ranks read it, and a run can stop
and resume anywhere: ``loader.epoch(e, start)`` yields exactly the rest of epoch e after
``start`` samples of its order. Both backends read the same samples through a
``pipeline.samples.SampleTable`` (local files; ``s3://`` shards go through the node-local cache,
``pipeline.cache``), and the DALI pipeline of a split is built once per loader. A remote split's
tars arrive in the background in the order this rank's batches first need them (epoch 0 from
the start once built, then the epoch and start ``epoch`` is asked for), and each batch waits
only for its own tars, so training starts before the whole split is local.

Where the batches are finished (float cast, normalisation, augmentation) is
``LoaderConfig.augment_in``: inside the DALI graph, or in torch (``pipeline.augment``); see
``resolve_augment_in``. Either way the augmentation parameters come from ``pipeline.params``.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.augment import drawn_params, finish_batch, noise_bank
from pipeline.config import LoaderConfig, LoaderError, resolve_rank
from pipeline.order import Slicing, epoch_order
from pipeline.samples import build_table
from pipeline.source import DataSource, resolve_source
from sharding.shard_format import PARTS, SPLITS

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


class Loader:
    """Batches of one split for one rank; iterate ``loader.epoch(e)`` once per epoch."""

    def __init__(self, source: DataSource, split: str, cfg: LoaderConfig, backend: str):
        self.source, self.split, self.cfg, self.backend = source, split, cfg, backend
        self.channels = source.channels
        self.rank, self.world_size = resolve_rank(cfg)
        self.shuffle = split == "train"
        self.slicing = Slicing(
            cfg.batch_size,
            self.rank,
            self.world_size,
            drop_last=self.shuffle or cfg.last_batch == "drop",
        )
        self.augment = cfg.augment and split == "train"
        self.augment_in = resolve_augment_in(cfg, backend)
        self.table = build_table(source.shards, source.fetch)
        self.total_samples = len(self.table)  # in the split, over all ranks
        self._bank = None
        self._dali = None  # pipeline.dali.DaliPipeline, built on the first epoch
        self._fetch_in_order(self.batches(0), first=False)  # a fresh run's order, until asked

    @property
    def num_samples(self) -> int:
        """Samples this rank reads in a whole epoch."""
        return sum(len(b) for b in self.batches(0))

    def __len__(self) -> int:
        """Batches this rank reads in a whole epoch: the same on every rank for training; in
        the test split a rank may get no share of a last partial global batch."""
        if self.slicing.drop_last:
            return self.slicing.steps(self.total_samples)
        return len(self.batches(0))

    def __repr__(self) -> str:
        return (
            f"Loader({self.source.origin!r}, split={self.split!r}, backend={self.backend!r}, "
            f"samples={self.total_samples}, batches={len(self)}, "
            f"rank={self.rank}/{self.world_size}, augment={self.augment}, "
            f"augment_in={self.augment_in!r})"
        )

    def order(self, epoch: int) -> np.ndarray:
        """The global order of ``epoch``: sample numbers, the same on every rank."""
        return epoch_order(self.total_samples, self.cfg.seed, epoch, self.shuffle)

    def batches(self, epoch: int, start: int = 0) -> list[np.ndarray]:
        """This rank's batches of ``epoch`` from sample ``start`` of the global order."""
        return self.slicing.batches(self.order(epoch), start)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """Yield this rank's batches of ``epoch``, after the first ``start`` samples of its
        global order; same (seed, epoch, start, global batch) -> same data."""
        if epoch < 0 or start < 0:
            raise LoaderError(f"epoch={epoch}, start={start}: both must be 0 or more")
        batches = self.batches(epoch, start)
        if not batches:
            return
        self._fetch_in_order(batches, first=True)
        if self.backend == "torch":
            from pipeline import torch_backend

            yield from torch_backend.iterate_epoch(
                self.table, batches, self.channels, self.cfg, epoch, self.augment
            )
            return
        keys = (self.table.keys_of(b) for b in batches)
        outputs = self._pipeline().epoch(batches, epoch)
        if self.augment_in == "dali":
            for batch, batch_keys in zip(outputs, keys):
                batch["key"] = batch_keys
                if self.cfg.return_params and self.augment:
                    batch["params"] = drawn_params(batch_keys, self.cfg, epoch, self.channels)
                if not batch["bg"].is_cuda:
                    # On the CPU DALI reuses its output buffers: copy, keeping NHWC memory.
                    batch.update((p, batch[p].clone()) for p in PARTS)
                yield batch
            return
        bank = self._noise_bank() if self.augment else None
        for raw, batch_keys in zip(outputs, keys):
            yield finish_batch(raw, batch_keys, self.cfg, epoch, self.augment, bank)

    def _fetch_in_order(self, batches: list[np.ndarray], first: bool) -> None:
        """Have the tars still on their way fetched in the order ``batches`` first need them;
        ``first``: before those of this process's other loaders (the epoch being read)."""
        fetch = self.source.fetch
        if fetch is not None and not fetch.complete and batches:
            fetch.prioritise(self.table.shards_of(np.concatenate(batches)), first=first)

    def _pipeline(self):
        if self._dali is None:
            from pipeline import dali  # defer the DALI import: `import pipeline` works without it

            spec = dali.graph_spec(
                self.cfg,
                self.channels,
                self.source.sizes,
                float_out=self.augment_in == "dali",
                augment=self.augment,
            )
            self._dali = dali.DaliPipeline(self.table, spec, self.cfg, seed=self.cfg.seed)
        return self._dali

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
    rank = resolve_rank(cfg)[0]
    # Remote tars keep arriving in the background; the download's bar is rank 0's.
    data = resolve_source(
        source, split, cfg.cache_dir, cfg.cache_limit, prefetch=True, progress=rank == 0
    )
    try:
        loader = Loader(data, split, cfg, backend)
        if len(loader) == 0:
            raise LoaderError(
                f"{data.origin}: split {split!r} has {loader.total_samples} samples, fewer "
                f"than one global batch of {cfg.batch_size} x {loader.world_size} ranks; "
                "lower the batch size"
            )
    except BaseException:
        if data.fetch is not None:
            data.fetch.cancel()  # refused: fetch no more of it
        raise
    if backend == "dali" and cfg.device == "cpu":
        keep_freed_batch_memory()
    log.info("%r", loader)
    return loader
