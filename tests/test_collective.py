"""A failure on one rank stops every rank with the same one line, nothing hangs, and the
ranks talk to each other rarely: at most one host collective per 5 training steps.

The end-to-end cases run train.py under real torchrun (2 gloo processes on the CPU) through
``tests/fault_rank.py``, which injects one fault on one rank by monkeypatching, in training
or in the evaluation after it, and ``tests/count_collectives.py``, which counts the calls of
torch.distributed's collectives on each rank. torchrun's
``--tee 3`` prefixes each rank's lines with ``[defaultR]:``, so the test reads both ranks'
output apart. The collective itself (:func:`training.distributed.agree`) is also checked
with two real gloo processes started by ``torch.multiprocessing``, and a single process
(evaluation included) with no collective at all.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train
from pipeline import LoaderError
from tests.conftest import ROOT, run_cli
from training.distributed import Runtime, agree, on_main
from training.errors import TrainError
from training.evaluate import evaluate
from training.rundir import RunDir

TINY_RUN = ("--batch-size", "4", "--max-batches", "2", "--widths", "4,8,16", "--seed", "0")
# What each fault's one line says, and which rank has it (a checkpoint is saved by rank 0).
FAULTS = {
    "nan": (1, "rank 1: loss is nan at epoch 1 step 2; stopped, no checkpoint was written yet"),
    "loader": (1, "rank 1: train-000001.tar: unexpected end of data; rebuild the shards"),
    "eval-loader": (1, "rank 1: test-000001.tar: unexpected end of data; rebuild the shards"),
    "save": (0, "rank 0: could not write checkpoint"),
}


def traceback_on(stderr: str, rank: int | str = r"\d") -> bool:
    """Whether rank ``rank`` printed a traceback (torch prefixes an uncaught one's lines with
    ``[rankR]: ``)."""
    return bool(re.search(rf"\[default{rank}\]:(\[rank{rank}\]: )?Traceback", stderr))


def rank_errors(stderr: str, rank: int) -> list[str]:
    """Rank ``rank``'s error lines. torchrun merges the ranks' streams, so a line may start
    in the middle of another rank's progress bar: look for the prefix anywhere."""
    return re.findall(rf"\[default{rank}\]:(train\.py: error: [^\r\n]*)", stderr)


def torchrun_fault(fault: str, rank: int, shards: Path, out: Path, *options: str):
    """train.py for one tiny epoch under torchrun, with ``fault`` injected on ``rank`` only;
    ``options`` go last, so they override the ones here."""
    # A long monitor interval: torchrun must not be what ends the rank without the fault.
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--tee", "3")
    return run_cli(
        *torchrun,
        "--monitor-interval",
        "5",
        "tests/fault_rank.py",
        fault,
        str(rank),
        *("--data", str(shards), "--epochs", "1", "--out", str(out), "--log-interval", "1"),
        *TINY_RUN,
        *options,
        timeout=240,  # a rank left waiting in an all-reduce would wait 30 minutes
    )


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_on_one_rank_stops_both_with_the_same_line(fault, tiny_shards, tmp_path):
    rank, expected = FAULTS[fault]
    out = tmp_path / "run"
    result = torchrun_fault(fault, rank, tiny_shards, out)
    assert result.returncode == 1, result.stderr
    assert not traceback_on(result.stderr), result.stderr
    errors = [rank_errors(result.stderr, r) for r in (0, 1)]
    assert len(errors[0]) == 1 and errors[0] == errors[1], result.stderr
    assert expected in errors[0][0]
    # Nothing half-written: the run failed in its first epoch, so no checkpoint at all.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == []


def test_a_loader_fault_between_log_steps_is_agreed_on_before_any_save(tiny_shards, tmp_path):
    """Rank 1 cannot read its second batch (step 2); the ranks next agree at step 3, a
    checkpoint step, before rank 0 saves: both stop there with rank 1's line, and no
    checkpoint holds the steps rank 1 took on its filler batch."""
    out = tmp_path / "run"
    options = ("--max-batches", "4", "--log-interval", "10", "--checkpoint-every", "3")
    result = torchrun_fault("loader", 1, tiny_shards, out, *options)
    assert result.returncode == 1, result.stderr
    assert not traceback_on(result.stderr), result.stderr
    errors = [rank_errors(result.stderr, r) for r in (0, 1)]
    assert len(errors[0]) == 1 and errors[0] == errors[1], result.stderr
    assert FAULTS["loader"][1] in errors[0][0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == []


# What a run may spend besides its steps' share: the set-up (rank 0's verdict on the run
# directory, DDP's first broadcast of the weights) and each epoch's end (the train totals,
# one BatchNorm buffer sync, the evaluation's totals, the checkpoint save).
SETUP_COLLECTIVES, EPOCH_COLLECTIVES = 3, 4


def test_at_most_one_host_collective_per_five_steps(tiny_shards, tmp_path):
    """Counted from outside on both ranks: 2 epochs of 16 steps (batch 1 per rank), logging
    every 10th, take no more than one collective per 5 steps plus the fixed allowance, with
    evaluation included (one per epoch, none repeated at the end)."""
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    run = ("--data", str(tiny_shards), "--out", str(tmp_path / "run"), "--epochs", "2")
    run += ("--batch-size", "1", "--widths", "4,8,16", "--log-interval", "10", "--seed", "0")
    result = run_cli(*torchrun, "tests/count_collectives.py", str(tmp_path), *run, timeout=240)
    assert result.returncode == 0, result.stderr
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        steps, calls = report["train_steps"], sum(report["calls"].values())
        assert steps == 32 and report["eval_batches"] == 2 * 16, report  # 32 test samples / 2
        assert calls <= steps / 5 + SETUP_COLLECTIVES + 2 * EPOCH_COLLECTIVES, report
        # DDP's only buffer broadcast is its first; the BatchNorm sync is one per epoch.
        assert report["calls"].get("_broadcast_coalesced") == 1, report
        assert report["calls"].get("broadcast") == 2, report


def test_exception_in_evaluation_on_one_rank_stops_the_other_with_its_line(tiny_shards, tmp_path):
    out = tmp_path / "run"
    result = torchrun_fault("eval-step", 1, tiny_shards, out)
    assert result.returncode == 1, result.stderr
    # Not a user error: rank 1 raises it with its traceback; rank 0 stops with its one line.
    assert traceback_on(result.stderr, 1), result.stderr
    assert "[rank1]: RuntimeError: CUDA out of memory" in result.stderr
    assert not traceback_on(result.stderr, 0), result.stderr
    expected = "train.py: error: rank 1: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert rank_errors(result.stderr, 0) == [expected], result.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agree_worker(rank: int, port: int, results: Path) -> None:
    """One gloo rank: rank 1 fails with a user error, then with a bug; rank 0 with neither."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rt = Runtime(torch.device("cpu"), rank=rank, world_size=2)
    seen = [f"go on: {agree(None, rt)}", f"done: {agree(None, rt, done=rank == 0)}"]
    for error in (TrainError("shard 3 is corrupt"), KeyError("bug")):
        try:
            agree(error if rank == 1 else None, rt)
        except Exception as e:
            seen.append(f"{type(e).__name__}: {e}")
    try:
        on_main(rt, lambda: (_ for _ in ()).throw(TrainError("disk full")))
    except TrainError as e:
        seen.append(f"{type(e).__name__}: {e}")
    (results / str(rank)).write_text("\n".join(seen))
    dist.destroy_process_group()


def test_agree_stops_every_rank_with_the_first_failing_ranks_message(tmp_path):
    mp.spawn(agree_worker, args=(free_port(), tmp_path), nprocs=2, join=True)
    rank0 = (tmp_path / "0").read_text().splitlines()
    rank1 = (tmp_path / "1").read_text().splitlines()
    assert rank0[:2] == rank1[:2] == ["go on: False", "done: True"]
    assert rank0[2] == rank1[2] == "TrainError: rank 1: shard 3 is corrupt"
    # A bug is raised as it is where it happened (with its traceback); the others stop.
    assert rank0[3] == "TrainError: rank 1: 'bug'" and rank1[3] == "KeyError: 'bug'"
    assert rank0[4] == rank1[4] == "TrainError: rank 0: disk full"


def test_agree_in_one_process_raises_the_error_itself():
    rt = Runtime(torch.device("cpu"))
    assert agree(None, rt) is False and agree(None, rt, done=True) is True
    error = TrainError("loss is nan")
    with pytest.raises(TrainError) as raised:
        agree(error, rt)
    assert raised.value is error


def test_evaluation_failure_in_one_process_is_raised_as_it_is(tiny_shards, tmp_path, monkeypatch):
    cfg = train.TrainConfig(data=str(tiny_shards), widths=(4, 8, 16), batch_size=8)
    rt = Runtime(torch.device("cpu"))
    _, test_loader, loader_cfg = train.build_loaders(cfg, rt)
    state = train.build_state(cfg, rt, RunDir(tmp_path), test_loader.channels, loader_cfg)
    error = LoaderError("test-000000.tar: unexpected end of data; rebuild the shards")

    def unreadable(index):
        raise error
        yield

    def no_collective(*args, **kwargs):
        raise AssertionError("a single process must not call a collective")

    monkeypatch.setattr(test_loader, "epoch", unreadable)
    for name in ("all_reduce", "all_gather_object", "broadcast_object_list"):
        monkeypatch.setattr(dist, name, no_collective)
    with pytest.raises(LoaderError) as raised:
        evaluate(state, test_loader, 2, rt)
    assert raised.value is error


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "--rootdir", str(ROOT)]))
