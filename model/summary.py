"""Parameter and MAC counts of the UNet.

Usage: ``python -m model.summary [--json] [--in-channels N]``

The model is the default recipe's (``UNetConfig()``), aux depth heads included: their
parameters count, but they run in training only, so the MACs (inference, a batch of one)
leave them out; the first line (and ``model`` in the JSON) says which model it is.

MACs come from thop on a batch of one. thop counts convolutions as multiply-accumulates
and also adds its own estimates for BatchNorm (4 ops per element) and bilinear upsampling
(11 per output element); ReLU, max-pool, concatenation and the final sigmoid count as 0.
Convolution biases are not counted. The same rules produced the reference figure, so the
numbers compare.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from model.unet import UNet, UNetConfig, count_parameters


def _block_names(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level blocks, with ModuleLists opened up so each stage gets its own row."""
    blocks = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            blocks.extend((f"{name}.{i}", sub) for i, sub in enumerate(child))
        else:
            blocks.append((name, child))
    return blocks


def _thop_layer_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, dict]:
    """thop's total MACs and per-child tree for ``model`` on ``example``."""
    # Deferred: thop is only needed here, and it imports distutils, which warns on import.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import thop

    # thop registers total_ops/total_params buffers on every module it visits; a copy keeps
    # them off the caller's model (and out of its state_dict).
    probe = copy.deepcopy(model).eval()
    macs, _, tree = thop.profile(probe, inputs=(example,), verbose=False, ret_layer_info=True)
    return int(macs), tree


def summarize(cfg: UNetConfig | None = None) -> dict:
    """Params, MACs per sample, shapes and a per-block breakdown of ``UNet(cfg)``."""
    cfg = cfg if cfg is not None else UNetConfig()
    model = UNet(cfg)
    example = torch.zeros(1, cfg.input_channels, cfg.mask_size, cfg.mask_size)
    with torch.no_grad():
        mask_logits, depth = model.eval()(example)
    macs, tree = _thop_layer_macs(model, example)

    def block_macs(path: str) -> int:
        ops, node = 0.0, tree
        for part in path.split("."):
            ops, _, node = node[part]
        return int(ops)

    blocks = [
        {"name": name, "params": count_parameters(block), "macs": block_macs(name)}
        for name, block in _block_names(model)
    ]
    return {
        "model": cfg.describe(),
        "params": count_parameters(model),
        "aux_params": count_parameters(model.aux_heads),  # training only
        "trainable_params": count_parameters(model, trainable_only=True),
        "macs": macs,
        "input": list(example.shape),
        "outputs": {"mask": list(mask_logits.shape), "depth": list(depth.shape)},
        "blocks": blocks,
        "config": {
            "in_channels": cfg.in_channels,
            "widths": list(cfg.widths),
            "mask_size": cfg.mask_size,
            "depth_size": cfg.depth_size,
            "channels_last": cfg.channels_last,
            "diff_input": cfg.diff_input,
            "skip": cfg.skip,
            "context": cfg.context,
            "aux_depth": cfg.aux_depth,
        },
    }


def format_summary(summary: dict) -> str:
    """Human-readable table of a ``summarize`` result."""
    lines = [
        f"model   {summary['model']}",
        f"input   {summary['input']}  (bg and fg_bg concatenated on channels)",
        f"mask    {summary['outputs']['mask']}  (logits)",
        f"depth   {summary['outputs']['depth']}  (sigmoid, in [0, 1])",
        "",
        f"{'block':<14}{'params':>12}{'MACs':>16}",
    ]
    for block in summary["blocks"]:
        lines.append(f"{block['name']:<14}{block['params']:>12,}{block['macs']:>16,}")
    lines += [
        f"{'total':<14}{summary['params']:>12,}{summary['macs']:>16,}",
        "",
        f"params            {summary['params']:,} ({summary['trainable_params']:,} trainable)",
        f"MACs per sample   {summary['macs']:,} (thop, batch of 1, inference)",
    ]
    if summary["aux_params"]:
        lines.append(
            f"aux depth heads   {summary['aux_params']:,} of the params; they run in training "
            "only, so the MACs leave them out"
        )
    return "\n".join(lines)


class _OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line on stderr, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the summary of the default recipe's UNet (or its ``--in-channels`` variant)."""
    parser = _OneLineParser(prog="python -m model.summary", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--in-channels", type=int, default=3, help="channels per image: 3 for RGB, 1 for gray"
    )
    args = parser.parse_args(argv)
    try:
        cfg = UNetConfig(in_channels=args.in_channels)
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    summary = summarize(cfg)
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
