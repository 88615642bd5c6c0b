"""Training recipes: what each preset resolves to, overrides, and the per-step schedules."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

import train
from model import LOSS_WEIGHTS, LossConfig, UNet, UNetConfig
from tests.conftest import run_cli
from training.checkpoint import MODEL_KEYS, TrainState, check_compatible, load_weights
from training.errors import TrainError
from training.recipe import RECIPES, LrSchedule, build_optimizer, optimizer_implementation

# The model checkpoints without the newer fields were: what UNetConfig() built before them.
PLAIN = {"diff_input": False, "skip": "concat", "context": False, "aux_depth": False}


def test_reference_recipe_is_the_reference_solution():
    cfg = train.parse_args(["--data", "d", "--recipe", "reference"])
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.schedule) == ("sgd", 0.01, 0.9, "step")
    assert (cfg.lr_step, cfg.lr_gamma) == (2, 0.1)
    assert (cfg.mask_weight, cfg.depth_weight, cfg.dice_weight, cfg.depth_l1_weight) == (
        2.0,
        1.0,
        0.0,
        0.0,
    )
    assert cfg.diff_input is False
    assert (cfg.skip, cfg.context) == ("concat", False)  # the reference's plain UNet
    assert cfg.paired_jitter is False  # its jitter drew bg and fg_bg apart


def test_default_recipe_fills_the_config_and_flags_override():
    cfg = train.parse_args(["--data", "d"])
    assert cfg.recipe == "default"
    assert {k: getattr(cfg, k) for k in RECIPES["default"]} == RECIPES["default"]
    # The dataclass defaults are the default recipe, so TrainConfig() and the CLI agree.
    assert cfg == train.TrainConfig(data="d")
    cfg = train.parse_args(["--data", "d", "--recipe", "reference", "--lr", "0.5", "--diff-input"])
    assert (cfg.optimizer, cfg.lr, cfg.diff_input) == ("sgd", 0.5, True)


def test_default_recipe_pairs_the_jitter_and_the_loader_gets_it(tiny_shards):
    from training.builders import build_loaders
    from training.distributed import Runtime

    rt = Runtime(device=torch.device("cpu"))
    for argv, paired in (
        ([], True),
        (["--no-paired-jitter"], False),
        (["--recipe", "reference"], False),
    ):
        cfg = train.parse_args(["--data", str(tiny_shards), "--batch-size", "4", *argv])
        assert cfg.paired_jitter is paired
        *_, loader_cfg = build_loaders(cfg, rt)
        assert (loader_cfg.paired_jitter, loader_cfg.flip) == (paired, cfg.flip)


def test_few_objects_recipe_is_the_default_with_flips_jitter_and_dice():
    cfg = train.parse_args(["--data", "d", "--recipe", "few-objects"])
    assert (cfg.flip, cfg.object_jitter, cfg.dice_weight) == (True, 0.95, 1.0)
    changed = {k for k, v in RECIPES["default"].items() if getattr(cfg, k) != v}
    assert changed == {"flip", "object_jitter", "dice_weight"}
    cfg = train.parse_args(["--data", "d", "--recipe", "few-objects", "--no-flip"])
    assert (cfg.flip, cfg.object_jitter) == (False, 0.95)


def test_cosine_warms_up_then_decays_to_zero():
    schedule = LrSchedule("cosine", total_steps=100, warmup_steps=10, steps_per_epoch=25,
                          lr_step=2, lr_gamma=0.1)  # fmt: skip
    factors = [schedule(step) for step in range(101)]
    assert factors[0] < 0.1
    assert all(a < b for a, b in itertools.pairwise(factors[:11]))  # warm-up rises
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))  # then never rises
    assert factors[55] == pytest.approx(0.5)
    assert factors[100] == pytest.approx(0.0, abs=1e-12)


def test_cosine_with_a_cooldown_holds_the_peak_then_decays_to_zero():
    schedule = LrSchedule("cosine", total_steps=100, warmup_steps=10, steps_per_epoch=25,
                          lr_step=2, lr_gamma=0.1, decay_steps=20)  # fmt: skip
    factors = [schedule(step) for step in range(101)]
    assert all(a < b for a, b in itertools.pairwise(factors[:11]))  # warm-up rises
    assert factors[10:81] == [1.0] * 71  # the peak holds until the last 20 steps
    assert all(a > b for a, b in itertools.pairwise(factors[80:]))  # then falls
    assert factors[90] == pytest.approx(0.5)
    assert factors[100] == pytest.approx(0.0, abs=1e-12)
    # --cooldown 0.25 decays over the last quarter; the default (1) is the plain cosine.
    wsd = train.parse_args(["--data", "d", "--epochs", "4", "--cooldown", "0.25"])
    _, scheduler = build_optimizer(wsd, nn.Linear(2, 1), steps_per_epoch=25)
    shape = scheduler.lr_lambdas[0]
    assert (shape.warmup_steps, shape.decay_steps) == (5, 25) and shape(70) == 1.0
    plain = train.parse_args(["--data", "d", "--epochs", "4"])
    _, scheduler = build_optimizer(plain, nn.Linear(2, 1), steps_per_epoch=25)
    assert scheduler.lr_lambdas[0].decay_steps == 95 and scheduler.lr_lambdas[0](55) < 0.9


def test_step_schedule_matches_torchvision_steplr_per_epoch():
    schedule = LrSchedule("step", total_steps=60, warmup_steps=0, steps_per_epoch=10,
                          lr_step=2, lr_gamma=0.1)  # fmt: skip
    per_epoch = [schedule(epoch * 10 + 5) for epoch in range(6)]
    assert per_epoch == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_schedule_spans_the_runs_steps_and_round_trips_a_checkpoint():
    cfg = train.TrainConfig(data="d", epochs=3)
    model = nn.Linear(2, 1)
    optimizer, scheduler = build_optimizer(cfg, model, steps_per_epoch=7)
    assert isinstance(optimizer, torch.optim.AdamW)
    lrs = []
    for _ in range(21):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(lrs) == pytest.approx(cfg.lr, rel=0.05)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    # A resumed run rebuilds the schedule and loads its state: the same lr at the same step.
    saved = scheduler.state_dict()
    _, scheduler2 = build_optimizer(cfg, nn.Linear(2, 1), steps_per_epoch=7)
    scheduler2.load_state_dict(saved)
    assert scheduler2.last_epoch == 21
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_checkpoint_with_other_diff_input_is_refused():
    saved = {"model_config": {"in_channels": 1, "widths": [4, 8, 16]}}  # an old checkpoint
    check_compatible(saved, Path("old.pt"), UNetConfig(in_channels=1, widths=(4, 8, 16), **PLAIN))
    new = UNetConfig(in_channels=1, widths=(4, 8, 16), **{**PLAIN, "diff_input": True})
    with pytest.raises(TrainError, match=r"diff_input=False.*pass --no-diff-input"):
        check_compatible(saved, Path("old.pt"), new)


@pytest.mark.parametrize(
    ("field", "flag"), [("skip", "--skip concat"), ("context", "--no-context")]
)
def test_checkpoint_without_the_newer_model_fields_is_the_plain_unet(field, flag):
    old = {"model_config": {"in_channels": 1, "widths": [4, 8, 16]}}  # before skip, context
    check_compatible(old, Path("old.pt"), UNetConfig(in_channels=1, widths=(4, 8, 16), **PLAIN))
    new = UNetConfig(
        in_channels=1, widths=(4, 8, 16), **{**PLAIN, field: RECIPES["default"][field]}
    )
    with pytest.raises(TrainError, match=rf"{field}=(concat|False) .*pass {flag}$"):
        check_compatible(old, Path("old.pt"), new)


def test_weights_load_across_the_aux_depth_heads_and_nothing_else():
    torch.manual_seed(0)
    plain = UNet(UNetConfig(in_channels=1, widths=(4, 8, 16, 32), aux_depth=False))
    aux = UNet(UNetConfig(in_channels=1, widths=(4, 8, 16, 32), aux_depth=True))
    fresh_heads = {k: v.clone() for k, v in aux.state_dict().items() if k.startswith("aux_")}
    load_weights(aux, plain.state_dict())  # a checkpoint without heads: they stay fresh
    for key, value in aux.state_dict().items():
        expected = fresh_heads[key] if key.startswith("aux_") else plain.state_dict()[key]
        torch.testing.assert_close(value, expected)
    trained = {k: v + 1 if k.startswith("aux_") else v for k, v in aux.state_dict().items()}
    load_weights(aux, trained)  # a checkpoint with heads: they load too
    torch.testing.assert_close(aux.aux_heads["2"].weight, fresh_heads["aux_heads.2.weight"] + 1)
    load_weights(plain, trained)  # a model without heads drops them
    assert not any(k.startswith("aux_") for k in plain.state_dict())
    other = UNet(UNetConfig(in_channels=1, widths=(4, 8, 16, 64), aux_depth=False))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_weights(other, plain.state_dict())


def test_every_default_is_the_default_recipes():
    """UNetConfig(), LossConfig() and TrainConfig() build the default recipe's model and loss."""
    default = RECIPES["default"]
    unet = UNetConfig()
    assert {k: getattr(unet, k) for k in MODEL_KEYS} == {k: default[k] for k in MODEL_KEYS}
    assert unet.aux_depth is (default["depth_aux_weight"] > 0)
    assert asdict(LossConfig()) == {k: default[k] for k in LOSS_WEIGHTS}
    cfg = train.TrainConfig()
    assert {k: getattr(cfg, k) for k in default} == default


def test_the_recipe_table_is_the_one_source_of_the_defaults():
    """Change the table before anything reads it, and every default follows: no copies."""
    probe = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('model.recipes', 'model/recipes.py')\n"
        "recipes = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(recipes)\n"
        "recipes.DEFAULT.update(widths=(8, 16, 32), skip='concat', context=False,\n"
        "                       diff_input=False, depth_aux_weight=0.0, mask_weight=3.0, lr=0.5)\n"
        "sys.modules['model.recipes'] = recipes\n"
        "import train\n"
        "from model import LossConfig, UNetConfig\n"
        "unet, loss, cfg = UNetConfig(), LossConfig(), train.parse_args(['--data', 'd'])\n"
        "print(json.dumps([unet.widths, unet.skip, unet.context, unet.diff_input,\n"
        "                  unet.aux_depth, loss.mask_weight, loss.depth_aux_weight,\n"
        "                  train.TrainConfig().lr, cfg.lr, cfg.widths, cfg.mask_weight]))\n"
    )
    result = run_cli("-c", probe)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        [8, 16, 32],
        "concat",
        False,
        False,
        False,
        3.0,
        0.0,
        0.5,
        0.5,
        [8, 16, 32],
        3.0,
    ]


def test_adamw_is_fused_on_cuda_and_foreach_on_the_cpu():
    assert optimizer_implementation(torch.device("cuda")) == {"fused": True}
    assert optimizer_implementation(torch.device("cpu")) == {"foreach": True}
    assert optimizer_implementation(torch.device("cuda"), "sgd") == {"foreach": True}
    cfg = train.TrainConfig(data="d")
    model = nn.Linear(2, 1)
    optimizer, scheduler = build_optimizer(cfg, model)
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.AdamW) and group["foreach"] is True
    assert not group["fused"]
    # A checkpoint from another machine (here: fused, no foreach) does not choose for this one.
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "history": [], "best_iou": 0.0}  # fmt: skip
    saved["optimizer"]["param_groups"][0].update(foreach=None, fused=True)
    fresh, fresh_schedule = build_optimizer(cfg, nn.Linear(2, 1))
    state = TrainState(model, model, nn.Identity(), fresh, fresh_schedule, None, None, {})
    state.load_state_dict(saved, restore_rng=False)
    assert fresh.param_groups[0]["foreach"] is True and not fresh.param_groups[0]["fused"]
    assert fresh.param_groups[0]["lr"] == group["lr"]  # the maths is the checkpoint's


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adamw_on_cuda_is_fused():
    optimizer, _ = build_optimizer(train.TrainConfig(data="d"), nn.Linear(2, 1).cuda())
    assert optimizer.param_groups[0]["fused"] is True
