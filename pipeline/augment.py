"""Augmentation parameters and the uint8 -> normalised float step, shared by every backend.

Parameters are a pure function of (seed, epoch, sample key): the DALI and torch backends, any
rank count and any batch composition draw the same jitter for the same sample, which makes
epochs reproducible and lets the tests compare backends with augmentation on.

Colour jitter follows torchvision's ColorJitter factors (brightness, contrast and saturation
factors from [1 - x, 1 + x], hue shift from [-x, x] of a turn) in a fixed order b, c, s, h.
All four are linear in the pixel values, so they and the normalisation fold into one per-sample
affine map (a scalar for single-channel data, a 3x3 matrix for RGB) applied in one pass over
the uint8 pixels; the result is clipped once at the end. Two deliberate approximations: hue is a
rotation about the luma axis in YIQ space (as DALI's ``hsv``/``color_twist`` do) rather than a
trip through HSV, and intermediate results are not clipped between the four steps.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from pipeline.config import LoaderConfig

# Each augmented image gets its own independent stream of draws, per sample.
INPUTS = ("bg", "fg_bg")
TARGETS = ("mask", "depth")
FIELDS = ("brightness", "contrast", "saturation", "hue", "noise", "noise_offset")
NOISE_BANK_SIZE = 1 << 22

_LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)
_LUMA_F = _LUMA.float()
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def key_hashes(keys: list[str], seed: int, epoch: int) -> np.ndarray:
    """One 64-bit hash per sample key, salted with (seed, epoch): the root of all its draws."""
    return np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest(), "little"
            )
            for key in keys
        ),
        dtype=np.uint64,
        count=len(keys),
    )


def _uniform(hashes: np.ndarray, stream: int) -> np.ndarray:
    """Uniform [0, 1) per sample for one stream id, by splitmix64 (vectorised, no RNG state)."""
    with np.errstate(over="ignore"):
        z = hashes + np.uint64((stream + 1) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9) & _MASK64
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB) & _MASK64
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def draw_params(
    keys: list[str], seed: int, epoch: int, cfg: LoaderConfig, channels: int
) -> dict[str, dict[str, torch.Tensor]]:
    """Jitter factors, noise flags and noise offsets for each augmented image of each sample.

    Returns {part: {field: tensor (B,)}}; saturation is 1 and hue 0 for single-channel data.
    """
    hashes = key_hashes(keys, seed, epoch)
    parts = INPUTS + (TARGETS if cfg.augment_targets else ())
    params = {}
    for p, part in enumerate(parts):
        u = [_uniform(hashes, p * len(FIELDS) + f) for f in range(len(FIELDS))]
        colour = channels == 3 and part in INPUTS
        params[part] = {
            "brightness": torch.from_numpy(1 + cfg.brightness * (2 * u[0] - 1)).float(),
            "contrast": torch.from_numpy(1 + cfg.contrast * (2 * u[1] - 1)).float(),
            "saturation": torch.from_numpy(
                1 + cfg.saturation * (2 * u[2] - 1) if colour else np.ones(len(keys))
            ).float(),
            "hue": torch.from_numpy(
                cfg.hue * (2 * u[3] - 1) if colour else np.zeros(len(keys))
            ).float(),
            "noise": torch.from_numpy(u[4] < cfg.noise_prob),
            "noise_offset": torch.from_numpy(u[5]).float(),
        }
    return params


def noise_bank(seed: int, device: torch.device | str) -> torch.Tensor:
    """A fixed block of N(0, 1) values; each noisy image adds a slice at its own offset.

    Drawing fresh normals costs ~37 us per 160x160 image on one core, about a fifth of a
    sample's decode time; a slice of a 4M-value bank costs one add and is random enough for
    augmentation (offsets differ per sample, image and epoch).
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(NOISE_BANK_SIZE, generator=generator).to(device)


def _colour_matrix(p: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, 3, 3) float64 hue @ saturation matrix; brightness and contrast are scalars."""
    s = p["saturation"].double().view(-1, 1, 1)
    sat = s * torch.eye(3, dtype=torch.float64) + (1 - s) * _LUMA.view(1, 1, 3)
    angle = 2 * math.pi * p["hue"].double()
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(len(angle), 3, 3, dtype=torch.float64)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    hue = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ
    return hue @ sat


# Samples per chunk on the CPU: ~1M values (4 MB) keeps every pass of a chunk in cache.
_CHUNK_VALUES = 1 << 20


def to_float(
    images: torch.Tensor,
    mean: float,
    std: float,
    params: dict[str, torch.Tensor] | None = None,
    bank: torch.Tensor | None = None,
    noise_std: float = 0.0,
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (B, C, H, W) = (jitter(x)/255 [+ noise] - mean) / std.

    On the CPU the batch goes through in cache-sized chunks of samples: one contiguous
    uint8 -> float cast into a reused scratch buffer, then per-sample-scalar ops writing the
    output. Measured 2-3x faster than batch-wide passes (which stream 30 MB per op through
    memory) and 3-10x faster than mixed-dtype or strided ops (torch's slow generic paths).
    """
    batch, channels, height, width = images.shape
    device = images.device
    out = torch.empty(images.shape, device=device)
    if device.type == "cpu":
        chunk = max(1, _CHUNK_VALUES // (channels * height * width))
    else:
        chunk = batch  # on the GPU fewer, larger kernels win
    scratch = _scratch((min(chunk, batch), channels, height, width), device)
    if params is not None:
        # Per-sample scalars stay on the images' device: no host sync on the GPU path.
        gain = (params["brightness"] * params["contrast"]).to(device) / (255 * std)
        brightness = params["brightness"].to(device)
        contrast = params["contrast"].to(device)
        matrix = None
        if channels == 3:
            matrix = gain.view(-1, 1, 1) * _colour_matrix(params).to(device, torch.float32)
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        n = stop - start
        pixels = scratch[:n].copy_(images[start:stop])  # 0..255 as float
        target = out[start:stop]
        if params is None:
            torch.mul(pixels, 1 / (255 * std), out=target).add_(-mean / std)
            continue
        # Contrast blends with the mean grey level (of the brightness-adjusted image).
        channel_means = pixels.view(n, channels, -1).mean(2)  # (n, C)
        grey = channel_means @ _LUMA_F.to(device) if channels == 3 else channel_means[:, 0]
        b, c = brightness[start:stop], contrast[start:stop]
        shift = ((1 - c) * b * grey / 255 - mean) / std  # saturation and hue keep grey fixed
        if channels == 1:
            torch.mul(pixels, gain[start:stop].view(n, 1, 1, 1), out=target)
            target.add_(shift.view(n, 1, 1, 1))
            continue
        planes, rows, m = pixels.view(n, 3, -1), target.view(n, 3, -1), matrix[start:stop]
        # Nine broadcast multiply-adds beat bmm here: K=3 is BLAS's worst case.
        for r in range(3):
            row = rows[:, r]
            torch.mul(planes[:, 0], m[:, r, 0:1], out=row)
            row.addcmul_(planes[:, 1], m[:, r, 1:2])
            row.addcmul_(planes[:, 2], m[:, r, 2:3])
            row.add_(shift.view(n, 1))
    if params is None:
        return out
    if bank is not None and noise_std > 0:
        size = channels * height * width
        span = len(bank) - size
        # Only the flagged samples (noise_prob of them) pay for noise.
        for i in torch.nonzero(params["noise"]).flatten().tolist():
            begin = int(params["noise_offset"][i] * span)
            out[i].add_(
                bank[begin : begin + size].view(channels, height, width), alpha=noise_std / std
            )
    return out.clamp_((0 - mean) / std, (1 - mean) / std)


_SCRATCH: dict = {}


def _scratch(shape: tuple, device: torch.device) -> torch.Tensor:
    """A float buffer reused across batches: a fresh one would page-fault on every write."""
    key = (shape, str(device))
    if key not in _SCRATCH:
        _SCRATCH.clear()
        _SCRATCH[key] = torch.empty(shape, device=device)
    return _SCRATCH[key]


def finish_batch(
    raw: dict[str, torch.Tensor],
    keys: list[str],
    cfg: LoaderConfig,
    epoch: int,
    augment: bool,
    bank: torch.Tensor | None,
) -> dict:
    """Turn a batch of uint8 (B, C, H, W) images into the float batch the model sees."""
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
    channels = raw["bg"].shape[1]
    params = draw_params(keys, cfg.seed, epoch, cfg, channels) if augment else {}
    batch = {}
    for part in INPUTS:
        batch[part] = to_float(raw[part], cfg.mean, cfg.std, params.get(part), bank, cfg.noise_std)
    if "mask" in params:
        jittered = to_float(raw["mask"], 0.0, 1.0, params["mask"], bank, cfg.noise_std)
        batch["mask"] = (jittered > 0.5).float()
    else:
        mask = raw["mask"]
        batch["mask"] = torch.empty(mask.shape, device=mask.device)
        # JPEG blurs the mask's edges; 127 splits the white object from the black background.
        torch.gt(mask, 127, out=batch["mask"])
    batch["depth"] = to_float(raw["depth"], 0.0, 1.0, params.get("depth"), bank, cfg.noise_std)
    batch["key"] = keys
    if cfg.return_params:
        batch["params"] = params
    return batch


def denormalize(images: torch.Tensor, cfg: LoaderConfig) -> torch.Tensor:
    """Undo the input normalisation: a tensor in [0, 1], e.g. for previews and TensorBoard."""
    return (images * cfg.std + cfg.mean).clamp(0, 1)
