"""The torch path: the uint8 -> normalised float step, with the augmentation applied.

Used by the torch backend always, and by the DALI backend when ``LoaderConfig.augment_in``
resolves to "torch" (the default on the CPU, where these fused ops measured faster than DALI's
CPU operators). The parameters come from ``pipeline.params``, the one definition that the DALI
graph (``pipeline.dali_graph``) applies too; this module's ``to_float`` is the reference the
tests hold that graph to.

Each part's per-sample affine map (``pipeline.params.Affine``) is applied in cache-sized chunks
of samples straight from the uint8 pixels, and the result is clipped once at the end. Noise is
N(0, noise_std) in [0, 1] pixel units, a slice of a fixed bank of normals at a per-sample
offset (see ``noise_bank``).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import LoaderConfig
from pipeline.params import (
    INPUTS,
    LUMA,
    MASK_THRESHOLD,
    Affine,
    batch_affines,
    draw_params,
    draw_sample,
    sample_augmented,
)
from sharding.shard_format import PARTS

NOISE_BANK_SIZE = 1 << 22
# Samples per chunk on the CPU: ~512K values (2 MB, an L2 cache here) keeps every pass over a
# chunk in cache; 2^19 and 2^20 measured best for RGB (2^18: +15%, 2^22: +20% CPU time).
_CHUNK_VALUES = 1 << 19
_LUMA_F = torch.tensor(LUMA, dtype=torch.float32)


def noise_bank(seed: int, device: torch.device | str) -> torch.Tensor:
    """A fixed block of N(0, 1) values; each noisy image adds a slice at its own offset.

    Drawing fresh normals costs ~37 us per 160x160 image on one core, about a fifth of a
    sample's decode time; a slice of a 4M-value bank costs one add and is random enough for
    augmentation (offsets differ per sample, image and epoch).
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(NOISE_BANK_SIZE, generator=generator).to(device)


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A constant on ``device``, made once: no host-to-device copy per batch."""
    key = (str(device), value if isinstance(value, float) else id(value))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.as_tensor(value, dtype=torch.float32).to(device)
    return _CONSTANTS[key]


def _upload(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host values to ``device``; to a GPU through pinned memory, so the copy does not block."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def to_float(
    images: torch.Tensor,
    mean: float,
    std: float,
    affine: Affine | None = None,
    bank: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) = clip(M x + grey(x) w + bias [+ noise]).

    ``affine`` None: the plain ``(x / 255 - mean) / std``. On the CPU the batch goes through in
    cache-sized chunks of samples: one uint8 -> float cast (which also does HWC -> CHW) into a
    reused scratch buffer, then every later step of that chunk (affine, noise, clip) runs while
    it is still in cache. Measured 2-3x faster than batch-wide passes, which stream 30 MB per
    op through memory.
    """
    batch, height, width, channels = images.shape
    device = images.device
    images = images.permute(0, 3, 1, 2)  # a view; the scratch copy below does the transpose
    out = torch.empty(images.shape, device=device)
    if device.type == "cpu":
        chunk = max(1, _CHUNK_VALUES // (channels * height * width))
    else:
        chunk = batch  # on the GPU fewer, larger kernels win
    scratch = _scratch((min(chunk, batch), channels, height, width), device)
    if channels == 3 and device.type == "cpu":
        # De-interleave in uint8 first: 1.6x faster than a strided uint8 -> float cast.
        images = _Deinterleaved(
            images, _scratch((min(chunk, batch), 3, height, width), device, torch.uint8)
        )
    bias = _constant(-mean / std, device)
    if affine is None:
        scale = _constant(1 / (255 * std), device)
        for start in range(0, batch, chunk):
            pixels = scratch[: min(chunk, batch - start)].copy_(images[start : start + chunk])
            torch.addcmul(bias, pixels, scale, out=out[start : start + chunk])
        return out
    # Per-sample values go to the images' device from pinned memory, asynchronously.
    matrix = _upload(torch.from_numpy(affine.matrix), device)  # (B, C, C), rows: outputs
    grey_weight = _upload(torch.from_numpy(affine.grey_weight), device).view(-1, 1)
    if channels == 3:
        columns = [matrix[:, :, k : k + 1] for k in range(3)]  # (B, 3, 1) each
        luma = _constant(_LUMA_F, device).view(3, 1)
    else:
        gain = matrix.view(-1, 1, 1, 1)
    # Only the flagged samples (noise_prob of them) pay for noise.
    noisy = np.flatnonzero(affine.noise_scale).tolist() if bank is not None else []
    size = channels * height * width
    offsets = (affine.noise_offset * (len(bank) - size)).astype(np.int64).tolist() if noisy else []
    scales = affine.noise_scale.tolist()
    low, high = (0 - mean) / std, (1 - mean) / std
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        n = stop - start
        pixels = scratch[:n].copy_(images[start:stop])  # 0..255 as float
        target = out[start:stop]
        channel_means = pixels.view(n, channels, -1).mean(2)  # (n, C)
        grey = channel_means @ luma if channels == 3 else channel_means  # (n, 1)
        shift = torch.addcmul(bias, grey, grey_weight[start:stop])  # (n, 1)
        if channels == 1:
            torch.addcmul(shift.view(n, 1, 1, 1), pixels, gain[start:stop], out=target)
        else:
            planes, rows = pixels.view(n, 3, -1), target.view(n, 3, -1)
            # Each input channel's contribution to all three output rows in one broadcast op:
            # three passes, where bmm (K=3, BLAS's worst case) measured slower.
            torch.addcmul(shift.view(n, 1, 1), planes[:, 0:1], columns[0][start:stop], out=rows)
            rows.addcmul_(planes[:, 1:2], columns[1][start:stop])
            rows.addcmul_(planes[:, 2:3], columns[2][start:stop])
        while noisy and noisy[0] < stop:
            i = noisy.pop(0)
            noise = bank[offsets[i] : offsets[i] + size].view(channels, height, width)
            out[i].add_(noise, alpha=scales[i])
        target.clamp_(low, high)
    return out


_SCRATCH: dict = {}


def _scratch(shape: tuple, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """A buffer reused across batches: a fresh one would page-fault on every write."""
    key = (shape, str(device), dtype)
    if key not in _SCRATCH:
        if len(_SCRATCH) > 8:
            _SCRATCH.clear()
        _SCRATCH[key] = torch.empty(shape, device=device, dtype=dtype)
    return _SCRATCH[key]


class _Deinterleaved:
    """Slices of a (B, 3, H, W) permuted view, each made contiguous through a uint8 buffer."""

    def __init__(self, images: torch.Tensor, buffer: torch.Tensor):
        self.images, self.buffer = images, buffer

    def __getitem__(self, rows: slice) -> torch.Tensor:
        part = self.images[rows]
        return self.buffer[: len(part)].copy_(part)


def apply_sample(raw: dict[str, torch.Tensor], drawn: dict[str, np.ndarray]) -> dict:
    """The per-sample geometry and object jitter (``pipeline.params.draw_sample``) on uint8
    (B, H, W, C) images: the flagged samples mirrored left to right, all four images alike,
    then fg_bg's pixels inside the (mirrored) mask mapped to ``clip(round(g p + s), 0, 255)``.
    Returns new tensors; ``raw`` is left as it was."""
    out = dict(raw)
    flips = np.flatnonzero(drawn["flip"])
    if len(flips):
        rows = torch.from_numpy(flips).to(raw["bg"].device)
        for part in PARTS:
            out[part] = raw[part].index_copy(0, rows, raw[part][rows].flip(2))
    gain, shift = drawn["object_gain"], drawn["object_shift"]
    if np.any(gain != 1) or np.any(shift != 0):
        device = raw["fg_bg"].device
        fg_bg = out["fg_bg"]
        gain_t = torch.from_numpy(gain.astype(np.float32)).to(device).view(-1, 1, 1, 1)
        shift_t = torch.from_numpy(shift.astype(np.float32)).to(device).view(-1, 1, 1, 1)
        jittered = torch.addcmul(shift_t, fg_bg.float(), gain_t).round_().clamp_(0, 255)
        inside = out["mask"] > MASK_THRESHOLD  # (B, H, W, 1): every channel of the object
        out["fg_bg"] = torch.where(inside, jittered.to(torch.uint8), fg_bg)
    return out


def finish_batch(
    raw: dict[str, torch.Tensor],
    keys: list[str],
    cfg: LoaderConfig,
    epoch: int,
    augment: bool,
    bank: torch.Tensor | None,
) -> dict:
    """Turn a batch of uint8 (B, H, W, C) images into the float batch the model sees."""
    if raw["bg"].device.type == "cpu" and torch.get_num_threads() > 1:
        # DALI's threads already use every core; torch's OpenMP workers spinning beside them
        # made these ops 3-7x slower (measured), so run them on this thread alone.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _finish_batch(raw, keys, cfg, epoch, augment, bank)
        finally:
            torch.set_num_threads(threads)
    return _finish_batch(raw, keys, cfg, epoch, augment, bank)


def _finish_batch(
    raw: dict[str, torch.Tensor],
    keys: list[str],
    cfg: LoaderConfig,
    epoch: int,
    augment: bool,
    bank: torch.Tensor | None,
) -> dict:
    channels = raw["bg"].shape[-1]
    if augment and sample_augmented(cfg):
        raw = apply_sample(raw, draw_sample(keys, cfg.seed, epoch, cfg))
    affines = batch_affines(keys, cfg.seed, epoch, cfg, channels) if augment else {}
    bank = bank if cfg.noise_std > 0 else None
    batch = {}
    for part in INPUTS:
        batch[part] = to_float(raw[part], cfg.mean, cfg.std, affines.get(part), bank)
    if "mask" in affines:
        jittered = to_float(raw["mask"], 0.0, 1.0, affines["mask"], bank)
        batch["mask"] = (jittered > 0.5).float()
    else:
        mask = raw["mask"].permute(0, 3, 1, 2)  # C == 1: the same memory order as CHW
        batch["mask"] = torch.empty(mask.shape, device=mask.device)
        torch.gt(mask, MASK_THRESHOLD, out=batch["mask"])
    batch["depth"] = to_float(raw["depth"], 0.0, 1.0, affines.get("depth"), bank)
    batch["key"] = keys
    if cfg.return_params and augment:
        batch["params"] = drawn_params(keys, cfg, epoch, channels)
    return batch


def drawn_params(keys: list[str], cfg: LoaderConfig, epoch: int, channels: int) -> dict:
    """The drawn factors of a batch as {part: {field: tensor (B,)}} (``return_params``); the
    draws all four images share are under "sample"."""
    drawn = draw_params(keys, cfg.seed, epoch, cfg, channels)
    drawn["sample"] = draw_sample(keys, cfg.seed, epoch, cfg)
    return {
        part: {field: torch.from_numpy(np.asarray(v)) for field, v in values.items()}
        for part, values in drawn.items()
    }


def denormalize(images: torch.Tensor, cfg: LoaderConfig) -> torch.Tensor:
    """Undo the input normalisation: a tensor in [0, 1], e.g. for previews and TensorBoard."""
    return (images * cfg.std + cfg.mean).clamp(0, 1)
