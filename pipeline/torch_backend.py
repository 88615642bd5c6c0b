"""The pure-PyTorch backend: the same order and the same bytes as DALI, decoded with PIL.

It is the reference the DALI backend is tested against and the fallback where DALI does not
install (macOS, Windows). Each epoch is this rank's batches of the global order
(``pipeline.order``); DataLoader workers take whole batches by number, read their samples from
the memory-mapped tars (``pipeline.samples``), decode them and finish them in torch
(``pipeline.augment``), and DataLoader returns the batches in order.

While remote tars are still arriving (``pipeline.cache``), a worker waits for the tars of its
batch by their verified stamps on disk, and the main process waits for them before it takes
each batch: so an error of the background fetch is raised here, as its own one line, and never
left to a worker that cannot see the fetching threads.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.augment import finish_batch, noise_bank
from pipeline.config import LoaderConfig, LoaderError, resolve_threads
from pipeline.preprocess import decode
from pipeline.samples import SampleTable
from sharding.shard_format import IMAGE_EXTS, PARTS

log = logging.getLogger(__name__)


class EpochBatches(Dataset):
    """Batch i of one epoch of one rank, decoded and finished."""

    def __init__(
        self,
        table: SampleTable,
        batches: list[np.ndarray],
        channels: int,
        cfg: LoaderConfig,
        epoch: int,
        augment: bool,
    ):
        self.table, self.batches, self.channels, self.cfg = table, batches, channels, cfg
        self.epoch, self.augment = epoch, augment
        self._bank = None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        cfg, indices = self.cfg, self.batches[i]
        mode = "RGB" if self.channels == 3 else "L"
        sizes = {"bg": cfg.image_size, "fg_bg": cfg.image_size, "mask": cfg.image_size}
        sizes["depth"] = cfg.depth_size
        streams = self.table.encoded(indices)
        raw = {}
        for p, part in enumerate(PARTS):
            part_mode = mode if part in ("bg", "fg_bg") else "L"
            images = []
            for n, data in zip(indices.tolist(), streams[p]):
                try:
                    images.append(decode(data.tobytes(), part_mode, sizes[part]))
                except (OSError, ValueError, SyntaxError) as exc:
                    where = f"{self.table.where(n)}: {IMAGE_EXTS[p]}"
                    raise LoaderError(f"{where}: cannot decode ({exc})") from None
            raw[part] = torch.from_numpy(np.stack(images))
        keys = self.table.keys_of(indices)
        return finish_batch(raw, keys, cfg, self.epoch, self.augment, self._noise())

    def _noise(self) -> torch.Tensor | None:
        if self._bank is None and self.augment and self.cfg.noise_std > 0:
            self._bank = noise_bank(self.cfg.seed, "cpu")  # made once per worker
        return self._bank


def iterate_epoch(
    table: SampleTable,
    batches: list[np.ndarray],
    channels: int,
    cfg: LoaderConfig,
    epoch: int,
    augment: bool,
) -> Iterator[dict]:
    """Yield this rank's finished batches of one epoch, moved to cfg.device."""
    dataset = EpochBatches(table, batches, channels, cfg, epoch, augment)
    workers = min(resolve_threads(cfg), len(batches))
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=cfg.device.startswith("cuda"),
        prefetch_factor=4 if workers else None,
    )
    device = torch.device(cfg.device)
    try:
        yield from _to_device(loader, device, table, batches)
    except LoaderError as exc:
        if table.fetch is not None and table.fetch.error is not None:
            # A worker gave up waiting for a tar: the fetch's own line says why.
            raise LoaderError(str(table.fetch.error)) from None
        # DataLoader re-raises a worker's error with its traceback in the message; keep the
        # error's own last line so the user sees one line naming the file.
        raise LoaderError(str(exc).strip().splitlines()[-1].removeprefix(_QUALNAME)) from None


_QUALNAME = f"{LoaderError.__module__}.{LoaderError.__name__}: "


def _to_device(
    loader: DataLoader, device: torch.device, table: SampleTable, batches: list[np.ndarray]
) -> Iterator[dict]:
    if loader.num_workers:
        # Finalize cyclic garbage here rather than in a forked worker: a dropped DALI pipeline
        # joins its threads when finalized, and a fork copies none of them (it would hang or
        # segfault there).
        gc.collect()
    iterator = iter(loader)
    try:
        for indices in batches:
            table.wait_for(indices)  # its tars are local, or the fetch's error is raised here
            batch = next(iterator)
            if device.type != "cpu":
                batch = {
                    k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                    for k, v in batch.items()
                }
            yield batch
    finally:
        # An error's traceback keeps this frame alive as long as the error is held: stop the
        # workers now, not whenever that frame is collected.
        del iterator
