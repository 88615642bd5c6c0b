"""The augmentation parameters, defined once: a pure, vectorised function of
(seed, epoch, sample key), used by the torch path and fed to the DALI graph alike.

Colour jitter follows torchvision's ColorJitter factors (brightness, contrast and saturation
factors from [1 - x, 1 + x], hue shift from [-x, x] of a turn) in a fixed order b, c, s, h.
All four are linear in the pixel values, so with the normalisation they fold into one
per-sample affine map: ``out = M @ x + grey(x) * w + bias``, where ``M`` is a scalar for
single-channel data and a 3x3 matrix for RGB, ``grey(x)`` is the image's mean luma (the level
contrast blends with) and ``bias = -mean / std``. ``affine`` computes M, w and the noise scale
per sample on the host, in numpy; the pixel work stays where the batch is (``pipeline.augment``
in torch, ``pipeline.dali_graph`` in the DALI graph on the pipeline's device). Two deliberate
approximations: hue is a rotation about the grey axis (see ``colour_matrix``) rather than a
trip through HSV, and intermediate results are not clipped between the steps.

Each augmented image of each sample draws from its own stream, so bg and fg_bg get different
factors unless ``paired_jitter`` gives fg_bg bg's (see ``draw_params``); the draws of a sample
do not depend on its batch, its rank or the backend.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np

from pipeline.config import LoaderConfig

INPUTS = ("bg", "fg_bg")
TARGETS = ("mask", "depth")
FIELDS = ("brightness", "contrast", "saturation", "hue", "noise", "noise_offset")
# Per-sample draws shared by all four images: a mirror and the object's own gain and shift.
SAMPLE_FIELDS = ("flip", "object_gain", "object_shift")
_SAMPLE_STREAM = 1000  # above every part's streams, so adding fields moves no earlier draw
# Grey levels of object shift per unit of object_jitter.
OBJECT_SHIFT_LEVELS = 128.0
# Rec. 601 luma weights: the grey level that contrast blends with and saturation keeps.
LUMA = (0.299, 0.587, 0.114)
# JPEG blurs a mask's edges; 127 splits the white object from the black background.
MASK_THRESHOLD = 127
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def augmented_parts(cfg: LoaderConfig) -> tuple[str, ...]:
    """The parts that get jitter and noise: the inputs, and the targets when asked."""
    return INPUTS + (TARGETS if cfg.augment_targets else ())


def part_channels(part: str, channels: int) -> int:
    """Channels of one part: the split's for bg and fg_bg, one for mask and depth."""
    return channels if part in INPUTS else 1


def part_normalisation(part: str, cfg: LoaderConfig) -> tuple[float, float]:
    """(mean, std) of one part's float output: the inputs are normalised, targets in [0, 1]."""
    return (cfg.mean, cfg.std) if part in INPUTS else (0.0, 1.0)


def _blake(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


@functools.lru_cache(maxsize=1 << 20)
def _key_hash(key: str) -> int:
    return _blake(key)  # once per key and process: later epochs only mix in the salt


def key_hashes(keys: list[str], seed: int, epoch: int) -> np.ndarray:
    """One 64-bit hash per sample key, salted with (seed, epoch): the root of all its draws."""
    base = np.fromiter(map(_key_hash, keys), dtype=np.uint64, count=len(keys))
    return _mix(base ^ np.uint64(_blake(f"{seed}/{epoch}")))


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every bit of the input reaches every bit of the output."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9) & _MASK64
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB) & _MASK64
        return z ^ (z >> np.uint64(31))


def _uniform(hashes: np.ndarray, stream: int) -> np.ndarray:
    """Uniform [0, 1) per sample for one stream id, by splitmix64 (vectorised, no RNG state)."""
    with np.errstate(over="ignore"):
        z = _mix(hashes + np.uint64((stream + 1) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def draw_params(
    keys: list[str], seed: int, epoch: int, cfg: LoaderConfig, channels: int
) -> dict[str, dict[str, np.ndarray]]:
    """Jitter factors, noise flags and noise offsets for each augmented image of each sample.

    Returns {part: {field: array (B,)}}; saturation is 1 and hue 0 for single-channel data.
    With ``cfg.paired_jitter`` fg_bg takes bg's draws, noise offset included (the torch path
    then adds the same noise values to both; the DALI graph shares one normal draw between
    them), so that the two images still differ only where the object is.
    """
    hashes = key_hashes(keys, seed, epoch)
    ones, zeros = np.ones(len(keys)), np.zeros(len(keys))
    params = {}
    for p, part in enumerate(augmented_parts(cfg)):
        stream = 0 if cfg.paired_jitter and part == "fg_bg" else p  # bg is part 0
        u = [_uniform(hashes, stream * len(FIELDS) + f) for f in range(len(FIELDS))]
        colour = part_channels(part, channels) == 3
        params[part] = {
            "brightness": 1 + cfg.brightness * (2 * u[0] - 1),
            "contrast": 1 + cfg.contrast * (2 * u[1] - 1),
            "saturation": 1 + cfg.saturation * (2 * u[2] - 1) if colour else ones,
            "hue": cfg.hue * (2 * u[3] - 1) if colour else zeros,
            "noise": u[4] < cfg.noise_prob,
            "noise_offset": u[5],
        }
    return params


def sample_augmented(cfg: LoaderConfig) -> bool:
    """Whether the config draws per-sample geometry or object jitter (``draw_sample``)."""
    return cfg.flip or cfg.object_jitter > 0


def draw_sample(keys: list[str], seed: int, epoch: int, cfg: LoaderConfig) -> dict[str, np.ndarray]:
    """The draws that all four images of a sample share: {field: array (B,)}.

    ``flip``: mirror bg, fg_bg, mask and depth left to right (half the samples when
    ``cfg.flip``). ``object_gain`` and ``object_shift`` (grey levels): fg_bg's pixels inside
    the mask become ``clip(round(gain * p + shift), 0, 255)`` (1 and 0 without object jitter).
    """
    hashes = key_hashes(keys, seed, epoch)
    u = [_uniform(hashes, _SAMPLE_STREAM + f) for f in range(len(SAMPLE_FIELDS))]
    x = cfg.object_jitter
    return {
        "flip": (u[0] < 0.5) if cfg.flip else np.zeros(len(keys), bool),
        "object_gain": 1 + x * (2 * u[1] - 1),
        "object_shift": x * OBJECT_SHIFT_LEVELS * (2 * u[2] - 1),
    }


def colour_matrix(saturation: np.ndarray, hue: np.ndarray) -> np.ndarray:
    """(B, 3, 3) float64 hue @ saturation matrices; brightness and contrast are scalars.

    Both map grey to itself: saturation blends with the luma grey (as torchvision does), hue
    turns the colour about the grey axis (1, 1, 1), the linear stand-in for HSV's hue shift.
    Over random colours and shifts in [-0.075, 0.075] it is within 0.04 of torchvision's HSV
    result on average (0.13 at the 99th percentile, in [0, 1] units); a rotation in YIQ, as
    DALI's hsv operator does, was further off (0.06, 0.23).
    """
    s = saturation.reshape(-1, 1, 1)
    luma = np.asarray(LUMA).reshape(1, 1, 3)
    sat = s * np.eye(3) + (1 - s) * luma
    angle = (2 * math.pi * hue).reshape(-1, 1, 1)
    axis = np.full(3, 1 / math.sqrt(3))
    cross = np.array([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / math.sqrt(3)
    # Rodrigues' rotation formula about the grey axis.
    turn = (
        np.cos(angle) * np.eye(3)
        + np.sin(angle) * cross
        + (1 - np.cos(angle)) * np.outer(axis, axis)
    )
    return turn @ sat


@dataclass(frozen=True)
class Affine:
    """One part's per-sample map ``clip(M @ x + grey(x) * grey_weight + bias [+ noise])``, with
    x the uint8 pixel values and the output normalised. Arrays are float32 over the batch."""

    matrix: np.ndarray  # (B, C, C): gain, hue and saturation, and 1 / (255 std)
    grey_weight: np.ndarray  # (B,): the contrast blend with the mean grey level
    noise_scale: np.ndarray  # (B,): the noise's std in output units; 0 where none is drawn
    noise_offset: np.ndarray  # (B,) in [0, 1): where the torch path slices its noise bank


def affine(drawn: dict[str, np.ndarray], channels: int, std: float, noise_std: float) -> Affine:
    """The per-sample affine map of one part from its drawn factors (``draw_params``); the
    bias, -mean / std, is the same for every sample and not part of it."""
    brightness, contrast = drawn["brightness"], drawn["contrast"]
    scale = 1.0 / (255.0 * std)
    gain = (brightness * contrast * scale).reshape(-1, 1, 1)
    if channels == 3:
        matrix = gain * colour_matrix(drawn["saturation"], drawn["hue"])
    else:
        matrix = gain
    # Contrast blends with the mean grey level of the brightness-adjusted image; saturation
    # and hue map grey to grey, so one shift serves every channel.
    grey_weight = (1.0 - contrast) * brightness * scale
    noise_scale = np.where(drawn["noise"], noise_std / std, 0.0)
    return Affine(
        matrix=matrix.astype(np.float32),
        grey_weight=grey_weight.astype(np.float32),
        noise_scale=noise_scale.astype(np.float32),
        noise_offset=np.asarray(drawn["noise_offset"], dtype=np.float64),
    )


def batch_affines(
    keys: list[str], seed: int, epoch: int, cfg: LoaderConfig, channels: int
) -> dict[str, Affine]:
    """{augmented part: Affine} for a batch of sample keys: what both paths apply."""
    drawn = draw_params(keys, seed, epoch, cfg, channels)
    return {
        part: affine(
            values, part_channels(part, channels), part_normalisation(part, cfg)[1], cfg.noise_std
        )
        for part, values in drawn.items()
    }


def packed_width(channels: int) -> int:
    """Floats per sample that ``pack`` writes for one part: M by columns, w, noise scale."""
    return channels * channels + 2


OBJECT_WIDTH = 2  # the columns ``pack`` appends for the object jitter: gain, shift


def pack(
    affines: dict[str, Affine], parts: tuple[str, ...], sample: dict[str, np.ndarray] | None = None
) -> np.ndarray:
    """(B, K) float32: each part's M (column by column), grey weight and noise scale, side by
    side in ``parts`` order, then (with ``sample``) the object gain and shift. The DALI graph
    gets the whole batch's parameters as this one array and slices it on the device
    (``pipeline.dali_graph``)."""
    columns = []
    for part in parts:
        a = affines[part]
        batch, channels = a.matrix.shape[0], a.matrix.shape[1]
        # column k of M, the weights of input channel k in every output channel
        columns.append(a.matrix.transpose(0, 2, 1).reshape(batch, channels * channels))
        columns.append(a.grey_weight.reshape(batch, 1))
        columns.append(a.noise_scale.reshape(batch, 1))
    if sample is not None:
        columns.append(np.stack([sample["object_gain"], sample["object_shift"]], axis=1))
    return np.ascontiguousarray(np.concatenate(columns, axis=1), dtype=np.float32)
