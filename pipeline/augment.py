"""The torch path: augmentation parameters and the uint8 -> normalised float step.

Used by the torch backend always, and by the DALI backend when ``LoaderConfig.augment_in``
resolves to "torch" (the default on the CPU, where these fused ops measured faster than DALI's
CPU colour operators). On CUDA the default is the same arithmetic inside the DALI graph
(``pipeline.dali.finish_in_graph``), with parameters drawn by DALI's random operators; this
module's ``to_float`` is the reference the tests hold that graph to.

Here parameters are a pure function of (seed, epoch, sample key): both backends, any rank
count and any batch composition draw the same jitter for the same sample, which makes epochs
reproducible and lets the tests compare backends with augmentation on.

Colour jitter follows torchvision's ColorJitter factors (brightness, contrast and saturation
factors from [1 - x, 1 + x], hue shift from [-x, x] of a turn) in a fixed order b, c, s, h.
All four are linear in the pixel values, so they and the normalisation fold into one per-sample
affine map (a scalar for single-channel data, a 3x3 matrix for RGB), applied in cache-sized
chunks of samples straight from the uint8 pixels; the result is clipped once at the end. Two
deliberate approximations: hue is a rotation about the grey axis (see ``colour_matrix``) rather
than a trip through HSV, and intermediate results are not clipped between the steps. Noise is
N(0, noise_std) in [0, 1] pixel units, a slice of a fixed bank of normals at a per-sample
offset (see ``noise_bank``).
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
# Samples per chunk on the CPU: ~512K values (2 MB, an L2 cache here) keeps every pass over a
# chunk in cache; 2^19 and 2^20 measured best for RGB (2^18: +15%, 2^22: +20% CPU time).
_CHUNK_VALUES = 1 << 19

# Rec. 601 luma weights: the grey level that contrast blends with and saturation keeps.
LUMA = (0.299, 0.587, 0.114)
_LUMA = torch.tensor(LUMA, dtype=torch.float64)
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


def colour_matrix(p: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, 3, 3) float64 hue @ saturation matrices; brightness and contrast are scalars.

    Both map grey to itself: saturation blends with the luma grey (as torchvision does), hue
    turns the colour about the grey axis (1, 1, 1), the linear stand-in for HSV's hue shift.
    Over random colours and shifts in [-0.075, 0.075] it is within 0.04 of torchvision's HSV
    result on average (0.13 at the 99th percentile, in [0, 1] units); a rotation in YIQ, as
    DALI's hsv operator does, was further off (0.06, 0.23).
    """
    s = p["saturation"].double().view(-1, 1, 1)
    sat = s * torch.eye(3, dtype=torch.float64) + (1 - s) * _LUMA.view(1, 1, 3)
    angle = 2 * math.pi * p["hue"].double().view(-1, 1, 1)
    axis = torch.full((3,), 1 / math.sqrt(3), dtype=torch.float64)
    cross = torch.tensor(  # the cross-product matrix of the grey axis
        [[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], dtype=torch.float64
    ) / math.sqrt(3)
    # Rodrigues' rotation formula about the grey axis.
    hue = (
        torch.cos(angle) * torch.eye(3, dtype=torch.float64)
        + torch.sin(angle) * cross
        + (1 - torch.cos(angle)) * torch.outer(axis, axis)
    )
    return hue @ sat


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
    params: dict[str, torch.Tensor] | None = None,
    bank: torch.Tensor | None = None,
    noise_std: float = 0.0,
) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) = (jitter(x)/255 [+ noise] - mean) / std.

    On the CPU the batch goes through in cache-sized chunks of samples: one uint8 -> float
    cast (which also does HWC -> CHW) into a reused scratch buffer, then every later step of
    that chunk (affine, noise, clip) runs while it is still in cache. Measured 2-3x faster than
    batch-wide passes, which stream 30 MB per op through memory.
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
    if params is None:
        scale, bias = _constant(1 / (255 * std), device), _constant(-mean / std, device)
        for start in range(0, batch, chunk):
            pixels = scratch[: min(chunk, batch - start)].copy_(images[start : start + chunk])
            torch.addcmul(bias, pixels, scale, out=out[start : start + chunk])
        return out
    # Per-sample scalars go to the images' device from pinned memory, asynchronously.
    brightness = _upload(params["brightness"], device)
    contrast = _upload(params["contrast"], device)
    # shift = ((1 - c) * b * grey / 255 - mean) / std, as grey * grey_weight + bias
    grey_weight = ((1 - contrast) * brightness / (255 * std)).view(-1, 1)
    bias = _constant(-mean / std, device)
    gain = brightness * contrast / (255 * std)
    if channels == 3:
        # (B, 3, 3) with rows over output channels; luma first, for the grey level
        matrix = gain.view(-1, 1, 1) * _upload(colour_matrix(params).float(), device)
        columns = [matrix[:, :, k : k + 1] for k in range(3)]  # (B, 3, 1) each
        luma = _constant(_LUMA_F, device).view(3, 1)
    else:
        gain = gain.view(-1, 1, 1, 1)
    # Only the flagged samples (noise_prob of them) pay for noise.
    noisy = torch.nonzero(params["noise"]).flatten().tolist() if noise_std > 0 else []
    size = channels * height * width
    offsets = (
        (params["noise_offset"].double() * (len(bank) - size)).long().tolist() if noisy else []
    )
    low, high = (0 - mean) / std, (1 - mean) / std
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        n = stop - start
        pixels = scratch[:n].copy_(images[start:stop])  # 0..255 as float
        target = out[start:stop]
        # Contrast blends with the mean grey level (of the brightness-adjusted image);
        # saturation and hue map grey to grey, so one shift serves all channels.
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
            out[i].add_(noise, alpha=noise_std / std)
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
    params = draw_params(keys, cfg.seed, epoch, cfg, channels) if augment else {}
    batch = {}
    for part in INPUTS:
        batch[part] = to_float(raw[part], cfg.mean, cfg.std, params.get(part), bank, cfg.noise_std)
    if "mask" in params:
        jittered = to_float(raw["mask"], 0.0, 1.0, params["mask"], bank, cfg.noise_std)
        batch["mask"] = (jittered > 0.5).float()
    else:
        mask = raw["mask"].permute(0, 3, 1, 2)  # C == 1: the same memory order as CHW
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
