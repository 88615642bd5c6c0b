"""Loader configuration, its validation, and the rank/world resolution for DDP."""

from __future__ import annotations

import os
from dataclasses import dataclass

from sharding.shard_format import GEOMETRY, Geometry

BACKENDS = ("auto", "dali", "torch")
AUGMENT_IN = ("auto", "dali", "torch")
LAST_BATCH = ("partial", "drop")


class LoaderError(RuntimeError):
    """A dataset or loader problem the user can act on; the message names the path or value."""


@dataclass(frozen=True)
class LoaderConfig:
    """How batches are read, augmented and delivered; ``train.py`` fills it from argparse."""

    backend: str = "auto"  # "auto" (DALI when it imports), "dali" or "torch"
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N": where the batch tensors land
    batch_size: int = 100
    # DALI CPU threads, or DataLoader workers for the torch backend; None: this rank's share of
    # the CPUs (see ``resolve_threads``)
    num_threads: int | None = None
    seed: int = 0
    augment: bool = True  # only ever applied to the "train" split
    augment_targets: bool = False  # jitter and noise mask/depth too, as the reference did
    brightness: float = 0.075
    contrast: float = 0.075
    saturation: float = 0.075  # colour data only
    hue: float = 0.075  # colour data only; fraction of a full turn
    noise_std: float = 0.05  # in [0, 1] pixel units
    noise_prob: float = 0.2
    # Geometry and the object's own pixels, for training sets with few foregrounds (the
    # train split only, like the jitter). flip: mirror all four images of half the samples.
    # object_jitter x: fg_bg's pixels inside the mask become clip(g * p + s), with
    # g from [1 - x, 1 + x] and s from [-x, x] * 128 grey levels, so that the object's grey
    # sometimes matches the wall behind it and "changed" is learnt more than "shaped like".
    flip: bool = False
    object_jitter: float = 0.0
    # paired_jitter: fg_bg gets bg's colour-jitter factors and noise, values included. Drawn
    # apart, the two images differ everywhere by a few grey levels, and the network learns to
    # ignore small differences: it misses objects the grey of their wall.
    paired_jitter: bool = False
    # The test split's last partial global batch: "partial" keeps it (split evenly over the
    # ranks, so every sample is evaluated once), "drop" leaves it out. Training always drops
    # it, so that every rank takes the same number of steps.
    last_batch: str = "partial"
    # Output sides: bg, fg_bg and mask at image_size, depth at depth_size (resized if stored
    # otherwise). The defaults are the dataset's, as are UNetConfig's; see ``geometry``.
    image_size: int = GEOMETRY.image_size
    depth_size: int = GEOMETRY.depth_size
    mean: float = 0.5
    std: float = 0.25
    rank: int | None = None  # None: torch.distributed rank when initialised, else 0
    world_size: int | None = None  # None: torch.distributed world size when initialised, else 1
    # Batches DALI prepares ahead of the one being consumed: on a GPU they overlap the step.
    prefetch: int = 2
    # The GPU decoder (``mixed``), for 160x160 JPEGs. Every image here is below nvJPEG's
    # hybrid-Huffman threshold, so the share the hardware decoder does not take is
    # Huffman-decoded on CPU threads: DALI's own default share, 0.65, until `make gpu-check`
    # says otherwise (it times 0, 0.65 and 1).
    hw_decoder_load: float = 0.65
    decoder_prealloc: int = 160  # image side the decoder preallocates for, in pixels
    decoder_padding: int = 1 << 20  # slack per decoder buffer (DALI's default is 16 MiB)
    # Where remote (s3://) shards are cached on this node: None is $MASKDEPTH_CACHE, else
    # ~/.cache/maskdepth (pipeline.cache); cache_limit refuses a split that would not fit.
    cache_dir: str | None = None
    cache_limit: int | None = None
    return_params: bool = False  # debug: add the drawn augmentation parameters to each batch
    # Where the float cast, normalisation and augmentation run: "dali" (inside the DALI graph,
    # on the pipeline's device), "torch" (fused torch ops after DALI decodes, pipeline.augment)
    # or "auto": "dali" for the DALI backend on CUDA, "torch" otherwise.
    augment_in: str = "auto"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise LoaderError(f"backend={self.backend!r} is not one of {BACKENDS}")
        if self.augment_in not in AUGMENT_IN:
            raise LoaderError(f"augment_in={self.augment_in!r} is not one of {AUGMENT_IN}")
        if self.last_batch not in LAST_BATCH:
            raise LoaderError(f"last_batch={self.last_batch!r} is not one of {LAST_BATCH}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise LoaderError(f"device={self.device!r}: use 'cpu', 'cuda' or 'cuda:N'")
        for name in ("batch_size", "image_size", "depth_size", "prefetch", "decoder_prealloc"):
            if getattr(self, name) < 1:
                raise LoaderError(f"{name}={getattr(self, name)} must be at least 1")
        if self.num_threads is not None and self.num_threads < 0:
            raise LoaderError(f"num_threads={self.num_threads} must be 0 or more")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise LoaderError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not 0 <= self.object_jitter < 1:
            raise LoaderError(f"object_jitter={self.object_jitter} must be in [0, 1)")
        if not 0 <= self.hue <= 0.5:
            raise LoaderError(f"hue={self.hue} must be in [0, 0.5] (a fraction of a turn)")
        if self.noise_std < 0 or not 0 <= self.noise_prob <= 1:
            raise LoaderError(
                f"noise_std={self.noise_std}, noise_prob={self.noise_prob}: "
                "need noise_std >= 0 and 0 <= noise_prob <= 1"
            )
        if self.std <= 0:
            raise LoaderError(f"std={self.std} must be positive")
        if not 0 <= self.hw_decoder_load <= 1:
            raise LoaderError(f"hw_decoder_load={self.hw_decoder_load} must be in [0, 1]")
        if self.decoder_padding < 0:
            raise LoaderError(f"decoder_padding={self.decoder_padding} must be 0 or more")
        if (self.rank is None) != (self.world_size is None):
            raise LoaderError("set both rank and world_size, or neither")
        if self.world_size is not None and not 0 <= self.rank < self.world_size:
            raise LoaderError(f"rank={self.rank} must be in [0, world_size={self.world_size})")

    @property
    def geometry(self) -> Geometry:
        """The sizes of the batches this config delivers; ``UNetConfig.for_geometry`` takes it."""
        return Geometry(self.image_size, self.depth_size)


def resolve_rank(cfg: LoaderConfig) -> tuple[int, int]:
    """(rank, world_size) from the config, else from torch.distributed, else (0, 1)."""
    if cfg.world_size is not None:
        return cfg.rank, cfg.world_size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_threads(cfg: LoaderConfig) -> int:
    """cfg.num_threads when set, else the CPUs this process may use divided among the ranks
    of this node (torchrun's LOCAL_WORLD_SIZE), at least 1."""
    if cfg.num_threads is not None:
        return cfg.num_threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_ranks = 1
    return max(1, (cpus or 1) // local_ranks)
