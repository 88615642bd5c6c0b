"""The DALI loader's CPU stage on a GPU, counted and timed without a GPU.

    python -m benchmarks.cpu_stage --data data/shards [--batch-size 512] [--rounds 5]
        [--json out.json]

DALI runs a graph's CPU operators one after another, so they bound the loader whatever the
GPU does. For the GPU train graph (grey and RGB, augmented in the graph) this counts the
operators by device from DALI's own graph (built for ``device_id=0``, never run), and times
per batch what stays on the host:

- ``feed_ms``: the Python feed (``pipeline.dali.Feed``): the batch's JPEG byte ranges cut from
  the memory-mapped tars, and its augmentation parameters computed and packed in numpy;
- ``source_ms``: DALI's CPU operators themselves: the same feed through a CPU pipeline that
  holds only the external source (its outputs copied into DALI's buffers), minus nothing;
  it includes ``feed_ms``, since DALI calls the feed from ``run()``.

The issue's goal is a CPU stage of at most 2 ms per batch of 512. Figures are medians of
``--rounds`` rounds of ``--batches`` batches each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from benchmarks.report import load_average, machine_info, missing_dir, write_report
from pipeline import LoaderConfig, LoaderError
from pipeline.loader import dali_available, keep_freed_batch_memory
from pipeline.samples import build_table
from pipeline.source import resolve_source

PROG = "python -m benchmarks.cpu_stage"
GOAL_MS = 2.0


def graph_counts(channels: int, sizes: dict) -> dict[str, int]:
    """Operators by device of the GPU train graph, augmented in the graph."""
    from pipeline import dali
    from pipeline.dali_graph import cpu_operator_count, loader_graph

    spec = dali.graph_spec(LoaderConfig(device="cuda"), channels, sizes, True, augment=True)
    pipe = loader_graph(feed=lambda: None, spec=spec, batch_size=8, num_threads=1, device_id=0)
    return cpu_operator_count(pipe)


def time_stage(table, channels: int, sizes: dict, batch: int, batches: int) -> dict:
    """Median ms per batch of the feed alone, and of DALI's external-source stage."""
    from nvidia.dali import pipeline_def

    from pipeline import dali
    from pipeline.dali_graph import feed_outputs

    cfg = LoaderConfig(device="cpu", batch_size=batch)
    spec = dali.graph_spec(cfg, channels, sizes, float_out=True, augment=True)
    feed = dali.Feed(table, spec, cfg)
    rng = np.random.default_rng(0)
    plan = [rng.integers(0, len(table), batch) for _ in range(batches + 1)]

    feed.plan(plan, epoch=0)
    feed()  # warm: maps opened, code paths compiled
    start = time.perf_counter()
    for _ in range(batches):
        feed()
    feed_ms = (time.perf_counter() - start) / batches * 1000

    @pipeline_def
    def source_only():
        return tuple(feed_outputs(feed, spec))  # the loader graph's CPU operators, alone

    pipe = source_only(batch_size=batch, num_threads=1, device_id=None, prefetch_queue_depth=1)
    pipe.build()
    feed.plan(plan, epoch=0)
    pipe.run()  # warm
    start = time.perf_counter()
    for _ in range(batches):
        pipe.run()
    source_ms = (time.perf_counter() - start) / batches * 1000
    return {"feed_ms": feed_ms, "source_ms": source_ms}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="shard directory (with manifest.json)")
    p.add_argument("--batch-size", type=int, default=512, help="samples per batch")
    p.add_argument("--batches", type=int, default=20, help="batches timed per round")
    p.add_argument("--rounds", type=int, default=5, help="rounds; medians are reported")
    p.add_argument("--json", help="write the figures here too")
    a = p.parse_args(argv)
    if min(a.batch_size, a.batches, a.rounds) < 1:
        p.error("--batch-size, --batches and --rounds must be at least 1")
    if not dali_available():
        print(f"{PROG}: error: nvidia.dali is not installed", file=sys.stderr)
        return 1
    if (problem := missing_dir(a.json)) is not None:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 1
    try:
        source = resolve_source(a.data, "train")
    except LoaderError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    table = build_table(source.shards)
    keep_freed_batch_memory()  # as build_loader does for a DALI loader on the CPU
    load_start = load_average()
    report = {"machine": {"load_average_at_start": load_start}}
    report.update(batch_size=a.batch_size, goal_ms=GOAL_MS, graphs={})
    for name, channels in (("grey", 1), ("rgb", 3)):
        rounds = [
            time_stage(table, channels, source.sizes, a.batch_size, a.batches)
            for _ in range(a.rounds)
        ]
        report["graphs"][name] = {
            "operators": graph_counts(channels, source.sizes),
            "feed_ms": statistics.median(r["feed_ms"] for r in rounds),
            "source_ms": statistics.median(r["source_ms"] for r in rounds),
            "rounds": rounds,
        }
    report["machine"].update(machine_info())
    for name, g in report["graphs"].items():
        ops = ", ".join(f"{d} {n}" for d, n in sorted(g["operators"].items()))
        print(
            f"{name:<5} GPU train graph: {ops}; per batch of {a.batch_size}: feed "
            f"{g['feed_ms']:.2f} ms, CPU stage {g['source_ms']:.2f} ms (goal {GOAL_MS} ms)"
        )
    if a.json:
        write_report(a.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
