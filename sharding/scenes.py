"""The pictures of one synthetic sample: procedural scenes, the floor's depth, pasting.

``sharding.synth`` writes zips of these; nothing here knows about zips or batches.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# How far down the floor (0 = horizon, 1 = bottom row) an object stands at the least: one
# pasted above the horizon (a desk on the ceiling) stands at the back of the floor instead, so
# its depth still shows as nearer than the wall behind it.
MIN_FLOOR_POSITION = 0.1


def procedural_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """An office-like room: a wall, a floor below a horizon, and a few boxes. (H, W, 3) uint8."""
    horizon = int(size * rng.uniform(0.3, 0.55))
    wall = rng.uniform(90, 220, size=3)
    floor = rng.uniform(40, 160, size=3)
    img = np.empty((size, size, 3), np.float32)
    img[:horizon] = wall
    rows = np.linspace(0.6, 1.2, size - horizon)[:, None, None]
    img[horizon:] = floor * rows
    for _ in range(rng.integers(2, 6)):  # furniture and windows
        w, h = rng.integers(size // 10, size // 3, size=2)
        x, y = rng.integers(0, size - w), rng.integers(0, size - h)
        img[y : y + h, x : x + w] = rng.uniform(20, 240, size=3)
    img += rng.normal(0, 6, size=img.shape)  # sensor noise, so JPEGs look photographic
    return np.clip(img, 0, 255).astype(np.uint8)


def procedural_foreground(rng: np.random.Generator, size: int) -> np.ndarray:
    """A blob-shaped object with a textured colour. (h, w, 4) uint8 RGBA."""
    h = int(rng.integers(size // 4, size // 2))
    w = int(rng.integers(size // 6, size // 3))
    yy, xx = np.mgrid[0:h, 0:w]
    alpha = np.zeros((h, w), bool)
    for _ in range(rng.integers(2, 5)):  # union of ellipses: a person- or chair-like silhouette
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.3, 0.7) * w
        ry, rx = rng.uniform(0.15, 0.5) * h, rng.uniform(0.2, 0.5) * w
        alpha |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    colour = rng.uniform(0, 255, size=3)
    shade = np.linspace(0.7, 1.2, h)[:, None, None]
    rgb = np.clip(colour * shade + rng.normal(0, 10, size=(h, w, 3)), 0, 255)
    return np.dstack([rgb, alpha * 255]).astype(np.uint8)


def floor_distance(position: np.ndarray | float) -> np.ndarray | float:
    """Distance of the floor at ``position`` (0 at the horizon, 1 at the bottom row)."""
    # Inverse-perspective: distance falls off like 1 / (row below the horizon).
    return 1.0 / (0.15 + 0.85 * position)


def floor_depth(size: int, horizon: float) -> np.ndarray:
    """Far-is-bright depth of an empty room, (size, size) float: wall far, floor nearer downward."""
    rows = np.arange(size, dtype=np.float32)[:, None] / (size - 1)
    below = np.clip((rows - horizon) / (1 - horizon + 1e-6), 0, 1)
    return np.broadcast_to(floor_distance(below), (size, size)).copy()


def jpeg_bytes(array: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def compose(bg: np.ndarray, fg: np.ndarray, x: int, y: int) -> tuple[np.ndarray, np.ndarray]:
    """Paste RGBA ``fg`` on ``bg`` at (x, y); return the image and the binary mask."""
    out = bg.copy()
    h, w = fg.shape[:2]
    alpha = fg[..., 3:4].astype(np.float32) / 255
    region = out[y : y + h, x : x + w].astype(np.float32)
    out[y : y + h, x : x + w] = (fg[..., :3] * alpha + region * (1 - alpha)).astype(np.uint8)
    mask = np.zeros(bg.shape[:2], np.uint8)
    mask[y : y + h, x : x + w] = np.where(fg[..., 3] > 127, 255, 0)
    return out, mask


def depth_map(horizon: float, mask: np.ndarray, foot_row: int, size: int, depth_size: int):
    """Depth at ``depth_size``: the room, and the object at the floor depth where it stands.

    An object whose foot is above the floor's back (``MIN_FLOOR_POSITION``) stands there.
    """
    depth = floor_depth(size, horizon)
    foot = np.clip((foot_row / (size - 1) - horizon) / (1 - horizon + 1e-6), 0, 1)
    depth[mask > 0] = floor_distance(max(float(foot), MIN_FLOOR_POSITION))
    small = np.asarray(Image.fromarray(depth).resize((depth_size, depth_size), Image.BILINEAR))
    lo, hi = float(small.min()), float(small.max())
    # Scaled per image to 0-255, as the original depth maps are.
    return ((small - lo) / max(hi - lo, 1e-6) * 255).round().astype(np.uint8)
