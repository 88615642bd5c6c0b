"""The command lines of the benchmarks and pipeline.preview: names, help, warm-up, refusals.

Benchmarks run here on tiny data only, to keep them from rotting, never to assert a speed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time

import pytest
import torch

from benchmarks import dali_startup, loaders, model_step, report, train_throughput
from model import UNetConfig
from pipeline import preview
from pipeline.loader import dali_available
from tests.conftest import omp_policy_when_torch_loads, snapshot
from training.distributed import Runtime

CLIS = (
    "pipeline.preview",
    "benchmarks.model_step",
    "benchmarks.train_throughput",
    "benchmarks.loaders",
    "benchmarks.dali_startup",
    "benchmarks.quality",
)
TORCH_BENCHMARKS = [name for name in CLIS if name.startswith("benchmarks.")]
TORCH_BENCHMARKS.append("benchmarks.cpu_stage")


class _Parsed(Exception):
    """Raised instead of parsing, once the parser is built."""


@pytest.mark.parametrize("module", CLIS)
def test_cli_is_named_as_run_and_every_option_has_help(module, monkeypatch):
    parsers = []

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed):
        importlib.import_module(module).parse_args([])
    (parser,) = parsers
    assert parser.prog == f"python -m {module}"
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    undocumented = [a.option_strings[0] for a in options if not a.help]
    assert undocumented == [], undocumented


def test_load_average_is_recorded_to_two_decimals(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (1.1708984375, 0.8349609375, 0.5))
    assert loaders.load_average() == [1.17, 0.83, 0.5]
    assert loaders.machine_info()["load_average_at_end"] == [1.17, 0.83, 0.5]
    assert loaders.machine_info()["load_average_1m_at_end"] == 1.17
    cpu = report.machine_info(torch.device("cpu"))  # what every benchmark records
    assert cpu["load_average_1m_at_end"] == 1.17 and cpu["device"] == "cpu" and cpu["cpu"]


@pytest.mark.skipif(not dali_available(), reason="needs nvidia.dali")
def test_dali_startup_records_the_rounded_load_average(tiny_shards, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0048828125, 1.0, 0.25))
    argv = ["--data", str(tiny_shards), "--epochs", "2", "--batch-size", "16"]
    args = dali_startup.parse_args(argv)
    machine = dali_startup.run(args)["machine"]
    assert machine["load_average_at_start"] == machine["load_average_at_end"] == [2.0, 1.0, 0.25]


def test_model_step_compiles_only_when_asked(capsys):
    assert model_step.parse_args([]).compile is False
    assert model_step.parse_args(["--compile"]).compile is True
    argv = ["--batch-size", "1", "--steps", "1", "--warmup", "0", "--no-compile"]
    assert model_step.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    # It times the default recipe's model, aux heads included, and says so first.
    assert out[0] == f"model: {UNetConfig().describe()} (the default recipe's)"
    assert "aux depth heads at 20x20, 40x40" in out[0]
    # A line before each configuration, so a long one (compiling) is not silence.
    for layout in model_step.LAYOUTS:
        started = out.index(f"timing {layout} fp32 compile=False ...")
        assert out[started + 1] == f"measured {layout} fp32 compile=False"


def test_model_step_times_eager_and_compiled_in_each_dtype():
    """make gpu-check's --compile: eager and compiled in fp32 and bf16 (compiled in
    channels_last, the layout train.py runs), eager only without it."""
    cuda = model_step.configurations(torch.device("cuda"), compile_too=True)
    compiled = [(dtype, c) for layout, dtype, c in cuda if layout == "channels_last"]
    assert sorted(compiled) == [("bf16", False), ("bf16", True), ("fp32", False), ("fp32", True)]
    cpu = model_step.configurations(torch.device("cpu"), compile_too=False)
    assert cpu == [("contiguous", "fp32", False), ("channels_last", "fp32", False)]


def test_train_throughput_times_only_after_the_warmup():
    """Slow first batches (a pipeline starting) must not count in the rate or the data wait."""
    served = []

    def batches():
        while True:
            served.append(time.perf_counter())
            if len(served) <= 3:
                time.sleep(0.4)
            yield {
                "bg": torch.rand(2, 1, 160, 160),
                "fg_bg": torch.rand(2, 1, 160, 160),
                "mask": (torch.rand(2, 1, 160, 160) > 0.5).float(),
                "depth": torch.rand(2, 1, 80, 80),
            }

    rt = Runtime(device=torch.device("cpu"))
    result = train_throughput.time_steps(batches(), 2, rt, 1, (4, 8, 16), warmup=3)
    assert len(served) == 5
    assert result["timed_batches"] == 2 and result["warmup_batches"] == 3
    assert result["data_wait_share"] < 0.2, result  # the 0.4 s waits were all in the warm-up


def test_train_throughput_says_when_too_few_batches_are_timed(tiny_shards, tmp_path, capsys):
    out = tmp_path / "throughput.json"
    argv = ["--data", str(tiny_shards), "--json", str(out), "--batches", "1", "--warmup", "1"]
    argv += ["--batch-size", "4", "--widths", "4,8,16", "--device", "cpu"]
    assert train_throughput.main(argv) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--batches 10 or more" in notes[0]
    model = json.loads(out.read_text())["model"]  # the default recipe's, at these widths
    assert (model["widths"], model["diff_input"], model["skip"]) == ([4, 8, 16], True, "add")
    assert model["description"] == UNetConfig(in_channels=1, widths=(4, 8, 16)).describe()
    results = json.loads(out.read_text())["results"]
    assert {"torch", "synthetic"} <= results.keys()
    assert all(r["timed_batches"] == 1 and r["warmup_batches"] == 1 for r in results.values())


@pytest.mark.parametrize(
    "module", [preview, loaders, dali_startup, train_throughput], ids=lambda m: m.__name__
)
def test_output_in_a_missing_directory_is_one_line_before_any_work(
    module, tiny_shards, tmp_path, capsys
):
    if module is dali_startup and not dali_available():
        pytest.skip("needs nvidia.dali")
    (tmp_path / "keep.txt").write_text("the user's file")
    before = snapshot(tmp_path)
    flag = "--out" if module is preview else "--json"
    target = tmp_path / "missing" / ("grid.png" if module is preview else "report.json")
    assert module.main(["--data", str(tiny_shards), flag, str(target)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and f"{target} does not exist; create it first" in lines[0], lines
    assert captured.out == ""  # refused before loading anything
    assert snapshot(tmp_path) == before


def test_quality_refuses_a_json_in_a_missing_directory_before_any_work(tmp_path, capsys):
    from benchmarks import quality

    target = tmp_path / "missing" / "q.json"
    assert quality.main(["--assets", str(tmp_path), "--json", str(target)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and f"{target} does not exist; create it first" in lines[0], lines
    assert captured.out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("split", "augment"), [("test", False), ("train", True)])
def test_preview_prints_the_config_the_loader_uses(tiny_shards, tmp_path, capsys, split, augment):
    out = tmp_path / "grid.png"
    argv = ["--data", str(tiny_shards), "--out", str(out), "--split", split, "--n", "2"]
    assert preview.main([*argv, "--loader", "torch", "--augment-targets"]) == 0
    printed = capsys.readouterr().out.splitlines()
    used = json.loads(printed[0])
    assert used["augment"] is augment and used["augment_targets"] is augment
    assert used["backend"] == "torch" and used["augment_in"] == "torch"
    assert f"augment={augment}" in printed[-1]
    assert out.is_file()


@pytest.mark.parametrize("module", TORCH_BENCHMARKS)
def test_omp_wait_policy_is_passive_before_torch_is_imported(module):
    """Run directly (not by make), a benchmark still keeps OpenMP from busy-waiting."""
    assert omp_policy_when_torch_loads(module) == "['PASSIVE']"
