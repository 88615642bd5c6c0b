"""Depthwise-separable UNet that predicts a foreground mask and a depth map.

The network sees the background image and the foreground-on-background image concatenated
on channels, ``(B, 2C, H, W)``. One encoder and one decoder are shared by both tasks; the
depth head branches off the decoder at ``depth_size`` so the depth path never pays for the
full-resolution decoder stages, and the mask path continues up to ``mask_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model.recipes import DEFAULT
from sharding.shard_format import GEOMETRY, Geometry

# The faster layout in every CPU timing of benchmarks/model_step.py (forward, loss, backward,
# SGD; batch 8, 2 cores, OMP_WAIT_POLICY=PASSIVE): 15.1 vs 9.2 samples/s, and 0.44 vs 0.63
# CPU-seconds per step on one thread. Not yet timed on CUDA. UNetConfig defaults to it.
RECOMMENDED_MEMORY_FORMAT = torch.channels_last

# How a decoder stage merges the encoder's skip (UNetConfig.skip).
SKIPS = ("concat", "add")


@dataclass(frozen=True)
class UNetConfig:
    """Shape and width of the UNet.

    Args:
        in_channels: channels C of *one* image; the network input has 2*C channels
            because bg and fg_bg are concatenated on channels.
        widths: channels per resolution level, first at ``mask_size``, each next level at
            half the resolution. ``len(widths) - 1`` is the number of 2x downsamplings.
        mask_size: side of the square input and of the mask output.
        depth_size: side of the depth output; ``mask_size / depth_size`` must be a power
            of two and the depth head branches off the decoder at that resolution.
        diff_input: the stem also sees ``fg_bg - bg`` and ``|fg_bg - bg|`` (4C channels in
            all). The mask is mostly "where do the two images differ", and a network given
            only the two images leaves holes where the object's grey matches the background.
            False (what checkpoints without the field were) keeps 2C.
        channels_last: keep weights and activations in NHWC; faster on CPU and CUDA.
        skip: how a decoder stage merges the encoder's skip. ``"concat"`` (the classic
            UNet, and what checkpoints without the field were) upsamples the deeper level
            and concatenates the skip; ``"add"`` first maps the deeper level to the skip's
            channels with a 1x1 conv at the low resolution, then upsamples and adds it
            (LinkNet-style), so the full-resolution stage upsamples half the channels and
            convolves a third.
        context: a global-context block at the bottleneck (the image's mean features added
            back everywhere) and a row-context block before the depth head (each row's mean
            over the width added back to every column). Depth in a room depends mostly on
            the row, and where the floor starts depends on the whole picture, which 3x3
            convolutions see only slowly.
        aux_depth: deep supervision; a 1x1 conv and sigmoid on each decoder level between
            the bottleneck and the depth head (20x20 and 40x40 at the default sizes), so
            where a room's floor starts is learnt at the coarse levels, not only through
            the upsamplings above them. ``forward(x, aux=True)`` returns their maps; they
            are for the training loss and cost nothing at inference. False (what
            checkpoints without the field were) builds none.

    The model fields default to the ``default`` training recipe's (:mod:`model.recipes`), aux
    heads included since that recipe weighs them; checkpoints without a field are read with
    the value they ran with (``training.checkpoint.saved_model_config``). The size defaults
    are the dataset's (``sharding.shard_format.GEOMETRY``), as are the loader's;
    ``UNetConfig.for_geometry(loader_cfg.geometry, ...)`` ties a model to a loader.
    """

    in_channels: int = 3
    widths: tuple[int, ...] = DEFAULT["widths"]
    mask_size: int = GEOMETRY.image_size
    depth_size: int = GEOMETRY.depth_size
    diff_input: bool = DEFAULT["diff_input"]
    channels_last: bool = True
    skip: str = DEFAULT["skip"]
    context: bool = DEFAULT["context"]
    aux_depth: bool = DEFAULT["depth_aux_weight"] > 0

    @classmethod
    def for_geometry(cls, geometry: Geometry, **fields: Any) -> UNetConfig:
        """A config whose input and outputs have ``geometry``'s sizes (e.g. a loader's)."""
        return cls(mask_size=geometry.image_size, depth_size=geometry.depth_size, **fields)

    @property
    def geometry(self) -> Geometry:
        """The sizes this model takes and returns, comparable with ``LoaderConfig.geometry``."""
        return Geometry(self.mask_size, self.depth_size)

    def __post_init__(self) -> None:
        # A list from argparse or JSON would make the frozen config unhashable.
        object.__setattr__(self, "widths", tuple(self.widths))
        if self.in_channels < 1:
            raise ValueError(
                f"in_channels={self.in_channels} must be >= 1: it is the channel count of one "
                "image (3 for RGB, 1 for grayscale)"
            )
        if len(self.widths) < 2 or any(w < 1 for w in self.widths):
            raise ValueError(
                f"widths={self.widths} must hold at least two positive channel counts, "
                "one per resolution level, e.g. (16, 32, 64, 128, 256)"
            )
        if self.skip not in SKIPS:
            raise ValueError(f"skip={self.skip!r} must be one of {', '.join(SKIPS)}")
        stride = 2 ** (len(self.widths) - 1)
        if self.mask_size % stride != 0:
            raise ValueError(
                f"mask_size={self.mask_size} must be divisible by {stride} because widths has "
                f"{len(self.widths)} levels (each halves the resolution); use fewer widths or "
                "a mask_size that is a multiple of it"
            )
        ratio = self.mask_size / self.depth_size if self.depth_size > 0 else 0.0
        level = math.log2(ratio) if ratio >= 1 else -1.0
        if not (level.is_integer() and 0 <= level < len(self.widths)):
            raise ValueError(
                f"depth_size={self.depth_size} must be mask_size={self.mask_size} divided by a "
                f"power of two below 2**{len(self.widths)} so the depth head can branch off a "
                "decoder level, e.g. depth_size=80 for mask_size=160"
            )

    @property
    def depth_level(self) -> int:
        """Index of the resolution level the depth head branches off (0 is mask_size)."""
        return int(math.log2(self.mask_size // self.depth_size))

    @property
    def aux_levels(self) -> tuple[int, ...]:
        """Decoder levels with an auxiliary depth head (``aux_depth``), coarsest first."""
        if not self.aux_depth:
            return ()
        return tuple(range(len(self.widths) - 2, self.depth_level, -1))

    @property
    def input_channels(self) -> int:
        """Channels of the network input: bg and fg_bg concatenated."""
        return 2 * self.in_channels

    @property
    def stem_channels(self) -> int:
        """Channels the stem convolves: the input, plus its difference maps with ``diff_input``."""
        return 2 * self.input_channels if self.diff_input else self.input_channels

    def describe(self) -> str:
        """One line naming the model, for benchmark output and reports."""
        levels = self.aux_levels
        sizes = ", ".join(f"{self.mask_size >> lv}x{self.mask_size >> lv}" for lv in levels)
        return (
            f"UNet widths {','.join(map(str, self.widths))}, in_channels {self.in_channels}, "
            f"{'diff input' if self.diff_input else 'plain input'}, {self.skip} skips, "
            f"{'context blocks' if self.context else 'no context'}, "
            + (f"aux depth heads at {sizes} (training only)" if levels else "no aux depth heads")
            + f", mask {self.mask_size}x{self.mask_size}, depth {self.depth_size}x{self.depth_size}"
        )

    @property
    def memory_format(self) -> torch.memory_format:
        """Memory format the model keeps its weights and activations in."""
        return torch.channels_last if self.channels_last else torch.contiguous_format


class SeparableConv(nn.Sequential):
    """Depthwise 3x3, pointwise 1x1, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
            # No BN between the depthwise and pointwise convs: the pair is one linear map,
            # and one BN after it keeps the op count down at full resolution.
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DoubleSeparableConv(nn.Sequential):
    """Two separable convs, the usual UNet stage."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            SeparableConv(in_channels, out_channels),
            SeparableConv(out_channels, out_channels),
        )


class Stem(nn.Sequential):
    """Dense 3x3 conv from the 2C input channels, then one separable conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            # Dense, not depthwise: a depthwise first conv could not compare the bg and
            # fg_bg neighbourhoods, which is the main cue for the mask. With 2C <= 6 input
            # channels it is cheap.
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            SeparableConv(out_channels, out_channels),
        )


class Down(nn.Sequential):
    """2x max-pool, then a double separable conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleSeparableConv(in_channels, out_channels))


class Up(nn.Module):
    """2x bilinear upsample, merge the encoder skip, double separable conv.

    ``merge="concat"`` concatenates the upsampled level and the skip. ``merge="add"``
    maps the deeper level to the skip's channels first (1x1 conv and BatchNorm, at the low
    resolution), then upsamples it and adds the skip. The full-resolution stage then
    upsamples half the channels and convolves a third (16 and 16 against 32 and 48 at the
    default widths); the upsample's backward pass there was the largest single cost of a
    CPU training step (benchmarks/RESULTS.md, "Third round").
    """

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, merge: str = "concat"
    ) -> None:
        super().__init__()
        self.add = merge == "add"
        # Identity for concat, so the classic UNet's parameter names stay as they were.
        self.reduce = (
            nn.Sequential(
                nn.Conv2d(in_channels, skip_channels, 1, bias=False), nn.BatchNorm2d(skip_channels)
            )
            if self.add
            else nn.Identity()
        )
        # A module, not F.interpolate, so thop counts its ops in the summary.
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        merged = skip_channels if self.add else in_channels + skip_channels
        self.conv = DoubleSeparableConv(merged, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Upsample ``x`` to the size of ``skip`` and fuse them."""
        up = self.upsample(self.reduce(x))
        return self.conv(up + skip if self.add else torch.cat([up, skip], dim=1))


class GlobalContext(nn.Module):
    """Add a 1x1 conv of the image's mean features back to every position."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mix = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(x.mean((2, 3), keepdim=True))


class RowContext(nn.Module):
    """Add each row's mean over the width, mixed over 7 neighbouring rows, to every column.

    Height-driven context (HANet, Choi et al., CVPR 2020): what a pixel is, and how far,
    depends much on its row. Here the floor's depth is a function of the row once the
    horizon is known.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mix = nn.Sequential(
            nn.Conv2d(channels, channels, (7, 1), padding=(3, 0), bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(x.mean(3, keepdim=True))


class DepthHead(nn.Sequential):
    """One separable conv, 1x1 conv to one channel, sigmoid to [0, 1]."""

    def __init__(self, in_channels: int) -> None:
        super().__init__(
            # One extra conv so the depth output does not read the shared features raw:
            # they are also being pulled toward the mask by the decoder above this level.
            SeparableConv(in_channels, in_channels),
            nn.Conv2d(in_channels, 1, 1),
            nn.Sigmoid(),
        )


class UNet(nn.Module):
    """Depthwise-separable UNet with a mask head and a depth head.

    ``forward(x)`` takes ``(B, 2C, mask_size, mask_size)`` and returns the tuple
    ``(mask_logits, depth)``: mask logits ``(B, 1, mask_size, mask_size)`` and depth in
    [0, 1] ``(B, 1, depth_size, depth_size)``.
    """

    def __init__(self, cfg: UNetConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else UNetConfig()
        widths = self.cfg.widths
        self.encoder = nn.ModuleList(
            [Stem(self.cfg.stem_channels, widths[0])]
            + [Down(widths[i - 1], widths[i]) for i in range(1, len(widths))]
        )
        # decoder[i] produces level i from level i + 1; the deepest level needs none.
        self.decoder = nn.ModuleList(
            [Up(widths[i + 1], widths[i], widths[i], self.cfg.skip) for i in range(len(widths) - 1)]
        )
        # None without context, so the state dict of such a model has no keys for them.
        context = self.cfg.context
        self.global_context = GlobalContext(widths[-1]) if context else None
        self.row_context = RowContext(widths[self.cfg.depth_level]) if context else None
        self.depth_head = DepthHead(widths[self.cfg.depth_level])
        self.mask_head = nn.Conv2d(widths[0], 1, 1)
        # Built finest level first: the order the measured runs drew their initial weights in.
        self.aux_heads = nn.ModuleDict(
            {str(level): nn.Conv2d(widths[level], 1, 1) for level in sorted(self.cfg.aux_levels)}
        )
        if self.cfg.channels_last:
            self.to(memory_format=torch.channels_last)

    @staticmethod
    def input_from(bg: torch.Tensor, fg_bg: torch.Tensor) -> torch.Tensor:
        """Concatenate bg ``(B, C, H, W)`` and fg_bg ``(B, C, H, W)`` into ``(B, 2C, H, W)``."""
        if bg.shape != fg_bg.shape:
            raise ValueError(
                f"bg {tuple(bg.shape)} and fg_bg {tuple(fg_bg.shape)} must have the same shape "
                "(B, C, H, W) to be concatenated on channels"
            )
        return torch.cat([bg, fg_bg], dim=1)

    def forward(self, x: torch.Tensor, aux: bool = False) -> tuple[torch.Tensor, ...]:
        """Return ``(mask_logits, depth)`` for ``x`` of shape ``(B, 2C, H, W)``.

        With ``aux``, ``(mask_logits, depth, aux_depths)``: ``aux_depths`` is a tuple of
        depth maps in [0, 1], one per level of ``cfg.aux_levels`` (coarsest first).
        """
        self._check_input(x)
        if aux and not self.cfg.aux_depth:
            raise ValueError("aux=True needs a model built with UNetConfig(aux_depth=True)")
        # No-op when the caller already sends NHWC; otherwise one copy beats running every
        # conv in the slower layout.
        x = x.contiguous(memory_format=self.cfg.memory_format)
        if self.cfg.diff_input:
            bg, fg_bg = x.chunk(2, dim=1)
            diff = fg_bg - bg
            x = torch.cat([x, diff, diff.abs()], dim=1)  # (B, 4C, H, W)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()  # bottleneck, the deepest level
        if self.global_context is not None:
            x = self.global_context(x)
        depth = self._depth(x) if self.cfg.depth_level == len(self.decoder) else None
        aux_depths = []
        for level in range(len(self.decoder) - 1, -1, -1):
            x = self.decoder[level](x, skips[level])
            if level == self.cfg.depth_level:
                depth = self._depth(x)  # (B, 1, depth_size, depth_size)
            elif aux and str(level) in self.aux_heads:
                aux_depths.append(torch.sigmoid(self.aux_heads[str(level)](x)))
        mask_logits = self.mask_head(x)  # (B, 1, mask_size, mask_size)
        return (mask_logits, depth, tuple(aux_depths)) if aux else (mask_logits, depth)

    def _depth(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_context is not None:
            x = self.row_context(x)
        return self.depth_head(x)

    def _check_input(self, x: torch.Tensor) -> None:
        stride = 2 ** (len(self.cfg.widths) - 1)
        if x.dim() != 4 or x.shape[1] != self.cfg.input_channels:
            raise ValueError(
                f"input of shape {tuple(x.shape)} must be (B, {self.cfg.input_channels}, H, W): "
                f"bg and fg_bg with in_channels={self.cfg.in_channels} each, concatenated by "
                "UNet.input_from(bg, fg_bg)"
            )
        if x.shape[2] % stride or x.shape[3] % stride:
            raise ValueError(
                f"input size {tuple(x.shape[2:])} must be divisible by {stride} "
                f"({len(self.cfg.widths) - 1} downsamplings); the model is built for "
                f"{self.cfg.mask_size}x{self.cfg.mask_size}"
            )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, each shared tensor counted once."""
    # model.parameters() already deduplicates shared tensors, unlike summing per module.
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
