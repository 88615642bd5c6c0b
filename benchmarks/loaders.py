"""Time every loader on the same samples with the same augmentation, in one run.

    python -m benchmarks.loaders --data data/shards [--json out.json] [--batch-size 100]

seed-baseline  the reference's way: loose JPEG folders, PIL + ImageEnhance jitter per sample,
               torch noise, a DataLoader with one worker per core
webdataset     pipeline's torch backend (webdataset + PIL + torch ops in workers)
dali-cpu       pipeline's DALI backend on CPU threads
dali-gpu       pipeline's DALI backend on the GPU (only when CUDA is available)
decode-ceiling the four JPEG decodes per sample and nothing else, on all cores, with the
               faster of DALI's CPU decoder and PIL in one process per core
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import logging
import multiprocessing
import os
import platform
import random
import resource
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline import LoaderConfig, LoaderError, build_loader
from pipeline.loader import dali_available
from pipeline.source import DataSource, resolve_source
from sharding.atomic import write_json
from sharding.shard_format import META_EXT, PARTS, image_ext, part_of, split_member

log = logging.getLogger(__name__)

LOADERS = ("seed-baseline", "webdataset", "dali-cpu", "dali-gpu", "decode-ceiling")
# Untimed batches first: pipeline start-up, and prefetch queues that were filled for free.
WARMUP_BATCHES = 3


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ---------------------------------------------------------------- seed-baseline (the reference)


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
        with tarfile.open(shard.path, "r:") as archive:
            members = {}
            for member in archive:
                key, ext = split_member(member.name)
                members.setdefault(key, {})[ext] = archive.extractfile(member).read()
        for parts in members.values():
            info = json.loads(parts[META_EXT])
            root = out / Path(info.get("zip", "batch")).stem
            paths = {}
            for part, name in loose_names(info).items():
                path = root / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(parts[image_ext(part)])
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


def seed_baseline(data: DataSource, cfg: LoaderConfig, workdir: Path):
    samples = extract_loose(data, workdir)
    dataset = LooseJpegDataset(samples, cfg, data.channels)
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


# ------------------------------------------------------------------ pipeline loaders & ceiling


def pipeline_batches(data_dir: str, cfg: LoaderConfig):
    loader = build_loader(data_dir, "train", cfg)
    epoch = 0
    while True:
        for batch in loader.epoch(epoch):
            if cfg.device != "cpu":
                torch.cuda.synchronize()  # count work finished, not work queued
            yield len(batch["key"])
        epoch += 1


def _pil_decode_chunk(chunk: list[tuple[bytes, str]]) -> int:
    for data, mode in chunk:
        with Image.open(io.BytesIO(data)) as image:
            image.convert(mode).load()
    return len(chunk)


def pil_ceiling(data: DataSource, batch_size: int, workers: int):
    """PIL decodes of in-memory JPEG bytes in one process per core (no file or tar I/O)."""
    mode = "RGB" if data.channels == 3 else "L"
    encoded = []
    for shard in data.shards:
        with tarfile.open(shard.path, "r:") as archive:
            for member in archive:
                part = part_of(split_member(member.name)[1])
                if part is not None:
                    part_mode = mode if part in ("bg", "fg_bg") else "L"
                    encoded.append((archive.extractfile(member).read(), part_mode))
    per_batch = batch_size * len(PARTS)
    chunks = [encoded[i : i + per_batch] for i in range(0, len(encoded), per_batch)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        while True:
            for decoded in pool.imap(_pil_decode_chunk, chunks):
                yield decoded // len(PARTS)


def dali_ceiling(data: DataSource, batch_size: int, workers: int):
    from pipeline import dali

    yield from dali.decode_only_batches(list(data.shards), data.channels, batch_size, workers)


def cpu_seconds() -> float | None:
    """CPU time of this process and its live children (DataLoader/Pool workers), Linux only.

    On a shared machine wall-clock rates move with other people's load; CPU seconds per sample
    do not, so the report carries both.
    """
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        own = resource.getrusage(resource.RUSAGE_SELF)
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers of finished epochs
        total = own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
        me = str(os.getpid())
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the process ended while we looked
            if fields[1] == me:  # ppid
                total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        return total
    except (OSError, ValueError, IndexError):
        return None


def measure(name: str, batches, count: int, progress: bool) -> dict:
    """Samples/s over ``count`` batches, after warm-up batches (start-up, prefetch queues)."""
    start = time.perf_counter()
    next(batches)
    first = time.perf_counter() - start
    for _ in range(WARMUP_BATCHES - 1):
        next(batches)
    samples = 0
    bar = tqdm(total=count, desc=name, unit="batch", disable=not progress, leave=False)
    cpu_start, start = cpu_seconds(), time.perf_counter()
    for _ in range(count):
        samples += next(batches)
        bar.update()
    seconds = time.perf_counter() - start
    cpu_end = cpu_seconds()
    bar.close()
    batches.close()
    result = {
        "samples_per_s": samples / seconds,
        "samples": samples,
        "batches": count,
        "seconds": seconds,
        "first_batch_s": first,
    }
    if cpu_start is not None and cpu_end is not None and cpu_end > cpu_start:
        # What the rate would be with all cores to ourselves: samples per CPU-second x cores.
        result["cpu_s"] = cpu_end - cpu_start
        result["samples_per_s_all_cores_cpu"] = samples / (cpu_end - cpu_start) * cores()
    return result


def machine_info() -> dict:
    """Cores, GPU, date, versions, and the load average: other users' load skews wall rates."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    dali_version = None
    if dali_available():
        from importlib.metadata import PackageNotFoundError, version

        for dist in ("nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali-cuda130"):
            try:
                dali_version = version(dist)
                break
            except PackageNotFoundError:
                continue
    return {
        "cores": cores(),
        "gpu": gpu,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dali": dali_version,
        "load_average_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def run(args: argparse.Namespace) -> dict:
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    workers = args.workers or cores()
    data = resolve_source(args.data, "train")
    cfg = LoaderConfig(
        backend="torch",
        batch_size=args.batch_size,
        num_threads=workers,
        seed=args.seed,
        shard_id=0,
        num_shards=1,
    )
    wanted = [n for n in args.loaders if n != "dali-gpu" or torch.cuda.is_available()]
    if not dali_available():
        wanted = [n for n in wanted if not n.startswith("dali")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="seed-baseline-") as workdir:
        for name in wanted:
            if name == "seed-baseline":
                batches = seed_baseline(data, cfg, Path(workdir))
            elif name == "webdataset":
                batches = pipeline_batches(args.data, cfg)
            elif name == "dali-cpu":
                batches = pipeline_batches(args.data, replace(cfg, backend="dali"))
            elif name == "dali-gpu":
                batches = pipeline_batches(args.data, replace(cfg, backend="dali", device="cuda"))
            else:
                results[name] = ceiling(data, args, workers)
                continue
            results[name] = measure(name, batches, args.batches, args.progress)
    ratios = {}
    for a, b in (
        ("dali-cpu", "decode-ceiling"),
        ("dali-cpu", "seed-baseline"),
        ("webdataset", "seed-baseline"),
        ("dali-gpu", "seed-baseline"),
    ):
        if a in results and b in results:
            ratios[f"{a} / {b}"] = results[a]["samples_per_s"] / results[b]["samples_per_s"]
            key = "samples_per_s_all_cores_cpu"
            if key in results[a] and key in results[b]:
                ratios[f"{a} / {b} (cpu time)"] = results[a][key] / results[b][key]
    return {
        "machine": {**machine_info(), "load_average_1m_at_start": load_at_start},
        "data": {
            "path": str(args.data),
            "channels": data.channels,
            "samples": data.num_samples,
            "batch_size": args.batch_size,
            "batches": args.batches,
            "workers": workers,
            "augment": True,
        },
        "loaders": results,
        "ratios": ratios,
    }


def ceiling(data: DataSource, args: argparse.Namespace, workers: int) -> dict:
    """The faster of the DALI and PIL decode-only runs, recording both."""
    runs = {
        "pil": measure(
            "ceiling-pil", pil_ceiling(data, args.batch_size, workers), args.batches, args.progress
        )
    }
    if dali_available():
        runs["dali"] = measure(
            "ceiling-dali",
            dali_ceiling(data, args.batch_size, workers),
            args.batches,
            args.progress,
        )
    best = max(runs, key=lambda k: runs[k]["samples_per_s"])
    return {
        **runs[best],
        "decoder": best,
        "by_decoder": {k: v["samples_per_s"] for k, v in runs.items()},
    }


def print_table(report: dict) -> None:
    loaders = report["loaders"]
    base = loaders.get("seed-baseline", {}).get("samples_per_s")
    top = loaders.get("decode-ceiling", {}).get("samples_per_s")
    m, d = report["machine"], report["data"]
    print(
        f"# {m['date']}  {m['cores']} cores  gpu={m['gpu']}  torch {m['torch']}  "
        f"dali {m['dali']}  channels={d['channels']}  batch={d['batch_size']}"
    )
    print(
        f"# load average (1 min): {m['load_average_1m_at_start']} at start, "
        f"{m['load_average_1m_at_end']} at end; cpu-time rate = samples per CPU-second x cores"
    )
    print(
        f"{'loader':16s} {'samples/s':>10s} {'x seed':>8s} {'% ceiling':>10s} "
        f"{'cpu-time rate':>14s}"
    )
    for name, r in loaders.items():
        rate = r["samples_per_s"]
        x_seed = f"{rate / base:.2f}" if base else "-"
        pct = f"{100 * rate / top:.0f}%" if top else "-"
        cpu_rate = r.get("samples_per_s_all_cores_cpu")
        cpu_text = f"{cpu_rate:.0f}" if cpu_rate else "-"
        print(f"{name:16s} {rate:10.0f} {x_seed:>8s} {pct:>10s} {cpu_text:>14s}")
    for name, value in report["ratios"].items():
        print(f"ratio {name}: {value:.2f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--data", required=True, help="shard directory (with manifest.json)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per loader")
    parser.add_argument("--workers", type=int, default=0, help="0: one per core")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=LOADERS)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1 or args.batches < 1:
        print("error: --batch-size and --batches must be at least 1", file=sys.stderr)
        return 2
    try:
        report = run(args)
    except LoaderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_table(report)
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
