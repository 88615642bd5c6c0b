"""Time every loader on the same samples with the same augmentation, in one run.

    python -m benchmarks.loaders --data data/shards [--json out.json] [--batch-size 100]
        [--rounds 5] [--batches 10] [--augment-in auto|dali|torch] [--both-augment-in]

seed-baseline  the reference's way: loose JPEG folders, PIL + ImageEnhance jitter per sample,
               torch noise, a DataLoader with one worker per core
webdataset     pipeline's torch backend (webdataset + PIL + torch ops in workers)
dali-cpu       pipeline's DALI backend on CPU threads
dali-gpu       pipeline's DALI backend on the GPU (only when CUDA is available)
decode-ceiling the four JPEG decodes per sample and nothing else, on all cores, with the
               faster of DALI's CPU decoder and PIL in one process per core
decode-ceiling-gpu  DALI's mixed (nvJPEG) decode alone: the dali-gpu ceiling (CUDA only)

With ``--data s3://...`` it also times the node-local cache (``pipeline.cache``): one epoch of
the default loader from a cold cache (fetching included; reading while the tars arrive, and
"cold-whole": only once every tar is local, as before the background fetch), again from the
warm cache, and from the cached files as a local directory, with the seconds to the first batch
and the requests and bytes each fetched, in ``--rounds`` interleaved rounds.

Loaders are timed in interleaved rounds (round-robin, each loader started afresh per round,
warmed up, then ``--batches`` timed batches), so that a change in the machine's load shows up
in every loader's rounds rather than in one loader's figure; each loader reports every round
and their median. ``--augment-in`` picks where DALI loaders finish batches (in the DALI graph
or in torch); dali-gpu also runs with the other value by default on CUDA, and every DALI
loader does with ``--both-augment-in``.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.baselines import (
    dali_ceiling,
    encoded_jpegs,
    extract_loose,
    pil_ceiling,
    seed_baseline,
)
from benchmarks.report import cores, load_average, machine_info, missing_dir, write_report
from pipeline import LoaderConfig, LoaderError, build_loader, cache, cache_object
from pipeline.cache import CACHE_DIR_HELP
from pipeline.config import AUGMENT_IN
from pipeline.loader import Loader, dali_available, resolve_augment_in
from pipeline.source import DataSource, resolve_source
from sharding.storage import StorageError, is_url

log = logging.getLogger(__name__)

PROG = "python -m benchmarks.loaders"

LOADERS = ("seed-baseline", "webdataset", "dali-cpu", "dali-gpu", "decode-ceiling")
# Untimed batches first: pipeline start-up, and prefetch queues that were filled for free.
WARMUP_BATCHES = 3
CEILINGS = {"decode-ceiling": ("pil", "dali"), "decode-ceiling-gpu": ("dali-gpu",)}


# ------------------------------------------------------------------ pipeline loaders


def pipeline_batches(data_dir: str, cfg: LoaderConfig):
    loader = build_loader(data_dir, "train", cfg)
    epoch = 0
    while True:
        for batch in loader.epoch(epoch):
            if cfg.device != "cpu":
                torch.cuda.synchronize()  # count work finished, not work queued
            yield len(batch["key"])
        epoch += 1


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


def time_round(name: str, batches, count: int, progress: bool) -> dict:
    """One round: samples/s over ``count`` batches after warm-up batches (start-up, queues)."""
    try:
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
    finally:
        batches.close()  # stop its workers and pipeline: idle loaders must not steal CPU
    cpu = cpu_end - cpu_start if cpu_start is not None and cpu_end is not None else None
    return {"samples": samples, "seconds": seconds, "first_batch_s": first, "cpu_s": cpu}


def summarise(rounds: list[dict], count: int) -> dict:
    """Every round's rate and their median, with totals over the rounds."""
    rates = [r["samples"] / r["seconds"] for r in rounds]
    samples = sum(r["samples"] for r in rounds)
    result = {
        "samples_per_s": statistics.median(rates),
        "rounds": rates,
        "samples": samples,
        "batches": count,  # timed batches per round
        "seconds": sum(r["seconds"] for r in rounds),
        "first_batch_s": statistics.median(r["first_batch_s"] for r in rounds),
    }
    cpu = [r["cpu_s"] for r in rounds]
    if all(c is not None and c > 0 for c in cpu):
        # What the rate would be with all cores to ourselves: samples per CPU-second x cores.
        result["cpu_s"] = sum(cpu)
        result["samples_per_s_all_cores_cpu"] = samples / sum(cpu) * cores()
    return result


def plan(args: argparse.Namespace, data: DataSource, cfg: LoaderConfig, workdir: Path) -> dict:
    """{name: (a factory of fresh batch generators, extra result fields)} for every run."""
    gpu = torch.cuda.is_available()
    wanted = [n for n in args.loaders if n != "dali-gpu" or gpu]
    if not dali_available():
        wanted = [n for n in wanted if not n.startswith("dali")]
    both = args.both_augment_in
    runs = {}
    for name in wanted:
        if name == "seed-baseline":
            samples = extract_loose(data, workdir)
            runs[name] = (lambda s=samples: seed_baseline(s, data.channels, cfg), {})
        elif name == "webdataset":
            runs[name] = (lambda: pipeline_batches(args.data, cfg), {})
        elif name in ("dali-cpu", "dali-gpu"):
            device = "cuda" if name == "dali-gpu" else "cpu"
            dali_cfg = replace(
                cfg,
                backend="dali",
                device=device,
                augment_in=args.augment_in,
                hw_decoder_load=args.hw_decoder_load,
            )
            chosen = resolve_augment_in(dali_cfg, "dali")
            variants = [(name, chosen)]
            if both or (both is None and name == "dali-gpu"):
                other = "torch" if chosen == "dali" else "dali"
                variants.append((f"{name} [augment-in={other}]", other))
            for label, where in variants:
                run_cfg = replace(dali_cfg, augment_in=where)
                runs[label] = (
                    lambda c=run_cfg: pipeline_batches(args.data, c),
                    {"augment_in": where},
                )
        else:  # decode-ceiling: PIL and DALI on the CPU, and nvJPEG alone on the GPU
            encoded = encoded_jpegs(data)
            runs["decode-ceiling/pil"] = (
                lambda e=encoded: pil_ceiling(e, args.batch_size, cfg.num_threads),
                {},
            )
            if dali_available():
                runs["decode-ceiling/dali"] = (
                    lambda: dali_ceiling(data, args.batch_size, cfg.num_threads),
                    {},
                )
                if gpu and "dali-gpu" in wanted:
                    runs["decode-ceiling-gpu/dali-gpu"] = (
                        lambda: dali_ceiling(
                            data, args.batch_size, cfg.num_threads, torch.cuda.current_device()
                        ),
                        {},
                    )
    return runs


def remote_epochs(args: argparse.Namespace, cfg: LoaderConfig) -> dict:
    """One epoch of the default loader from s3:// through a cold cache (reading while the
    tars arrive, and, as before that was built, only once the whole split is fetched), the
    warm cache, and the cached files as a local directory: samples/s, seconds to the first
    batch, and what each fetched; ``--rounds`` interleaved rounds, medians."""
    backend = "dali" if dali_available() else "torch"
    cfg = replace(cfg, backend=backend)
    labels = ("cold-whole", "cold", "warm", "local")
    rounds = {label: [] for label in labels}
    for r in range(args.rounds):
        with (
            tempfile.TemporaryDirectory(prefix="cache-bench-") as whole,
            tempfile.TemporaryDirectory(prefix="cache-bench-") as folder,
        ):
            local = str(cache.cache_folder(folder, args.data))
            runs = [
                ("cold-whole", args.data, whole, True),
                ("cold", args.data, folder, False),
                ("warm", args.data, folder, False),
                ("local", local, folder, False),
            ]
            if r % 2:  # the two cold ones take turns going first
                runs[:2] = runs[1::-1]
            for label, source, cache_dir, whole_first in runs:
                rounds[label].append(
                    remote_epoch(source, replace(cfg, cache_dir=cache_dir), whole_first)
                )
    results = {}
    for label in labels:
        last = rounds[label][-1]
        results[label] = {
            "samples_per_s": statistics.median(r["samples"] / r["seconds"] for r in rounds[label]),
            "seconds": statistics.median(r["seconds"] for r in rounds[label]),
            "first_batch_s": statistics.median(r["first_batch_s"] for r in rounds[label]),
            "rounds_first_batch_s": [r["first_batch_s"] for r in rounds[label]],
            "rounds_seconds": [r["seconds"] for r in rounds[label]],
            "samples": last["samples"],
            "requests": last["requests"],
            "bytes_fetched": last["bytes_fetched"],
            "backend": backend,
        }
    local_rate = results["local"]["samples_per_s"]
    for label in ("cold-whole", "cold", "warm"):
        results[label]["share_of_local"] = results[label]["samples_per_s"] / local_rate
    return results


def remote_epoch(source: str, cfg: LoaderConfig, whole_first: bool) -> dict:
    """One timed epoch from ``build_loader`` on; ``whole_first``: the loader is built only
    once every tar is local (the cache before tars were fetched in the background)."""
    before = replace(cache_object.FETCHED)
    start = time.perf_counter()
    if whole_first:
        loader = Loader(resolve_source(source, "train", cfg.cache_dir), "train", cfg, cfg.backend)
    else:
        loader = build_loader(source, "train", cfg)
    batches = loader.epoch(0)
    samples = len(next(batches)["key"])
    first = time.perf_counter() - start
    samples += sum(len(b["key"]) for b in batches)
    return {
        "samples": samples,
        "seconds": time.perf_counter() - start,
        "first_batch_s": first,
        "requests": cache_object.FETCHED.objects - before.objects,
        "bytes_fetched": cache_object.FETCHED.bytes - before.bytes,
    }


def run(args: argparse.Namespace) -> dict:
    load_at_start = load_average()
    workers = args.workers or cores()
    data = resolve_source(args.data, "train", args.cache_dir)
    cfg = LoaderConfig(
        backend="torch",
        batch_size=args.batch_size,
        num_threads=workers,
        seed=args.seed,
        rank=0,
        world_size=1,
        cache_dir=args.cache_dir,
    )
    with tempfile.TemporaryDirectory(prefix="seed-baseline-") as workdir:
        runs = plan(args, data, cfg, Path(workdir))
        rounds = {name: [] for name in runs}
        for r in range(args.rounds):
            for name, (batches, _) in runs.items():
                label = f"{name} {r + 1}/{args.rounds}"
                rounds[name].append(time_round(label, batches(), args.batches, args.progress))
    results = {}
    for name, (_, extra) in runs.items():
        results[name] = {**summarise(rounds[name], args.batches), **extra}
    for ceiling, decoders in CEILINGS.items():
        measured = {
            d: results.pop(f"{ceiling}/{d}") for d in decoders if f"{ceiling}/{d}" in results
        }
        if measured:
            best = max(measured, key=lambda d: measured[d]["samples_per_s"])
            results[ceiling] = {
                **measured[best],
                "decoder": best,
                "by_decoder": {d: r["samples_per_s"] for d, r in measured.items()},
                "rounds_by_decoder": {d: r["rounds"] for d, r in measured.items()},
            }
    return {
        "machine": {
            **machine_info(),
            "load_average_at_start": load_at_start,
            "load_average_1m_at_start": load_at_start[0] if load_at_start else None,
        },
        "data": {
            "path": str(args.data),
            "channels": data.channels,
            "samples": data.num_samples,
            "batch_size": args.batch_size,
            "batches": args.batches,
            "rounds": args.rounds,
            "workers": workers,
            "augment": True,
            "augment_in": args.augment_in,
            "hw_decoder_load": args.hw_decoder_load,
        },
        "loaders": results,
        "ratios": ratios(results),
        **({"remote": remote_epochs(args, cfg)} if is_url(args.data) else {}),
    }


def ratios(results: dict) -> dict:
    """Rate ratios of the pairs the project's goals are stated in, where both ran."""
    pairs = [
        ("dali-cpu", "decode-ceiling"),
        ("dali-cpu", "seed-baseline"),
        ("webdataset", "seed-baseline"),
        ("dali-gpu", "seed-baseline"),
        ("dali-gpu", "decode-ceiling-gpu"),
    ]
    pairs += [(name, name.split(" [")[0]) for name in results if " [augment-in=" in name]
    out = {}
    for a, b in pairs:
        if a in results and b in results:
            out[f"{a} / {b}"] = results[a]["samples_per_s"] / results[b]["samples_per_s"]
            key = "samples_per_s_all_cores_cpu"
            if key in results[a] and key in results[b]:
                out[f"{a} / {b} (cpu time)"] = results[a][key] / results[b][key]
    return out


def print_table(report: dict) -> None:
    loaders = report["loaders"]
    base = loaders.get("seed-baseline", {}).get("samples_per_s")
    top = loaders.get("decode-ceiling", {}).get("samples_per_s")
    gpu_top = loaders.get("decode-ceiling-gpu", {}).get("samples_per_s")
    m, d = report["machine"], report["data"]
    print(
        f"# {m['date']}  {m['cores']} cores  gpu={m['gpu']}  torch {m['torch']}  "
        f"dali {m['dali']}  channels={d['channels']}  batch={d['batch_size']}"
    )
    print(
        f"# load average (1, 5, 15 min): {m['load_average_at_start']} at start, "
        f"{m['load_average_at_end']} at end; cpu-time rate = samples per CPU-second x cores"
    )
    print(
        f"# {d['rounds']} interleaved rounds of {d['batches']} batches; samples/s is their "
        "median, min-max in brackets"
    )
    print(
        f"{'loader':32s} {'samples/s':>10s} {'rounds min-max':>16s} {'x seed':>8s} "
        f"{'% ceiling':>10s} {'cpu-time rate':>14s}"
    )
    for name, r in loaders.items():
        rate = r["samples_per_s"]
        spread = f"{min(r['rounds']):.0f}-{max(r['rounds']):.0f}"
        x_seed = f"{rate / base:.2f}" if base else "-"
        ceiling = gpu_top if "gpu" in name else top
        pct = f"{100 * rate / ceiling:.0f}%" if ceiling else "-"
        cpu_rate = r.get("samples_per_s_all_cores_cpu")
        cpu_text = f"{cpu_rate:.0f}" if cpu_rate else "-"
        print(f"{name:32s} {rate:10.0f} {spread:>16s} {x_seed:>8s} {pct:>10s} {cpu_text:>14s}")
    for name, value in report["ratios"].items():
        print(f"ratio {name}: {value:.2f}")
    for label, r in report.get("remote", {}).items():
        share = f", {100 * r['share_of_local']:.0f}% of local" if "share_of_local" in r else ""
        print(
            f"s3 {label:<5} cache: {r['samples_per_s']:.0f} samples/s{share}, first batch "
            f"after {r['first_batch_s']:.2f} s; "
            f"{r['requests']} objects, {r['bytes_fetched']:,} bytes fetched"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data", required=True, help="shard directory or s3://BUCKET/PREFIX (with manifest.json)"
    )
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--batch-size", type=int, default=100, help="samples per batch")
    parser.add_argument(
        "--batches", type=int, default=10, help="timed batches per loader in each round"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds; each loader reports the median"
    )
    parser.add_argument(
        "--augment-in",
        default="auto",
        choices=AUGMENT_IN,
        help="where DALI loaders finish batches: in the DALI graph, in torch, or auto "
        "(the graph on CUDA, torch on the CPU)",
    )
    parser.add_argument(
        "--both-augment-in",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run every DALI loader with the other --augment-in value "
        "(default: dali-gpu only, on CUDA)",
    )
    parser.add_argument("--workers", type=int, default=0, help="0: one per core")
    parser.add_argument(
        "--hw-decoder-load",
        type=float,
        default=LoaderConfig.hw_decoder_load,
        help="share of each batch for the GPU's hardware JPEG decoder (dali-gpu)",
    )
    parser.add_argument(
        "--cache-dir",
        help=CACHE_DIR_HELP,
    )
    parser.add_argument("--seed", type=int, default=0, help="shuffle and augmentation seed")
    parser.add_argument(
        "--loaders", nargs="+", default=list(LOADERS), choices=LOADERS, help="loaders to time"
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1 or args.batches < 1 or args.rounds < 1:
        print(
            f"{PROG}: error: --batch-size, --batches and --rounds must be at least 1",
            file=sys.stderr,
        )
        return 2
    if problem := missing_dir(args.json):
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 1
    try:
        report = run(args)
    except (LoaderError, StorageError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print_table(report)
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
