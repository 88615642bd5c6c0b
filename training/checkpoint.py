"""What a checkpoint holds (:class:`TrainState`), how it is written and read, and RNG state.

Checkpoints are written atomically by :mod:`sharding.atomic` and read with
``torch.load(weights_only=True)``: they hold only tensors and plain values, so loading one
cannot run code.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sharding.atomic import atomic_write
from training.errors import TrainError

CHECKPOINT_FORMAT = "maskdepth-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1

# The TrainConfig fields that make up a run's maths: its data, model, optimisation, length and
# seed. A run continued from a checkpoint (--resume, --test-only) takes each one it is not given
# from the checkpoint's config, so the original flags need not be typed again.
# fmt: off
RUN_KEYS = (
    "data", "train", "test", "batch_size", "max_batches", "augment", "widths", "diff_input",
    "skip", "context", "recipe", "optimizer", "lr", "momentum", "weight_decay", "schedule",
    "warmup", "cooldown", "lr_step", "lr_gamma", "mask_weight", "dice_weight", "depth_weight",
    "depth_l1_weight", "depth_grad_weight", "depth_aux_weight", "flip", "object_jitter",
    "paired_jitter", "seed", "epochs",
)
# fmt: on
# What --resume refuses to change: anything that would alter the maths the checkpoint already
# did. The data may move (its steps per epoch are checked against the schedule instead),
# --epochs may grow or shrink (the schedule is then re-sized, see resize_schedule), and the
# batch per rank may change with the number of ranks as long as the global batch, which the
# order is cut into, stays the same (see check_global_batch).
FIXED_ON_RESUME = tuple(
    k for k in RUN_KEYS if k not in ("data", "train", "test", "epochs", "batch_size")
)
# What --weights fixes: the model's shape (in_channels and the image sizes come from the data).
MODEL_KEYS = ("widths", "diff_input", "skip", "context")
# Fields newer than some checkpoints, with the value those checkpoints ran with, so a resume,
# --weights or --test-only run of one rebuilds the same model and continues the same loss and
# schedule, whatever the default recipe (and so UNetConfig's defaults) says today.
MODEL_FIELDS_BEFORE = {"diff_input": False, "skip": "concat", "context": False}
FIELDS_BEFORE = {
    **MODEL_FIELDS_BEFORE,
    "cooldown": 1.0,
    "depth_grad_weight": 0.0,
    "depth_aux_weight": 0.0,
    "flip": False,
    "object_jitter": 0.0,
    "paired_jitter": False,
}
# The auxiliary depth heads (UNetConfig.aux_depth): training scaffolding, absent at inference.
AUX_PREFIX = "aux_heads."
# Optimizer param-group flags that choose an implementation, not the maths.
IMPLEMENTATION = ("foreach", "fused")


class CheckpointError(TrainError):
    """A checkpoint could not be written or read; the message says which file and why."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (see :mod:`sharding.atomic`).

    On any write error (a full disk, a quota) the temporary file is removed and the file
    already at ``path`` is left as it was.
    """
    path = Path(path)
    try:
        with atomic_write(path, "wb") as f:
            header = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION}
            torch.save({**header, **state}, f)
    # torch.save reports a failed write (a full disk, a size limit) as RuntimeError from its
    # zip writer, or as OSError when the file cannot even be opened.
    except (OSError, RuntimeError) as e:
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [repr(e)])[0]
        raise CheckpointError(
            f"could not write checkpoint {path}: {reason}; the previous checkpoint there is "
            "intact. Free some space or pass another --out"
        ) from e


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` so that no pickled code can run."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    try:
        with warnings.catch_warnings():  # torch warns of foreign pickles before refusing them
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    # Broad on purpose: the weights-only unpickler fails on foreign files in many ways (a text
    # file is a KeyError). torch's own message advises weights_only=False, wrong here.
    except Exception as e:
        raise CheckpointError(
            f"refused to load checkpoint {path}: it is not a plain-tensor checkpoint "
            f"({type(e).__name__} from torch.load); pass best.pt or last.pt written by train.py"
        ) from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a maskdepth checkpoint written by train.py")
    if state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format_version={state.get('format_version')} but this "
            f"train.py reads version {CHECKPOINT_FORMAT_VERSION}; retrain or use the matching "
            "version"
        )
    return state


def options_from_checkpoint(options: dict[str, Any], given: set[str], last: Path) -> dict[str, Any]:
    """train.py's ``options`` with the checkpoint's values for those not ``given`` (typed).

    With ``resume`` (from ``last``) or ``test_only``, every one of :data:`RUN_KEYS`; with
    ``weights`` alone (a new run from trained weights), the model's :data:`MODEL_KEYS`. A
    given option that contradicts the checkpoint is refused, all of them in one line, where
    it is one of :data:`FIXED_ON_RESUME` (resume) or :data:`MODEL_KEYS`. The model's keys
    come from the checkpoint's model config, as predict.py reads them; the rest from its run
    config.
    """
    resume = options["resume"]
    if not (resume or options["weights"]):
        return options
    path = last if resume else Path(options["weights"])
    take = RUN_KEYS if resume or options["test_only"] else MODEL_KEYS
    if given & {"data", "train", "test"}:  # new data, given as --data or as --train/--test
        take = tuple(k for k in take if k not in ("data", "train", "test"))
    fixed = FIXED_ON_RESUME if resume else MODEL_KEYS
    if not path.is_file():
        flag, fix = ("--resume", "start without --resume") if resume else ("--weights", "check it")
        raise CheckpointError(f"{flag}: no checkpoint at {path}; {fix}")
    state = load_checkpoint(path)
    saved = {**FIELDS_BEFORE, **state.get("config", {}), **state.get("model_config", {})}
    epochs = options["epochs"] if "epochs" in given else saved.get("epochs", 0)
    if resume and epochs < state["epoch"]:
        raise CheckpointError(
            f"--epochs {epochs} is fewer than the {state['epoch']} epochs checkpoint {path} "
            f"has done; pass --epochs {state['epoch']} or more"
        )
    options, differ = dict(options), []
    for key in take:
        if key not in saved:
            continue
        if key not in given:
            options[key] = tuple(saved[key]) if isinstance(saved[key], list) else saved[key]
        elif key in fixed and plain(options[key]) != plain(saved[key]):
            differ.append(f"{key}={plain(saved[key])!r} (now {plain(options[key])!r})")
    if differ:
        fix = "continue with the checkpoint's, or start a new --out" if resume else "use its model"
        raise CheckpointError(
            f"checkpoint {path} belongs to a different config: {', '.join(differ)}; drop "
            f"{'that option' if len(differ) == 1 else 'those options'} to {fix}"
        )
    return options


def saved_model_config(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``model_config`` as ``UNetConfig`` keywords, with the value it ran with
    for every field newer than it (predict.py and the benchmarks rebuild its model so)."""
    saved = {**MODEL_FIELDS_BEFORE, "aux_depth": False, **state["model_config"]}
    return {**saved, "widths": tuple(saved["widths"])}


def resize_schedule(scheduler: Any, fresh: dict[str, Any], path: Path) -> str | None:
    """Give a restored ``LambdaLR`` the shape ``fresh`` (this run's schedule state, sized from
    its ``--epochs``) from the step it reached on.

    A resumed run with more (or fewer) epochs follows the schedule of a run of the new length
    from here on; the steps already taken keep the lr they had. A schedule counted in epochs
    (``step``) is the same at any length, so such a run matches an uninterrupted one of the
    new length exactly; a ``cosine`` one is sized from the run's total steps, so the new run
    continues with the lr that the longer run has at this step. The steps per epoch must
    match: they fix where every earlier step sits in the schedule.

    Returns one line saying what the lr does now when the length changed, else None: a
    finished cosine run extended by ``--epochs`` jumps from 0 back up, which deserves a word.
    """
    resized = []
    for schedule, shape in zip(scheduler.lr_lambdas, fresh["lr_lambdas"]):
        if not shape:  # a plain function: no shape to restore
            continue
        ran, now = getattr(schedule, "steps_per_epoch", None), shape.get("steps_per_epoch")
        if ran != now:
            raise CheckpointError(
                f"checkpoint {path} ran {ran} optimizer steps per epoch but this run makes {now}; "
                "resume with the same data, --batch-size, --max-batches and number of ranks"
            )
        if schedule.total_steps != shape["total_steps"]:
            resized.append((schedule.kind, schedule.total_steps // max(now, 1), shape))
        schedule.__dict__.update(shape)
    step = scheduler.last_epoch  # LambdaLR counts optimizer steps in last_epoch
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    before = [group["lr"] for group in scheduler.optimizer.param_groups]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    if not resized:
        return None
    kind, ran, shape = resized[0]
    epochs = shape["total_steps"] // max(shape["steps_per_epoch"], 1)
    if kind == "step":
        return (
            f"lr schedule: step, counted in epochs, so the {epochs}-epoch run goes on at lr "
            f"{lrs[0]:.3g} from step {step}"
        )
    return (
        f"lr schedule: the {ran}-epoch cosine is re-sized to {epochs} epochs; the lr goes from "
        f"{before[0]:.3g} to {lrs[0]:.3g} at step {step} and follows the {epochs}-epoch "
        f"schedule from there, to 0 at step {shape['total_steps']}"
    )


def rng_state() -> dict[str, Any]:
    """The torch, CUDA, numpy and Python RNG states as tensors and lists (``weights_only``-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(internal), gauss_next],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def plain(value: Any) -> Any:
    """Tuples as lists, as JSON has them, so ``weights_only`` loads and comparisons agree."""
    return json.loads(json.dumps(value))


@dataclass
class TrainState:
    """What training changes epoch by epoch, and everything a checkpoint stores.

    ``config`` is the run's :class:`TrainConfig` as a dict; ``history`` one record per
    finished epoch (``epoch``, ``train``, ``test``, ``timing``).
    """

    model: nn.Module  # the bare UNet: checkpoints, evaluation and figures use it
    train_model: nn.Module  # the DDP wrapper under torchrun, else the model itself
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    unet_cfg: Any  # model.UNetConfig
    loader_cfg: Any  # pipeline.LoaderConfig
    config: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    best_iou: float = -math.inf
    # Samples of epoch ``epochs_done``'s global order already trained on: 0 at an epoch's
    # start, more in a checkpoint written mid-epoch (--checkpoint-every, or on a signal).
    position: int = 0
    global_batch: int = 0  # batch_size x world_size: the order is cut into these
    notes: list[str] = field(default_factory=list)  # for the user, from restoring; not saved

    @property
    def epochs_done(self) -> int:
        """Finished epochs: a resumed run starts with the next one."""
        return len(self.history)

    def add_epoch(self, record: dict[str, Any]) -> bool:
        """Append one epoch's record; True when its test IoU is the best so far."""
        is_best = record["test"]["iou"] > self.best_iou
        self.best_iou = max(self.best_iou, record["test"]["iou"])
        self.history.append(record)
        return is_best

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run or predict.py needs, as tensors and plain values."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epochs_done,
            "rng": rng_state(),
            "config": plain(self.config),
            "model_config": plain(asdict(self.unet_cfg)),
            "loader_config": plain(asdict(self.loader_cfg)),
            "history": self.history,
            "best_iou": self.best_iou,
            "position": self.position,
            "global_batch": self.global_batch,
        }

    def restore(
        self, path: Path, resume: bool, resume_keys: Sequence[str] = (), rng: bool = True
    ) -> str | None:
        """Load the checkpoint at ``path`` after :func:`check_compatible`: everything when
        ``resume`` (then ``resume_keys`` of the config must match; ``rng``: the random
        generators too), else the model weights only. Returns :func:`resize_schedule`'s
        line, if any."""
        saved = load_checkpoint(path)
        config = self.config if resume else None
        check_compatible(saved, path, self.unet_cfg, config, resume_keys)
        if resume:
            return self.load_state_dict(saved, restore_rng=rng, path=path)
        load_weights(self.model, saved["model"])
        return None

    def load_state_dict(
        self, state: dict[str, Any], restore_rng: bool = True, path: Path = Path("checkpoint")
    ) -> str | None:
        """Continue from ``state`` (what :meth:`state_dict` returned): weights, optimizer,
        schedule (re-sized to this run's length by :func:`resize_schedule`, whose line it
        returns), history and, with ``restore_rng``, the random generators."""
        fresh = self.scheduler.state_dict()  # this run's schedule, sized from its --epochs
        # How the update runs is this machine's choice (fused on CUDA, foreach elsewhere),
        # not the checkpoint's: load_state_dict would take the saved groups' flags.
        kinds = [{k: g.get(k) for k in IMPLEMENTATION} for g in self.optimizer.param_groups]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group, kind in zip(self.optimizer.param_groups, kinds):
            group.update(kind)
        self.scheduler.load_state_dict(state["scheduler"])
        note = resize_schedule(self.scheduler, fresh, path)
        self.history = list(state["history"])
        self.best_iou = float(state["best_iou"])
        self.position = int(state.get("position", 0))  # none before mid-epoch checkpoints
        check_global_batch(state, self.global_batch, path)
        if restore_rng:
            set_rng_state(state["rng"])
        return note


def check_global_batch(state: dict[str, Any], global_batch: int, path: Path) -> None:
    """Refuse to continue with another global batch: the order would be cut into other
    steps than the checkpoint's schedule and position count. The ranks may change."""
    saved = int(state.get("global_batch") or 0)  # 0: a checkpoint from before it was kept
    if saved and saved != global_batch:
        raise CheckpointError(
            f"checkpoint {path} ran with a global batch of {saved} samples (batch size x "
            f"ranks) but this run's is {global_batch}; pass --batch-size so that batch size x "
            f"ranks = {saved}"
        )


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's ``weights`` into a new run's ``model`` (``--weights``, ``--test-only``).

    The auxiliary depth heads are training scaffolding (see :data:`AUX_PREFIX`): a model with
    them keeps its fresh ones where the checkpoint has none, and one without drops the
    checkpoint's. Every other weight must match, as in ``load_state_dict``.
    """
    own = model.state_dict()
    aux = {k: weights.get(k, v) for k, v in own.items() if k.startswith(AUX_PREFIX)}
    model.load_state_dict(
        {**{k: v for k, v in weights.items() if not k.startswith(AUX_PREFIX)}, **aux}
    )


def check_compatible(
    state: dict[str, Any],
    path: Path,
    unet_cfg: Any,
    config: dict[str, Any] | None = None,
    keys: Sequence[str] = (),
) -> None:
    """Refuse a checkpoint whose channels or model shape differ, or (given ``config``) whose
    run options ``keys`` differ from this run's."""
    saved = state.get("model_config", {})
    if saved.get("in_channels") != unet_cfg.in_channels:
        raise TrainError(
            f"checkpoint {path} was trained on {saved.get('in_channels')}-channel images but "
            f"the data has {unet_cfg.in_channels}; use data with the same channel count"
        )
    if tuple(saved.get("widths", ())) != unet_cfg.widths:
        raise TrainError(
            f"checkpoint {path} has widths {tuple(saved.get('widths', ()))} but this run "
            f"builds {unet_cfg.widths}; pass --widths {','.join(map(str, saved.get('widths', ())))}"
        )
    for key, before in MODEL_FIELDS_BEFORE.items():
        theirs, ours = saved.get(key, before), getattr(unet_cfg, key)
        if theirs != ours:
            flag = key.replace("_", "-")
            flag = (
                f"--{flag} {theirs}"
                if isinstance(theirs, str)
                else f"--{'' if theirs else 'no-'}{flag}"
            )
            raise TrainError(
                f"checkpoint {path} has {key}={theirs} but this run builds {key}={ours}; "
                f"pass {flag}"
            )
    if config is None:
        return
    ours, theirs = plain(config), state.get("config", {})
    # A key the saved config lacks is an option newer than the checkpoint: nothing to compare.
    differ = [k for k in keys if k in theirs and ours.get(k) != theirs.get(k)]
    if differ:
        shown = ", ".join(f"{k}={theirs.get(k)!r} (now {ours.get(k)!r})" for k in differ)
        raise TrainError(
            f"checkpoint {path} belongs to a different config: {shown}; resume with the "
            "original options or start a new --out"
        )
