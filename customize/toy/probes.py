"""Probes: small programs that read a toy-world image and say what is in it.

`read(image)` answers background colour, shape colour, shape class (the held-out subject's cross included),
whether the held-out stripe style is present, position, size and the shape's mask. Each answer is a plain rule
on pixels, chosen to survive the blur and colour drift of images a tiny diffusion model generates:

- background: the most common palette colour (nearest entry) on the image border;
- mask: pixels whose RGB distance from the measured background exceeds half the distance between background and
  foreground (the largest 8-connected blob, so stray specks do not count);
- colour: the most common palette colour (nearest entry) among the pixels clearly off the background;
- shape: nearest class template of the mask cropped to its bounding box and resampled to 8x8 (templates are
  averaged from the world's own renders, blurred and sharp, on first use);
- style: a periodicity measure of the distance-from-shape-colour profile down the shape's rows (stripes are
  horizontal): enough amplitude, and most of the profile's power near the stripe frequency;
- position / size: the bounding box centre relative to the image centre, and the bounding box's longer side.

`tests/test_toy_probes.py` checks every answer against the world's ground truth (>= 95%), so a broken probe
cannot pass a broken model.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from customize.toy import world

_NAMES = tuple(world.PALETTE)
_RGB = np.asarray([world.PALETTE[n] for n in _NAMES], dtype=np.float32)  # (K, 3)
_MIN_PALETTE_DISTANCE = min(
    float(np.linalg.norm(_RGB[i] - _RGB[j])) for i in range(len(_NAMES)) for j in range(i + 1, len(_NAMES))
)
# A pixel is a foreground candidate when it is this far from the background: below half the closest palette pair,
# so any shape colour clears it, above the colour noise of a generated flat background.
CANDIDATE_DISTANCE = 0.35 * _MIN_PALETTE_DISTANCE
VOTE_DISTANCE = 0.5 * _MIN_PALETTE_DISTANCE  # a pixel this close to a palette entry votes for it
MIN_SHAPE_PIXELS = 4  # at 32 px; fewer means "no shape found"
TEMPLATE_SIZE = 8  # the mask's bounding box is resampled to TEMPLATE_SIZE x TEMPLATE_SIZE for the shape template
CENTER_RADIUS = 2.5  # 32-px units: a bounding-box centre within this of the image centre is "center"
SIZE_SPLIT = 16.0  # 32-px units: bounding-box longer side below this is "small" (small ~12, large ~20)
# Stripe detection: the row profile must vary by this much (RGB distance units, std) and put this share of its
# power within STRIPE_BAND of the stripe frequency.
STRIPE_MIN_AMPLITUDE = 20.0
STRIPE_MIN_POWER_SHARE = 0.45
STRIPE_BAND = (0.6, 1.6)  # periods between 0.6x and 1.6x the style's period count as "the stripe frequency"


@dataclass
class Reading:
    """What a probe sees in one image. Attributes are None when no shape was found."""

    background: str
    colour: str | None = None
    shape: str | None = None
    style: bool = False
    position: str | None = None
    size: str | None = None
    mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=bool), repr=False)
    style_score: float = 0.0  # amplitude * power share of the stripe profile, for soft measures

    @property
    def found(self) -> bool:
        return self.shape is not None


def nearest_colour(rgb: np.ndarray) -> np.ndarray:
    """Index into the palette of the nearest entry for each (..., 3) colour."""
    d = np.linalg.norm(rgb[..., None, :].astype(np.float32) - _RGB, axis=-1)  # (..., K)
    return d.argmin(axis=-1)


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    return arr


def background(arr: np.ndarray) -> tuple[int, np.ndarray]:
    """(palette index, measured RGB) of the background: the commonest palette colour on the border ring."""
    h, w, _ = arr.shape
    ring = max(1, h // 16)
    border = np.concatenate([arr[:ring].reshape(-1, 3), arr[-ring:].reshape(-1, 3),
                             arr[:, :ring].reshape(-1, 3), arr[:, -ring:].reshape(-1, 3)])  # (N, 3)
    labels = nearest_colour(border)
    bg = int(np.bincount(labels, minlength=len(_NAMES)).argmax())
    return bg, np.median(border[labels == bg], axis=0)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected blob of a boolean mask (BFS; images are tiny)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        blob, queue = [], deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            blob.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right), inclusive."""
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def template_features(mask: np.ndarray) -> np.ndarray:
    """The mask's bounding box resampled (area average) to TEMPLATE_SIZE^2 values, plus its aspect ratio."""
    top, left, bottom, right = bbox(mask)
    crop = torch.from_numpy(mask[top : bottom + 1, left : right + 1].astype(np.float32))[None, None]  # (1, 1, h, w)
    # Upsample first so that "area" averaging of a box smaller than the template is still a fair resampling.
    crop = F.interpolate(crop, scale_factor=4, mode="nearest")
    small = F.interpolate(crop, size=(TEMPLATE_SIZE, TEMPLATE_SIZE), mode="area")  # (1, 1, T, T)
    aspect = (bottom - top + 1) / (right - left + 1)
    return np.concatenate([small.flatten().numpy(), [aspect]]).astype(np.float32)


@functools.lru_cache(maxsize=1)
def shape_templates() -> tuple[tuple[str, ...], np.ndarray]:
    """Mean template features per shape class, from the world's renders: every size and position, sharp and
    blurred (so a soft generated edge lands near its class)."""
    names = world.ALL_SHAPES
    feats = []
    for k, shape in enumerate(names):
        rows = []
        for i in range(40):
            rng = world.scene_rng(0, i, f"template-{shape}")
            scene = world.Scene(shape, "black", "white", **world._layout(rng))
            img = world.render(scene)
            if i % 2:
                img = img.filter(ImageFilter.GaussianBlur(0.8))
            rows.append(template_features(_mask_and_colour(_as_array(img))[0]))
        feats.append(np.mean(rows, axis=0))
    return names, np.stack(feats)  # (S, T*T + 1)


def classify_shape(mask: np.ndarray) -> str:
    names, templates = shape_templates()
    d = np.linalg.norm(templates - template_features(mask), axis=1)  # (S,)
    return names[int(d.argmin())]


def _mask_and_colour(arr: np.ndarray) -> tuple[np.ndarray, int | None, int]:
    """(mask, shape colour index or None, background index)."""
    bg, bg_rgb = background(arr)
    dist = np.linalg.norm(arr - bg_rgb, axis=-1)  # (H, W)
    candidates = dist > CANDIDATE_DISTANCE
    if candidates.sum() < MIN_SHAPE_PIXELS * (arr.shape[0] / world.IMAGE_SIZE) ** 2:
        return np.zeros(dist.shape, dtype=bool), None, bg
    # Every candidate near a palette entry votes (not only the farthest pixels: white stripes on a dark shape
    # are farther from a dark background than the shape's own colour, yet cover only a third of it). Blends at
    # edges and between stripes sit between entries and abstain, unless no pixel is near any entry.
    pixels = arr[candidates]  # (N, 3)
    labels = nearest_colour(pixels)
    near = np.linalg.norm(pixels - _RGB[labels], axis=-1) < VOTE_DISTANCE
    if near.sum() >= MIN_SHAPE_PIXELS:
        pixels, labels = pixels[near], labels[near]
    votes = np.bincount(labels, minlength=len(_NAMES))
    votes[bg] = 0
    if votes.sum() == 0:
        return np.zeros(dist.shape, dtype=bool), None, bg
    fg = int(votes.argmax())
    fg_rgb = np.median(pixels[labels == fg], axis=0)
    # Half-way between background and shape colour: the edge of a blurred shape, not its halo.
    mask = largest_component(dist > max(CANDIDATE_DISTANCE, 0.5 * float(np.linalg.norm(fg_rgb - bg_rgb))))
    return mask, fg, bg


def stripe_score(arr: np.ndarray, mask: np.ndarray, fg_rgb: np.ndarray, style: world.Style = world.STYLE) -> tuple[float, float]:
    """(amplitude, power share) of the row profile of distance-from-shape-colour over the mask's interior.

    Horizontal stripes make the profile a square wave of the style's period; a flat shape gives a flat profile."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]  # eroded by 1 px
    dist = np.linalg.norm(arr - fg_rgb, axis=-1)  # (H, W)
    rows = [dist[y][interior[y]].mean() for y in range(mask.shape[0]) if interior[y].sum() >= 2]
    if len(rows) < 4:
        return 0.0, 0.0
    profile = np.asarray(rows) - np.mean(rows)  # (R,)
    amplitude = float(profile.std())
    n = max(len(profile), 64)  # zero-pad for a finer frequency grid
    power = np.abs(np.fft.rfft(profile, n=n)) ** 2  # (n//2 + 1,)
    freqs = np.fft.rfftfreq(n)  # cycles per pixel
    period = style.period * mask.shape[0] / world.IMAGE_SIZE
    band = (freqs >= 1 / (period * STRIPE_BAND[1])) & (freqs <= 1 / (period * STRIPE_BAND[0]))
    share = float(power[band].sum() / max(power[1:].sum(), 1e-12))
    return amplitude, share


def read(image) -> Reading:
    """Probe one image (PIL or (H, W, 3) array in 0..255)."""
    arr = _as_array(image)
    mask, fg, bg = _mask_and_colour(arr)
    if fg is None or mask.sum() < MIN_SHAPE_PIXELS:
        return Reading(background=_NAMES[bg], mask=mask)
    unit = arr.shape[0] / world.IMAGE_SIZE
    top, left, bottom, right = bbox(mask)
    dx = ((left + right + 1) / 2 - arr.shape[1] / 2) / unit
    dy = ((top + bottom + 1) / 2 - arr.shape[0] / 2) / unit
    if max(abs(dx), abs(dy)) < CENTER_RADIUS:
        position = "center"
    else:
        position = f"{'top' if dy < 0 else 'bottom'} {'left' if dx < 0 else 'right'}"
    extent = max(bottom - top + 1, right - left + 1) / unit
    fg_rgb = np.asarray(world.PALETTE[_NAMES[fg]], dtype=np.float32)
    amplitude, share = stripe_score(arr, mask, fg_rgb)
    return Reading(
        background=_NAMES[bg],
        colour=_NAMES[fg],
        shape=classify_shape(mask),
        style=amplitude >= STRIPE_MIN_AMPLITUDE and share >= STRIPE_MIN_POWER_SHARE,
        position=position,
        size="small" if extent < SIZE_SPLIT else "large",
        mask=mask,
        style_score=amplitude * share,
    )


def read_all(images) -> list[Reading]:
    return [read(im) for im in images]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
