"""What ``benchmarks.loaders`` measures the loaders against: the seed-style loader (the
reference's unzipped JPEG folders read by PIL in DataLoader workers, with its colour jitter and
noise) and the JPEG-decode ceilings (in-memory JPEG bytes decoded by PIL in one process per
core, or by DALI's decoder alone)."""

from __future__ import annotations

import io
import json
import multiprocessing
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import DataLoader, Dataset

from pipeline import LoaderConfig
from pipeline.samples import build_table, read_member, scan_tar
from pipeline.source import DataSource
from sharding.shard_format import META_EXT, PARTS, image_ext


def loose_names(info: dict) -> dict[str, str]:
    """The reference's unzipped file names for one sample, from its shard JSON."""
    f, b, flip = info["fg"], info["bg"], info["flip"]
    n = info.get("n", info.get("placement"))
    tail = f"{f}_{b}_{flip}_{n}.jpg"
    return {
        "bg": f"bg_jpg/bg_img_{b}.jpg",
        "fg_bg": f"fg_bg_jpg/fg_bg_{tail}",
        "mask": f"mask_black_jpg/bg_mask_{tail}",
        "depth": f"depth_fg_bg_jpg/depth_fg_bg_{tail}",
    }


def extract_loose(data: DataSource, out: Path) -> list[dict[str, Path]]:
    """Unpack the shards into the reference's folder layout (one folder per source zip)."""
    samples = []
    for shard in data.shards:
        for _, members in scan_tar(shard.path):
            info = json.loads(read_member(shard.path, *members[META_EXT]))
            root = out / Path(info.get("zip", "batch")).stem
            paths = {}
            for part, name in loose_names(info).items():
                path = root / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(read_member(shard.path, *members[image_ext(part)]))
                paths[part] = path
            samples.append(paths)
    return samples


def pil_hue_shift(image: Image.Image, shift: float) -> Image.Image:
    """torchvision's PIL adjust_hue: rotate the H channel of HSV by ``shift`` of a turn."""
    h, s, v = image.convert("HSV").split()
    hue = np.asarray(h, dtype=np.uint8) + np.uint8(int(shift * 255) % 256)  # wraps like uint8
    return Image.merge("HSV", (Image.fromarray(hue, "L"), s, v)).convert(image.mode)


class LooseJpegDataset(Dataset):
    """The reference's map-style dataset: PIL opens each file, jitters, then torch noise."""

    def __init__(self, samples: list[dict[str, Path]], cfg: LoaderConfig, channels: int):
        self.samples, self.cfg, self.mode = samples, cfg, "RGB" if channels == 3 else "L"

    def __len__(self) -> int:
        return len(self.samples)

    def _jitter(self, image: Image.Image) -> Image.Image:
        cfg = self.cfg
        image = ImageEnhance.Brightness(image).enhance(
            random.uniform(1 - cfg.brightness, 1 + cfg.brightness)
        )
        image = ImageEnhance.Contrast(image).enhance(
            random.uniform(1 - cfg.contrast, 1 + cfg.contrast)
        )
        if self.mode == "RGB":
            image = ImageEnhance.Color(image).enhance(
                random.uniform(1 - cfg.saturation, 1 + cfg.saturation)
            )
            image = pil_hue_shift(image, random.uniform(-cfg.hue, cfg.hue))
        return image

    def _tensor(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image)
        array = array[:, :, None] if array.ndim == 2 else array
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)

    def __getitem__(self, i: int) -> dict:
        cfg, paths = self.cfg, self.samples[i]
        out = {}
        for part in ("bg", "fg_bg"):
            x = self._tensor(self._jitter(Image.open(paths[part]).convert(self.mode)))
            if random.random() < cfg.noise_prob:
                x = (x + torch.randn_like(x) * cfg.noise_std).clamp_(0, 1)
            out[part] = (x - cfg.mean) / cfg.std
        out["mask"] = (self._tensor(Image.open(paths["mask"]).convert("L")) > 0.5).float()
        out["depth"] = self._tensor(Image.open(paths["depth"]).convert("L"))
        return out


def seed_baseline(samples: list[dict[str, Path]], channels: int, cfg: LoaderConfig):
    dataset = LooseJpegDataset(samples, cfg, channels)
    epoch = 0
    while True:
        torch.manual_seed(epoch)
        loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=True,
            num_workers=cfg.num_threads,
            prefetch_factor=4,
            persistent_workers=False,
        )
        for batch in loader:
            yield len(batch["bg"])
        epoch += 1


# ------------------------------------------------------------------ decode ceilings


def _pil_decode_chunk(chunk: list[tuple[bytes, str]]) -> int:
    for data, mode in chunk:
        with Image.open(io.BytesIO(data)) as image:
            image.convert(mode).load()
    return len(chunk)


def encoded_jpegs(data: DataSource) -> list[tuple[bytes, str]]:
    """Every JPEG of the split in memory, with the PIL mode it decodes to."""
    mode = "RGB" if data.channels == 3 else "L"
    table = build_table(data.shards)
    streams = table.encoded(np.arange(len(table)))  # per part, per sample
    encoded = []
    for sample in zip(*streams):
        for part, jpeg in zip(PARTS, sample):
            encoded.append((jpeg.tobytes(), mode if part in ("bg", "fg_bg") else "L"))
    return encoded


def pil_ceiling(encoded: list[tuple[bytes, str]], batch_size: int, workers: int):
    """PIL decodes of in-memory JPEG bytes in one process per core (no file or tar I/O)."""
    per_batch = batch_size * len(PARTS)
    chunks = [encoded[i : i + per_batch] for i in range(0, len(encoded), per_batch)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        while True:
            for decoded in pool.imap(_pil_decode_chunk, chunks):
                yield decoded // len(PARTS)


def dali_ceiling(data: DataSource, batch_size: int, workers: int, device_id: int | None = None):
    from pipeline import dali

    yield from dali.decode_only_batches(
        list(data.shards), data.channels, batch_size, workers, device_id=device_id
    )
