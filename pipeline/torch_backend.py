"""The pure-PyTorch backend: webdataset tar iteration, PIL decoding, torch ops in workers.

Shards are read front to back, from local files or streamed from s3:// (``sharding.storage``);
a rank opens only the shards that hold its samples and stops reading at its last one.

It is the reference the DALI backend is tested against and the fallback where DALI does not
install (macOS, Windows). Every worker walks the same deterministic sample stream (reading tar
bytes is cheap) but decodes only the batches it owns (batch j goes to worker j % workers), so
DataLoader's round-robin collection returns batches in stream order and only the rank's
last batch can be partial, exactly as with DALI.
"""

from __future__ import annotations

import logging
import random
import tarfile
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.augment import finish_batch, noise_bank
from pipeline.config import LoaderConfig, LoaderError, resolve_threads
from pipeline.preprocess import decode
from pipeline.source import Shard
from sharding import storage
from sharding.shard_format import IMAGE_EXTS, PARTS, image_ext

log = logging.getLogger(__name__)

SUFFIXES = set(IMAGE_EXTS)


def read_samples(shards: list[Shard], start: int, stop: int) -> Iterator[dict]:
    """Samples at positions [start, stop) of the concatenated shards, as {suffix: bytes}."""
    position = 0
    for shard in shards:
        if position + shard.samples <= start or position >= stop:
            position += shard.samples  # the rank owns nothing here: skip the file unread
            continue
        try:
            # A local file, or an s3:// object streamed front to back (sharding.storage).
            with storage.open_read(shard.path) as stream:
                members = (
                    {**member, "__url__": shard.path} for member in tar_file_iterator(stream)
                )
                for sample in group_by_keys(members, suffixes=SUFFIXES):
                    if start <= position < stop:
                        missing = SUFFIXES - sample.keys()
                        if missing:
                            raise LoaderError(
                                f"{shard.path}: sample {sample['__key__']} lacks {sorted(missing)}"
                            )
                        yield sample
                    position += 1
                    if position >= stop:
                        return
        except storage.StorageError as exc:
            raise LoaderError(str(exc)) from None
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            raise LoaderError(f"{shard.path}: corrupt or truncated tar ({exc})") from exc


def buffer_shuffle(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle a stream through a buffer of ``size`` samples (as DALI's reader does)."""
    buffer = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def _decode_named(sample: dict, part: str, mode: str, size: int) -> np.ndarray:
    try:
        return decode(sample[image_ext(part)], mode, size)
    except (OSError, ValueError, SyntaxError) as exc:
        name = f"{sample['__key__']}.{image_ext(part)}"
        raise LoaderError(f"{sample['__url__']}: {name}: cannot decode ({exc})") from None


class EpochStream(IterableDataset):
    """One epoch of one rank, as finished batches; see the module docstring for the split."""

    def __init__(
        self,
        shards: list[Shard],
        span: tuple[int, int],
        channels: int,
        cfg: LoaderConfig,
        epoch: int,
        seed: int,
        shuffle: bool,
        augment: bool,
    ):
        self.shards, self.span, self.channels, self.cfg = shards, span, channels, cfg
        self.epoch, self.seed, self.shuffle, self.augment = epoch, seed, shuffle, augment

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        cfg = self.cfg
        samples = read_samples(self.shards, *self.span)
        if self.shuffle:
            samples = buffer_shuffle(samples, cfg.shuffle_buffer, random.Random(self.seed))
        bank = noise_bank(cfg.seed, "cpu") if self.augment and cfg.noise_std > 0 else None
        batch, index = [], 0
        for sample in samples:
            batch.append(sample)
            if len(batch) == cfg.batch_size:
                if index % workers == worker:
                    yield self._finish(batch, bank)
                batch, index = [], index + 1
        if batch and cfg.last_batch == "partial" and index % workers == worker:
            yield self._finish(batch, bank)

    def _finish(self, samples: list[dict], bank: torch.Tensor | None) -> dict:
        cfg = self.cfg
        mode = "RGB" if self.channels == 3 else "L"
        sizes = {"bg": cfg.image_size, "fg_bg": cfg.image_size, "mask": cfg.image_size}
        sizes["depth"] = cfg.depth_size
        raw = {}
        for part in PARTS:
            part_mode = mode if part in ("bg", "fg_bg") else "L"
            raw[part] = torch.from_numpy(
                np.stack([_decode_named(s, part, part_mode, sizes[part]) for s in samples])
            )
        keys = [s["__key__"] for s in samples]
        return finish_batch(raw, keys, cfg, self.epoch, self.augment, bank)


def iterate_epoch(
    shards: list[Shard],
    channels: int,
    cfg: LoaderConfig,
    epoch: int,
    seed: int,
    span: tuple[int, int],
    shuffle: bool,
    augment: bool,
) -> Iterator[dict]:
    """Yield finished batches for one epoch of this rank, moved to cfg.device."""
    dataset = EpochStream(shards, span, channels, cfg, epoch, seed, shuffle, augment)
    workers = resolve_threads(cfg)
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=cfg.device.startswith("cuda"),
        prefetch_factor=4 if workers else None,
    )
    device = torch.device(cfg.device)
    try:
        yield from _to_device(loader, device)
    except LoaderError as exc:
        # DataLoader re-raises a worker's error with its traceback in the message; keep the
        # error's own last line so the user sees one line naming the file.
        raise LoaderError(str(exc).strip().splitlines()[-1].removeprefix(_QUALNAME)) from None


_QUALNAME = f"{LoaderError.__module__}.{LoaderError.__name__}: "


def _to_device(loader: DataLoader, device: torch.device) -> Iterator[dict]:
    for batch in loader:
        if device.type != "cpu":
            batch = {
                k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()
            }
        yield batch
