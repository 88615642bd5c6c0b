"""train.py with torch.distributed's host collectives counted, for tests/test_collective.py.

    torchrun --nproc_per_node=2 tests/count_collectives.py OUT_DIR [train.py options]

Each rank wraps the collectives of ``torch.distributed`` that code calls through the module
(train.py, training/, model.metrics, DDP's buffer and state broadcasts) and counts its
training steps and evaluation batches; at exit it writes ``OUT_DIR/rank{R}.json``:
``{"calls": {name: count}, "train_steps": n, "eval_batches": n}``. DDP's gradient
all-reduce runs inside its C++ reducer and is not counted: it is the one a step needs.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch.distributed as dist

import train
import training.evaluate

COLLECTIVES = (
    "all_reduce", "broadcast", "all_gather_object", "broadcast_object_list", "barrier",
    "all_gather", "reduce", "gather", "scatter", "all_gather_into_tensor",
    "reduce_scatter_tensor", "gather_object", "scatter_object_list", "all_to_all",
    "monitored_barrier", "_broadcast_coalesced",
)  # fmt: skip
calls: Counter[str] = Counter()


def counted(name: str, function):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return function(*args, **kwargs)

    return wrapper


def count_calls_of(module, name: str, key: str) -> None:
    setattr(module, name, counted(key, getattr(module, name)))


def write(out: Path) -> None:
    steps, batches = calls.pop("<train_step>", 0), calls.pop("<eval_batch>", 0)
    report = {"calls": dict(calls), "train_steps": steps, "eval_batches": batches}
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    out, *options = sys.argv[1:]
    for name in COLLECTIVES:
        count_calls_of(dist, name, name)
    count_calls_of(train, "train_step", "<train_step>")
    count_calls_of(training.evaluate, "forward_loss", "<eval_batch>")
    atexit.register(write, Path(out))
    sys.exit(train.cli(options))
