"""train.py with one fault injected on one rank, for tests/test_collective.py.

    torchrun --nproc_per_node=2 tests/fault_rank.py FAULT RANK [train.py options]

FAULT is what goes wrong on rank RANK only, by monkeypatching the real code there:

- ``nan``: every training loss from the second step on is NaN (a diverging run);
- ``loader``: the second training batch cannot be read (a corrupt shard);
- ``eval-loader``: the second test batch cannot be read, in the evaluation after epoch 1;
- ``eval-step``: the evaluation's forward pass fails with "CUDA out of memory" (a bug to
  ``agree``: that rank raises it with its traceback, the others stop with its one line);
- ``save``: writing a checkpoint fails with "No space left on device";
- ``sigint``: a real SIGINT to this rank's own process after its second training step, as
  Ctrl-C would send (RANK ``all``: to every rank);
- ``sigint-launcher``: a real SIGINT to torchrun (this rank's parent) after the second
  training step, as Ctrl-C in torchrun's terminal sends it (only torchrun: its workers run
  in sessions of their own).
"""

from __future__ import annotations

import errno
import math
import os
import signal
import sys
from collections.abc import Callable

import torch

import train
import training.evaluate
from pipeline.config import LoaderError
from pipeline.loader import Loader


def poison_loss_from_second_step() -> None:
    real_step, calls = train.train_step, []

    def step(model, loss_fn, optimizer, batch, rt):
        calls.append(None)
        if len(calls) >= 2:
            real_loss = loss_fn

            def loss_fn(*args):
                return {k: v * math.nan for k, v in real_loss(*args).items()}

        return real_step(model, loss_fn, optimizer, batch, rt)

    train.train_step = step


def corrupt_second_batch(split: str) -> None:
    real_epoch = Loader.epoch

    def epoch(self, index, start=0):
        for i, batch in enumerate(real_epoch(self, index, start)):
            if self.split == split and i == 1:
                raise LoaderError(f"{split}-000001.tar: unexpected end of data; rebuild the shards")
            yield batch

    Loader.epoch = epoch


def out_of_memory_in_evaluation() -> None:
    def forward_loss(*args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    training.evaluate.forward_loss = forward_loss


def full_disk() -> None:
    def save(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    torch.save = save


def interrupt_after_second_step(pid: Callable[[], int] = os.getpid) -> None:
    real_step, calls = train.train_step, []

    def step(*args):
        result = real_step(*args)
        calls.append(None)
        if len(calls) == 2:
            os.kill(pid(), signal.SIGINT)
        return result

    train.train_step = step


FAULTS = {
    "nan": poison_loss_from_second_step,
    "loader": lambda: corrupt_second_batch("train"),
    "eval-loader": lambda: corrupt_second_batch("test"),
    "eval-step": out_of_memory_in_evaluation,
    "save": full_disk,
    "sigint": interrupt_after_second_step,
    "sigint-launcher": lambda: interrupt_after_second_step(os.getppid),
}

if __name__ == "__main__":
    fault, rank, *options = sys.argv[1:]
    if rank in (os.environ.get("RANK"), "all"):
        FAULTS[fault]()
    sys.exit(train.cli(options))
