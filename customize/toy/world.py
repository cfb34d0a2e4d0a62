"""The toy world: flat shapes on flat backgrounds, every image and caption drawn from a seed.

A scene is one shape (circle, square, triangle) of one colour, of a size ("small" / "large"), at one of five
positions, on a background of another colour. Captions are generated from the same parameters ("a small red
circle at the top left on a blue background"), so the ground truth of every image is known and a probe
(`customize.toy.probes`) can check a generated image against its prompt.

Kept out of the base model's training, for the customization methods:
- the SUBJECT: a magenta plus-shaped cross (a shape and a colour the base never sees), named by the rare
  identifier "sks" with the class word "shape" that the base does know (DreamBooth's "a sks dog" / "a dog");
- the STYLE: horizontal white stripes laid over any shape, named by the rare identifier "zwx";
- a set of (colour, shape, background) combinations, so "held-out captions" are combinations the base has never
  been shown, not just new seeds.
Plus, for later methods: edit pairs (instruction, input, exactly edited image) and control maps (mask, edges).

Everything can be exported as an image folder with `metadata.jsonl` (the `datasets` "imagefolder" convention,
{"file_name": ..., "text": ...}, extra images as "<column>_file_name") or built as a `datasets.Dataset`.
"""

from __future__ import annotations

import itertools
import json
import os
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

IMAGE_SIZE = 32  # pixels; the geometry below is in units of a 32-px image and scales with the size asked for
SUPERSAMPLE = 4  # sub-pixel samples per axis for anti-aliased edges

# Few colours, far apart in RGB (the closest pair, magenta/red, is 161 apart), so a tiny VAE keeps them apart
# and a probe can snap a blurry pixel to the right name.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 50),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "magenta": (220, 60, 200),
}
BASE_COLOURS = ("red", "green", "blue", "yellow", "white", "black")  # taught to the base model
BASE_SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 6.0, "large": 10.0}  # shape "radius" (half the bounding box) in 32-px units
# Offset of the shape centre from the image centre, in units of the free room (16 - radius) the size leaves.
POSITIONS = {
    "center": (0.0, 0.0),
    "top left": (-1.0, -1.0),
    "top right": (1.0, -1.0),
    "bottom left": (-1.0, 1.0),
    "bottom right": (1.0, 1.0),
}
POSITION_PHRASES = {
    "center": "in the center",
    "top left": "at the top left",
    "top right": "at the top right",
    "bottom left": "at the bottom left",
    "bottom right": "at the bottom right",
}
CORNER_FRACTION = 0.85  # corner positions use this much of the free room, so no shape touches the border
MAX_JITTER = 1.0  # +- pixels (32-px units) of random shift, so positions are regions, not points


@dataclass(frozen=True)
class Subject:
    """The held-out DreamBooth / textual-inversion subject."""

    shape: str = "cross"
    colour: str = "magenta"
    identifier: str = "sks"  # rare token, in the vocabulary but never in a base caption
    class_word: str = "shape"  # generic word the base knows (captions say "a red shape" for any shape)
    # The only backgrounds the instance images show (a DreamBooth user's "a few contexts"); the other three, red,
    # green and blue, are where subject and prompt fidelity are measured.
    instance_backgrounds: tuple[str, ...] = ("white", "black", "yellow")

    @property
    def instance_prompt(self) -> str:
        return f"a {self.identifier} {self.class_word}"

    @property
    def class_prompt(self) -> str:
        return f"a {self.class_word}"

    def prompt(self, background: str | None = None) -> str:
        return self.instance_prompt + (f" on a {background} background" if background else "")

    @property
    def unseen_backgrounds(self) -> tuple[str, ...]:
        return tuple(c for c in BASE_COLOURS if c not in self.instance_backgrounds and c != self.colour)


@dataclass(frozen=True)
class Style:
    """The held-out style: horizontal stripes of `stripe_colour` over the shape, `band` px wide every `period` px."""

    name: str = "stripes"
    identifier: str = "zwx"
    stripe_colour: str = "white"
    period: float = 6.0  # 32-px units
    band: float = 2.0
    shapes: tuple[str, ...] = ("circle",)  # the only shapes the style images show

    @property
    def trigger(self) -> str:
        return f"in {self.identifier} style"

    def prompt(self, scene: "Scene") -> str:
        return caption(replace(scene, style=self.name))

    @property
    def unseen_shapes(self) -> tuple[str, ...]:
        return tuple(s for s in BASE_SHAPES if s not in self.shapes)

    @property
    def colours(self) -> tuple[str, ...]:
        """Colours a striped image may use: the stripes must differ from both the shape and the background."""
        return tuple(c for c in BASE_COLOURS if c != self.stripe_colour)


SUBJECT = Subject()
STYLE = Style()
ALL_SHAPES = BASE_SHAPES + (SUBJECT.shape,)
# Words that must never appear in a base caption: the identifiers, and what a person would call the held-out
# concepts (the tokenizer may still split them into pieces; the text encoder just never learns them).
HELD_OUT_WORDS = (SUBJECT.identifier, SUBJECT.shape, SUBJECT.colour, "plus", STYLE.identifier, STYLE.name, "striped")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str = "large"
    position: str = "center"
    style: str | None = None  # None or STYLE.name
    jitter: tuple[float, float] = (0.0, 0.0)  # (dx, dy) in 32-px units

    def __post_init__(self):
        if self.shape not in ALL_SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose one of {ALL_SHAPES}")
        for c in (self.colour, self.background):
            if c not in PALETTE:
                raise ValueError(f"unknown colour {c!r}; choose one of {tuple(PALETTE)}")
        if self.colour == self.background:
            raise ValueError(f"shape and background are both {self.colour}: the shape would be invisible")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose one of {tuple(SIZES)}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; choose one of {tuple(POSITIONS)}")
        if self.style not in (None, STYLE.name):
            raise ValueError(f"unknown style {self.style!r}; the world has only {STYLE.name!r}")

    def geometry(self, image_size: int = IMAGE_SIZE) -> tuple[float, float, float]:
        """(cx, cy, r) in pixels of an `image_size` image."""
        unit = image_size / IMAGE_SIZE
        r = SIZES[self.size]
        room = (IMAGE_SIZE / 2 - r) * CORNER_FRACTION
        ox, oy = POSITIONS[self.position]
        cx = IMAGE_SIZE / 2 + ox * room + self.jitter[0]
        cy = IMAGE_SIZE / 2 + oy * room + self.jitter[1]
        return cx * unit, cy * unit, r * unit

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def _inside(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Point-in-shape test for coordinates relative to the shape centre (y grows downwards)."""
    ax, ay = np.abs(x), np.abs(y)
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":  # half side 0.85 r: about the circle's area
        return np.maximum(ax, ay) <= 0.85 * r
    if shape == "triangle":  # pointing up: apex at -r, base at +0.8 r, base width 2 r
        top, bottom = -r, 0.8 * r
        half_width = r * (y - top) / (bottom - top)
        return (y >= top) & (y <= bottom) & (ax <= half_width)
    if shape == "cross":  # plus sign with arms a third of the radius wide on each side
        arm = r / 3
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    raise ValueError(f"unknown shape {shape!r}")


def coverage(scene: Scene, image_size: int = IMAGE_SIZE, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (H, W) float32 in [0, 1]."""
    return shape_coverage(scene.shape, *scene.geometry(image_size), image_size=image_size, supersample=supersample)


def shape_coverage(shape: str, cx: float, cy: float, r: float, image_size: int = IMAGE_SIZE,
                   supersample: int = SUPERSAMPLE) -> np.ndarray:
    """`coverage` of `shape` at any centre (cx, cy) and radius r in pixels, not only the scenes' sizes and
    positions (the ControlNet bench asks for layouts no scene has), (H, W) float32 in [0, 1]."""
    n = image_size * supersample
    coords = (np.arange(n) + 0.5) / supersample  # sub-pixel sample centres, in pixels
    x, y = np.meshgrid(coords - cx, coords - cy)  # (n, n)
    inside = _inside(shape, x, y, r).astype(np.float32)
    return inside.reshape(image_size, supersample, image_size, supersample).mean(axis=(1, 3))  # (H, W)


def shape_mask(scene: Scene, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Ground-truth mask: pixels at least half covered, (H, W) bool."""
    return coverage(scene, image_size) >= 0.5


def stripe_mask(image_size: int = IMAGE_SIZE, style: Style = STYLE, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel that lies on a stripe, (H, W). Stripes are anchored to the image, not the shape."""
    unit = image_size / IMAGE_SIZE
    n = image_size * supersample
    y = (np.arange(n) + 0.5) / supersample / unit  # in 32-px units
    on = (np.mod(y, style.period) < style.band).astype(np.float32)  # (n,)
    rows = on.reshape(image_size, supersample).mean(axis=1)  # (H,)
    return np.broadcast_to(rows[:, None], (image_size, image_size)).copy()


def render_array(scene: Scene, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """(H, W, 3) float32 RGB in [0, 255]: the background, the shape's colour blended by coverage, stripes on top."""
    bg = np.asarray(PALETTE[scene.background], dtype=np.float32)
    fg = np.asarray(PALETTE[scene.colour], dtype=np.float32)
    cov = coverage(scene, image_size)[..., None]  # (H, W, 1)
    shape_rgb = np.broadcast_to(fg, cov.shape[:2] + (3,))
    if scene.style == STYLE.name:
        stripes = stripe_mask(image_size)[..., None]  # (H, W, 1)
        shape_rgb = (1 - stripes) * fg + stripes * np.asarray(PALETTE[STYLE.stripe_colour], dtype=np.float32)
    return (1 - cov) * bg + cov * shape_rgb  # (H, W, 3)


def to_image(arr: np.ndarray) -> Image.Image:
    """An (H, W, 3) float array in [0, 255] as an 8-bit RGB image."""
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="RGB")


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    return to_image(render_array(scene, image_size))


def control_map(scene: Scene, kind: str = "mask", image_size: int = IMAGE_SIZE) -> Image.Image:
    """ControlNet conditioning image (RGB, white on black): "mask" = the shape's mask, "edge" = its 1-px outline
    (mask pixels with a 4-neighbour outside the mask)."""
    return mask_control_image(shape_mask(scene, image_size), kind)


def mask_control_image(mask: np.ndarray, kind: str = "mask") -> Image.Image:
    """A boolean (H, W) mask as `control_map`'s conditioning image: the mask itself or its 1-px outline."""
    if kind == "edge":
        padded = np.pad(mask, 1, constant_values=False)
        interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        mask = mask & ~interior
    elif kind != "mask":
        raise ValueError(f"control map kind must be 'mask' or 'edge', got {kind!r}")
    return Image.fromarray((mask * 255).astype(np.uint8), mode="L").convert("RGB")


def clutter_array(seed: int, index: int, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """A generic image for training the VAE, (H, W, 3) float32 in [0, 255]: 1-4 random primitives (rectangles,
    thin bars, ellipses, triangles, plus signs, striped patches) in random palette colours over a random
    background colour.

    An autoencoder is a codec, not a generative model: SD's VAE is trained on generic images and can encode any
    subject, and the toy VAE is trained on these plus base scenes, so it can encode a picture of a held-out
    concept. What is held out is held out from the generative part: the text encoder and the UNet never see the
    subject, the style or their words."""
    rng = scene_rng(seed, index, "clutter")
    names = list(PALETTE)
    unit = image_size / IMAGE_SIZE
    n = image_size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE / unit  # sub-pixel centres in 32-px units
    x, y = np.meshgrid(coords, coords)
    canvas = np.empty((n, n, 3), dtype=np.float32)
    canvas[:] = PALETTE[names[rng.integers(len(names))]]
    for _ in range(rng.integers(1, 5)):
        kind = rng.integers(6)
        cx, cy = rng.uniform(0, IMAGE_SIZE, size=2)
        colour = PALETTE[names[rng.integers(len(names))]]
        if kind == 0:  # rectangle
            hw, hh = rng.uniform(2, 12, size=2)
            inside = (np.abs(x - cx) <= hw) & (np.abs(y - cy) <= hh)
        elif kind == 1:  # thin bar, horizontal or vertical
            half_thick, half_len = rng.uniform(0.5, 2.0), rng.uniform(6, 16)
            hw, hh = (half_len, half_thick) if rng.random() < 0.5 else (half_thick, half_len)
            inside = (np.abs(x - cx) <= hw) & (np.abs(y - cy) <= hh)
        elif kind == 2:  # ellipse
            rx, ry = rng.uniform(2, 10, size=2)
            inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
        elif kind == 3:  # triangle: inside all three half-planes of random vertices (either winding)
            vx, vy = rng.uniform(cx - 10, cx + 10, size=3), rng.uniform(cy - 10, cy + 10, size=3)
            sides = [(vx[(k + 1) % 3] - vx[k]) * (y - vy[k]) - (vy[(k + 1) % 3] - vy[k]) * (x - vx[k]) for k in range(3)]
            inside = ((sides[0] >= 0) & (sides[1] >= 0) & (sides[2] >= 0)) | ((sides[0] <= 0) & (sides[1] <= 0) & (sides[2] <= 0))
        elif kind == 4:  # plus sign of random arm length and width
            r, arm = rng.uniform(4, 11), rng.uniform(1, 4)
            ax, ay = np.abs(x - cx), np.abs(y - cy)
            inside = ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
        else:  # striped rectangle: bands of a second colour, random period and orientation
            hw, hh = rng.uniform(4, 14, size=2)
            inside = (np.abs(x - cx) <= hw) & (np.abs(y - cy) <= hh)
            period = rng.uniform(4, 10)
            along = y if rng.random() < 0.5 else x
            band = np.mod(along - rng.uniform(0, period), period) < period * rng.uniform(0.25, 0.5)
            canvas[inside & ~band] = colour
            colour = PALETTE[names[rng.integers(len(names))]]
            inside = inside & band
        canvas[inside] = colour
    return canvas.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE, 3).mean(axis=(1, 3))  # (H, W, 3)


# ---------------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------------

# How often a training caption leaves a detail out (the model then learns that detail's marginal) or says
# "shape" instead of the shape's name (so the base knows the class word used for prior preservation).
CAPTION_DROP = {"size": 0.5, "position": 0.5, "colour": 0.1, "background": 0.1}
GENERIC_SHAPE_RATE = 0.15


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """The scene's caption. With `rng`, details are left out at the CAPTION_DROP rates (training captions);
    without, the full caption. The subject is named by its identifier, the style by its trigger phrase."""
    keep = {k: True for k in CAPTION_DROP}
    generic = False
    if rng is not None:
        keep = {k: bool(rng.random() >= p) for k, p in CAPTION_DROP.items()}
        generic = bool(rng.random() < GENERIC_SHAPE_RATE)
    if scene.shape == SUBJECT.shape:
        noun = f"{SUBJECT.identifier} {SUBJECT.class_word}"
        keep["colour"] = keep["colour"] and scene.colour != SUBJECT.colour
    else:
        noun = SUBJECT.class_word if generic else scene.shape
    words = ["a"]
    if keep["size"]:
        words.append(scene.size)
    if keep["colour"]:
        words.append(scene.colour)
    words.append(noun)
    if keep["position"]:
        words.append(POSITION_PHRASES[scene.position])
    if keep["background"]:
        words.append(f"on a {scene.background} background")
    if scene.style == STYLE.name:
        words.append(STYLE.trigger)
    return " ".join(words)


def parse_caption(text: str) -> dict:
    """The attributes a caption asks for: {"shape", "colour", "background", "size", "position", "subject", "style"}
    (None where the caption does not say). Inverse of `caption` for scoring generated images."""
    words = text.lower().replace(",", " ").split()
    joined = " ".join(words)
    out = {"shape": None, "colour": None, "background": None, "size": None, "position": None,
           "subject": SUBJECT.identifier in words, "style": STYLE.identifier in words}
    if " on a " in f" {joined} ":
        head, _, tail = f" {joined} ".partition(" on a ")
        bg = tail.split()
        if bg and bg[0] in PALETTE:
            out["background"] = bg[0]
    else:
        head = joined
    head_words = head.split()
    for w in head_words:
        if w in SIZES:
            out["size"] = w
        elif w in PALETTE:
            out["colour"] = w
        elif w in BASE_SHAPES:
            out["shape"] = w
    if out["subject"]:
        out["shape"] = SUBJECT.shape
        out["colour"] = out["colour"] or SUBJECT.colour
    for name, phrase in POSITION_PHRASES.items():
        if phrase in joined:
            out["position"] = name
    return out


# ---------------------------------------------------------------------------------------------------------------
# Sampling scenes: splits and held-out combinations
# ---------------------------------------------------------------------------------------------------------------

HOLDOUT_SEED = 1234
HOLDOUT_FRACTION = 1 / 6


def _held_out_combos() -> frozenset[tuple[str, str, str]]:
    """A fixed sixth of the (colour, shape, background) triples, kept out of base training. Every colour, shape
    and background still appears in training in other triples, so a held-out caption is a new combination of
    known words (a test of composition, not of vocabulary)."""
    combos = [(c, s, b) for c, s, b in itertools.product(BASE_COLOURS, BASE_SHAPES, BASE_COLOURS) if c != b]
    rng = np.random.default_rng(HOLDOUT_SEED)
    order = rng.permutation(len(combos))
    held = frozenset(combos[i] for i in order[: round(len(combos) * HOLDOUT_FRACTION)])
    for axis in range(3):  # a held-out set that removed every triple with some value would hide that word
        values = {c[axis] for c in combos}
        assert values == {c[axis] for c in combos if c not in held}, "held-out set hides a whole word; change HOLDOUT_SEED"
    return held


HELD_OUT_COMBOS = _held_out_combos()
SPLITS = ("train", "heldout", "all")


def sample_scene(
    rng: np.random.Generator,
    split: str = "train",
    *,
    shapes: tuple[str, ...] = BASE_SHAPES,
    colours: tuple[str, ...] = BASE_COLOURS,
    backgrounds: tuple[str, ...] = BASE_COLOURS,
    style: str | None = None,
) -> Scene:
    """A random scene. split "train" never returns a held-out (colour, shape, background) triple, "heldout" only
    those, "all" anything."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "heldout":
        pool = sorted(c for c in HELD_OUT_COMBOS if c[0] in colours and c[1] in shapes and c[2] in backgrounds)
        if not pool:
            raise ValueError("no held-out combination matches these shapes/colours/backgrounds")
        colour, shape, background = pool[rng.integers(len(pool))]
    else:
        while True:
            colour, shape, background = (str(rng.choice(colours)), str(rng.choice(shapes)), str(rng.choice(backgrounds)))
            if colour == background:
                continue
            if split == "train" and (colour, shape, background) in HELD_OUT_COMBOS:
                continue
            break
    return Scene(shape, colour, background, style=style, **_layout(rng))


def _layout(rng: np.random.Generator) -> dict:
    """{"size", "position", "jitter"} drawn uniformly."""
    size = str(rng.choice(tuple(SIZES)))
    position = str(rng.choice(tuple(POSITIONS)))
    jitter = tuple(float(v) for v in rng.uniform(-MAX_JITTER, MAX_JITTER, size=2))
    return {"size": size, "position": position, "jitter": jitter}


def scene_rng(seed: int, index: int, stream: str) -> np.random.Generator:
    """An independent generator per (seed, example index, stream): example i is the same whatever order or
    subset of examples is asked for, and streams (train, heldout, subject, ...) never share draws."""
    return np.random.default_rng([seed, index, zlib.crc32(stream.encode())])


def base_example(seed: int, index: int, split: str = "train") -> tuple[Scene, str]:
    """Example `index` of the base data: (scene, caption). Training captions leave details out at random;
    held-out captions are always complete (they are prompts to score)."""
    rng = scene_rng(seed, index, split)
    scene = sample_scene(rng, split)
    return scene, caption(scene, rng if split == "train" else None)


def heldout_prompts(n: int = 200, seed: int = 0) -> list[tuple[str, Scene]]:
    """`n` complete captions of held-out combinations with the scene each describes."""
    return [(c, s) for s, c in (base_example(seed, i, "heldout") for i in range(n))]


def subject_scenes(n: int = 5, seed: int = 0, subject: Subject = SUBJECT) -> list[Scene]:
    """The instance images' scenes: the subject on its instance backgrounds, sizes and positions varied."""
    backgrounds = subject.instance_backgrounds
    return [
        Scene(subject.shape, subject.colour, backgrounds[i % len(backgrounds)], **_layout(scene_rng(seed, i, "subject")))
        for i in range(n)
    ]


def subject_eval_prompts(subject: Subject = SUBJECT) -> list[tuple[str, dict]]:
    """Prompts that put the subject where the instance images never did (each unseen background), with what a
    faithful image must show."""
    return [
        (subject.prompt(bg), {"shape": subject.shape, "colour": subject.colour, "background": bg})
        for bg in subject.unseen_backgrounds
    ]


def style_scenes(n: int = 8, seed: int = 0, style: Style = STYLE) -> list[Scene]:
    """Style training scenes: striped versions of `style.shapes` only, colours chosen so the stripes show."""
    return [
        sample_scene(scene_rng(seed, i, "style"), "all", shapes=style.shapes, colours=style.colours,
                     backgrounds=style.colours, style=style.name)
        for i in range(n)
    ]


def style_eval_scenes(n: int = 24, seed: int = 0, style: Style = STYLE) -> list[Scene]:
    """Scenes of shapes the style images never showed, for "is the style present" scoring."""
    return [
        sample_scene(scene_rng(seed, i, "style-eval"), "all", shapes=style.unseen_shapes, colours=style.colours,
                     backgrounds=style.colours, style=style.name)
        for i in range(n)
    ]


# Layouts no scene has (for the ControlNet bench): radii between and above the two sizes (6 and 10), centres on
# the edges' midpoints and between the corner regions, where neither a position nor its +-1 px jitter reaches.
HELDOUT_RADII = (8.0, 12.0)
HELDOUT_OFFSETS = ((0.0, -1.0), (0.0, 1.0), (-1.0, 0.0), (1.0, 0.0), (-0.5, 0.5), (0.5, -0.5))


@dataclass(frozen=True)
class ControlCase:
    """A held-out caption without size or position words and a mask at a held-out layout: what a mask
    ControlNet is asked, and what a faithful image shows (`mask`, (H, W) bool, and `control`, its RGB map)."""

    prompt: str
    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    r: float

    @property
    def mask(self) -> np.ndarray:
        return shape_coverage(self.shape, self.cx, self.cy, self.r) >= 0.5

    @property
    def control(self) -> Image.Image:
        return mask_control_image(self.mask)


def heldout_control_cases(n: int = 48, seed: int = 0) -> list[ControlCase]:
    """`n` cases: a held-out (colour, shape, background) combination (`HELD_OUT_COMBOS`), said as "a red circle on a
    blue background", on a held-out radius and offset (cycled, so every layout is asked about as often)."""
    pool = sorted(HELD_OUT_COMBOS)
    out = []
    for i in range(n):
        rng = scene_rng(seed, i, "control-heldout")
        colour, shape, background = pool[rng.integers(len(pool))]
        r = HELDOUT_RADII[i % len(HELDOUT_RADII)]
        ox, oy = HELDOUT_OFFSETS[(i // len(HELDOUT_RADII)) % len(HELDOUT_OFFSETS)]
        room = (IMAGE_SIZE / 2 - r) * CORNER_FRACTION
        out.append(ControlCase(f"a {colour} {shape} on a {background} background", shape, colour, background,
                               IMAGE_SIZE / 2 + ox * room, IMAGE_SIZE / 2 + oy * room, r))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Edit pairs (InstructPix2Pix)
# ---------------------------------------------------------------------------------------------------------------

EDIT_KINDS = ("colour", "background", "size", "position")


@dataclass(frozen=True)
class EditPair:
    instruction: str
    source: Scene
    target: Scene
    kind: str


def edit_pair(seed: int, index: int, split: str = "all") -> EditPair:
    """A random scene and one instruction that changes exactly one attribute; the target is the same scene
    re-rendered with that attribute changed (same jitter), so the edited image is exact."""
    rng = scene_rng(seed, index, "edit")
    src = sample_scene(rng, split)
    kind = EDIT_KINDS[rng.integers(len(EDIT_KINDS))]
    if kind == "colour":
        new = str(rng.choice([c for c in BASE_COLOURS if c not in (src.colour, src.background)]))
        return EditPair(f"make the {src.shape} {new}", src, replace(src, colour=new), kind)
    if kind == "background":
        new = str(rng.choice([c for c in BASE_COLOURS if c not in (src.colour, src.background)]))
        return EditPair(f"change the background to {new}", src, replace(src, background=new), kind)
    if kind == "size":
        new = "small" if src.size == "large" else "large"
        return EditPair(f"make the {src.shape} {new}", src, replace(src, size=new), kind)
    new = str(rng.choice([p for p in POSITIONS if p != src.position]))
    return EditPair(f"move the {src.shape} to the {new}", src, replace(src, position=new), kind)


# ---------------------------------------------------------------------------------------------------------------
# Export: image folders with metadata.jsonl, and datasets.Dataset
# ---------------------------------------------------------------------------------------------------------------


def _base_rows(n: int, seed: int, split: str = "train") -> list[dict]:
    rows = []
    for i in range(n):
        scene, text = base_example(seed, i, split)
        rows.append({"image": render(scene), "text": text, **_attrs(scene)})
    return rows


def _attrs(scene: Scene) -> dict:
    d = scene.to_dict()
    d["style"] = d["style"] or ""
    d["jitter"] = list(d["jitter"])
    return d


def _subject_rows(n: int, seed: int, split: str = "all") -> list[dict]:
    """The n instance images, each twice: captioned with its full caption ("a small sks shape at the top left on
    a white background") and with the subject prompt alone ("a sks shape on a white background"). The layout-free
    copy teaches the identifier to draw the whole subject when a prompt names no layout: on a base that follows
    position words, a LoRA trained on full captions alone leaves the layout to them and draws nothing for "a sks
    shape on a red background" (docs/findings.md, 'The subject without a layout phrase')."""
    rows = []
    for s in subject_scenes(n, seed):
        image, attrs = render(s), _attrs(s)
        rows.append({"image": image, "text": caption(s), **attrs})
        rows.append({"image": image, "text": SUBJECT.prompt(s.background), **attrs})
    return rows


def _class_rows(n: int, seed: int, split: str = "train") -> list[dict]:
    """Real class images (the generic "shape" class): what prior preservation would ideally show."""
    rows = []
    for i in range(n):
        scene = sample_scene(scene_rng(seed, i, "class"), split)
        rows.append({"image": render(scene), "text": SUBJECT.class_prompt, **_attrs(scene)})
    return rows


def _style_rows(n: int, seed: int, split: str = "all") -> list[dict]:
    return [{"image": render(s), "text": STYLE.prompt(s), **_attrs(s)} for s in style_scenes(n, seed)]


def _edit_rows(n: int, seed: int, split: str = "all") -> list[dict]:
    rows = []
    for i in range(n):
        e = edit_pair(seed, i, split)
        rows.append({"input_image": render(e.source), "edit_prompt": e.instruction, "edited_image": render(e.target),
                     "input_text": caption(e.source), "edited_text": caption(e.target), "kind": e.kind})
    return rows


def _control_rows(kind: str) -> Callable[[int, int, str], list[dict]]:
    def rows(n: int, seed: int, split: str = "all") -> list[dict]:
        out = []
        for i in range(n):
            scene = sample_scene(scene_rng(seed, i, f"control-{kind}"), split)
            out.append({"image": render(scene), "conditioning_image": control_map(scene, kind), "text": caption(scene),
                        **_attrs(scene)})
        return out

    return rows


# name -> rows(n, seed, split): every exportable set of the world
DATASETS: dict[str, Callable[..., list[dict]]] = {
    "base": _base_rows,
    "subject": _subject_rows,
    "class": _class_rows,
    "style": _style_rows,
    "edits": _edit_rows,
    "control-mask": _control_rows("mask"),
    "control-edge": _control_rows("edge"),
}


def rows(name: str, n: int, seed: int = 0, split: str | None = None) -> list[dict]:
    if name not in DATASETS:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name](n, seed) if split is None else DATASETS[name](n, seed, split)


def write_imagefolder(folder: str | os.PathLike, records: list[dict]) -> Path:
    """Write records as an image folder: each PIL image value becomes a PNG, named in metadata.jsonl under
    "file_name" (column "image") or "<column>_file_name" (any other column); other values are copied.
    The folder is written beside its destination and renamed into place (never half written)."""
    from customize.utils import atomic_dir

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        lines = []
        for i, rec in enumerate(records):
            meta = {}
            for key, value in rec.items():
                if isinstance(value, Image.Image):
                    name = f"{i:05d}.png" if key == "image" else f"{i:05d}_{key}.png"
                    value.save(tmp / name, format="PNG")
                    meta["file_name" if key == "image" else f"{key}_file_name"] = name
                else:
                    meta[key] = value
            lines.append(json.dumps(meta, sort_keys=True))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def export(name: str, folder: str | os.PathLike, n: int, seed: int = 0, split: str | None = None) -> Path:
    """Export a world data set (see DATASETS) as an image folder that `load_dataset("imagefolder")` reads."""
    return write_imagefolder(folder, rows(name, n, seed, split))


def to_dataset(name: str, n: int, seed: int = 0, split: str | None = None):
    """The same records as a `datasets.Dataset` with Image columns."""
    import datasets

    recs = rows(name, n, seed, split)
    columns = {k: [r[k] for r in recs] for k in recs[0]}
    features = datasets.Features({
        k: datasets.Image() if isinstance(v[0], Image.Image) else datasets.Dataset.from_dict({k: v[:1]}).features[k]
        for k, v in columns.items()
    })
    return datasets.Dataset.from_dict(columns, features=features)
