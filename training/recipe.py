"""Training recipes: the optimizer, learning-rate schedule and loss weights, as named presets.

The presets' values are :data:`model.recipes.RECIPES` (imported here as ``RECIPES``): the one
table every default comes from, ``UNetConfig``'s, ``LossConfig``'s and train.py's
``TrainConfig``'s alike. ``default`` is AdamW with a linear warm-up and a cosine decay sized
from the run's total steps (steps per epoch x epochs), so the same settings suit a few
hundred samples and the full 400,000: a small set gets a short warm-up and decays within its
few steps, a large one spreads both over its many. ``reference`` is the reference solution's
recipe exactly: SGD lr 0.01 momentum 0.9, StepLR(2 epochs, 0.1), loss ``2 * BCE + (1 - SSIM)``.

Every recipe field is also a train.py option; an explicit option overrides the recipe's value.
The schedule is stepped once per optimizer step, so a resumed run continues it exactly.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from model import SKIPS
from model.recipes import RECIPES
from training.options import positive_int, widths_type

__all__ = ["RECIPES", "LrSchedule", "build_optimizer", "optimizer_implementation", "recipe_values"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step")


def recipe_values(name: str = "default", **overrides: Any) -> SimpleNamespace:
    """Recipe ``name``'s values (and ``overrides``, e.g. ``epochs``) as attributes: what
    :func:`build_optimizer` reads, for the benchmarks, which have no TrainConfig."""
    return SimpleNamespace(**{"epochs": 1, **RECIPES[name], **overrides})


def fraction(text: str) -> float:
    """argparse type: a float in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1): a share of all steps")
    return value


def share(text: str) -> float:
    """argparse type: a float in (0, 1]."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in (0, 1]: a share of all steps")
    return value


def add_model_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "Model" option group with the recipe's model fields; returned for more options."""
    g = parser.add_argument_group("Model", "Options left out take the --recipe's value.")
    on_off = argparse.BooleanOptionalAction
    g.add_argument("--widths", type=widths_type, help="UNet channels per level")
    g.add_argument("--diff-input", action=on_off, help="also feed fg_bg - bg, |fg_bg - bg|")
    g.add_argument("--skip", choices=SKIPS, help="decoder: concat or add the encoder skips")
    g.add_argument("--context", action=on_off, help="global and row context blocks for depth")
    return g


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """The "Optimisation" option group; each option left out takes the ``--recipe``'s value."""
    values = "; ".join(
        f"{name}: " + ", ".join(f"{k}={v}" for k, v in preset.items())
        for name, preset in RECIPES.items()
    )
    g = parser.add_argument_group(
        "Optimisation", f"Options left out take the --recipe's value. {values}."
    )
    g.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default="default",
        help="preset: default; reference (the reference solution's, jitter drawn apart for bg "
        "and fg_bg); few-objects (the default with flips, object jitter and soft Dice, for data "
        "with few foreground objects)",
    )
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="adamw: decoupled weight decay")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--momentum", type=float, help="SGD only")
    g.add_argument("--weight-decay", type=float, help="L2 penalty (adamw: decoupled)")
    g.add_argument("--schedule", choices=SCHEDULES, help="cosine: warm-up, cosine to 0; step")
    g.add_argument("--warmup", type=fraction, help="cosine: share of all steps warming up")
    g.add_argument(
        "--cooldown",
        type=share,
        help="cosine: share of all steps in the final decay to 0; the lr holds its peak "
        "between warm-up and cool-down (1: decay from the end of the warm-up)",
    )
    g.add_argument("--lr-step", type=positive_int, help="step: epochs between decays")
    g.add_argument("--lr-gamma", type=float, help="step: decay factor")
    g.add_argument("--mask-weight", type=float, help="weight of mask BCE")
    g.add_argument("--dice-weight", type=float, help="weight of mask (1 - soft Dice)")
    g.add_argument("--depth-weight", type=float, help="weight of depth (1 - SSIM)")
    g.add_argument("--depth-l1-weight", type=float, help="weight of depth L1")
    g.add_argument("--depth-grad-weight", type=float, help="weight of depth gradient L1")
    g.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        help="training: mirror all four images of half the samples",
    )
    g.add_argument(
        "--object-jitter",
        type=float,
        help="training: X in [0, 1); fg_bg's pixels inside the mask get a gain from [1-X, 1+X] "
        "and a shift from [-X, X] * 128 grey levels, so the object sometimes matches the wall",
    )
    g.add_argument(
        "--paired-jitter",
        action=argparse.BooleanOptionalAction,
        help="training: fg_bg gets bg's colour-jitter factors and noise, so that the two "
        "differ only where the object is (drawn apart, they differ everywhere a little)",
    )
    g.add_argument(
        "--depth-aux-weight",
        type=float,
        help="deep supervision: above 0 adds depth heads on the coarser decoder levels "
        "(training only) and weighs their (1 - SSIM) + gradient loss",
    )


def resolve(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` with each recipe field left as None replaced by ``args["recipe"]``'s value."""
    preset = RECIPES[args["recipe"]]
    return {**args, **{k: v for k, v in preset.items() if args.get(k) is None}}


@dataclass
class LrSchedule:
    """The learning-rate factor at an optimizer step, for ``torch.optim.lr_scheduler.LambdaLR``.

    A callable object, not a closure, so LambdaLR stores its fields in the checkpoint.
    ``cosine``: linear warm-up from ~0 over ``warmup_steps``, the peak held, then a cosine to
    0 over the last ``decay_steps`` (0: every step after the warm-up, a plain warm-up +
    cosine) ending at ``total_steps``: warm-up, stable, decay. ``step``:
    ``lr_gamma ** (epoch // lr_step)``, torchvision's StepLR.
    """

    kind: str
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int
    lr_step: int
    lr_gamma: float
    decay_steps: int = 0  # checkpoints from before the field decay over every step

    def __call__(self, step: int) -> float:
        if self.kind == "step":
            return self.lr_gamma ** (step // (self.lr_step * self.steps_per_epoch))
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = self.decay_steps or self.total_steps - self.warmup_steps
        start = self.total_steps - span
        if step < start:
            return 1.0
        progress = min((step - start) / max(span, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_implementation(device: torch.device, optimizer: str = "adamw") -> dict[str, bool]:
    """How the update runs: one fused kernel for all parameters on CUDA (Adam and AdamW),
    else ``foreach``: a few multi-tensor ops per step instead of a Python loop over the
    model's ~200 parameter tensors, whose per-tensor ops dominate a small model's update.
    """
    if device.type == "cuda" and optimizer in ("adam", "adamw"):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(
    cfg: Any, model: nn.Module, steps_per_epoch: int = 1
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer ``cfg`` (a TrainConfig) names, and its schedule stepped per optimizer step.

    ``steps_per_epoch`` sizes the schedule: cosine spans ``steps_per_epoch * cfg.epochs``.
    """
    params, decay = list(model.parameters()), cfg.weight_decay
    device = params[0].device if params else torch.device("cpu")
    kind = optimizer_implementation(device, cfg.optimizer)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=decay, **kind
        )
    elif cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=decay, **kind)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=decay, **kind)
    total = steps_per_epoch * cfg.epochs
    warmup = round(cfg.warmup * total)
    schedule = LrSchedule(
        kind=cfg.schedule,
        total_steps=total,
        warmup_steps=warmup,
        decay_steps=min(round(cfg.cooldown * total), total - warmup),
        steps_per_epoch=steps_per_epoch,
        lr_step=cfg.lr_step,
        lr_gamma=cfg.lr_gamma,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
