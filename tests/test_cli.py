"""Every command line that reads data, pointed at a missing or an empty data directory.

The convention for all of them: exit status 0 on success, 1 for a data or environment
problem (one line on stderr naming the path, no traceback), 2 for a usage error. Here each
must exit 1 and leave the file system as it found it. ``model.summary`` and
``benchmarks.model_step`` read no data, so they are not here.
"""

from __future__ import annotations

import pytest

from tests.conftest import run_cli, snapshot

# Each command line, with {data} for the data directory and {out} for an output path that must
# not appear. predict.py reads its checkpoint first, so the checkpoint is in the data directory.
COMMANDS = {
    "sharding.synth": "-m sharding.synth --assets {data} --out {out} --batches 1 --backgrounds 1"
    " --foregrounds 1 --placements 1",
    "sharding.build": "-m sharding.build {data} --out {out}",
    "sharding.verify": "-m sharding.verify {data}",
    "pipeline.preview": "-m pipeline.preview --data {data} --out {out}",
    "benchmarks.loaders": "-m benchmarks.loaders --data {data} --json {out}",
    "benchmarks.dali_startup": "-m benchmarks.dali_startup --data {data} --json {out}",
    "benchmarks.shard_vs_unzip": "-m benchmarks.shard_vs_unzip {data} --json {out}",
    "benchmarks.train_throughput": "-m benchmarks.train_throughput --data {data} --json {out}",
    "train.py": "train.py --data {data} --out {out}",
    "predict.py": "predict.py --checkpoint {data}/best.pt --bg-dir {data} --fg-bg-dir {data}"
    " --out {out}",
}


@pytest.mark.parametrize("state", ["missing", "empty"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_missing_or_empty_data_is_one_line_and_exit_1(command, state, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    if state == "empty":
        data.mkdir()
    (tmp_path / "keep.txt").write_text("the user's file")  # must survive untouched
    before = snapshot(tmp_path)
    result = run_cli(*(arg.format(data=data, out=out) for arg in COMMANDS[command].split()))
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(data) in lines[0]
    assert snapshot(tmp_path) == before
