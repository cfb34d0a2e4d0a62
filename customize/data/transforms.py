"""Image -> training tensor, and the SDXL size/crop conditioning of the transform that was really applied.

Order (that of the diffusers training scripts): resize so the shorter side equals the resolution, crop
(center or random), optional horizontal flip, then [0, 255] -> [-1, 1].
SDXL micro-conditioning (Podell et al. 2023, sec. 2.2) is reported per example in (h, w) order:
    original_size   = size of the image before resizing
    crop_top_left   = (top, left) of the crop, in the resized image; after a flip, in the flipped image
                      (left' = resized_width - left - target_width), as diffusers' SDXL script computes it
    target_size     = size of the crop
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
              "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


def as_hw(resolution: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    h, w = resolution
    return int(h), int(w)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1] (x / 127.5 - 1, the VAE's input range)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()  # (3, H, W)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """Inverse of `pil_to_tensor` (rounded to 8 bits)."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)  # (3, H, W)
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), mode="RGB")


@dataclass
class ImageTransform:
    """Resize (shorter side), crop, flip, to tensor. `resolution` is an int (square) or (h, w).

    Randomness (crop position, flip) comes from python's `random` module, so it is reproducible under the
    engine's per-example seeding. `flip` in `__call__` forces the flip decision (used by feature caches to
    make both versions of an example with the same crop)."""

    resolution: int | tuple[int, int]
    center_crop: bool = False
    random_flip: bool = False
    interpolation: str = "bilinear"

    def __post_init__(self):
        th, tw = as_hw(self.resolution)
        if th < 1 or tw < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        if self.interpolation not in RESAMPLING:
            raise ValueError(f"interpolation must be one of {sorted(RESAMPLING)}, got {self.interpolation!r}")

    def __call__(self, img: Image.Image, flip: bool | None = None, paired: dict[str, Image.Image] | None = None) -> dict:
        """The transformed image and its SDXL conditioning; `paired` ({output key: image of the same size}) gets
        the very same resize, crop and flip (a ControlNet's conditioning image, InstructPix2Pix's input image),
        each as a (3, th, tw) tensor in [-1, 1] under its key."""
        th, tw = as_hw(self.resolution)
        w, h = img.size
        original_size = (h, w)
        for key, other in (paired or {}).items():
            if other.size != img.size:
                raise ValueError(f"{key}: the paired image is {other.size[0]}x{other.size[1]} but its image is "
                                 f"{w}x{h}; both must have the same size (they get the same crop)")
        # Shorter side -> target (both sides covered for a non-square target); the long side keeps the aspect.
        scale = max(th / h, tw / w)
        new_w, new_h = max(tw, int(round(w * scale))), max(th, int(round(h * scale)))
        if self.center_crop:
            top, left = int(round((new_h - th) / 2.0)), int(round((new_w - tw) / 2.0))
        else:
            top, left = random.randint(0, new_h - th), random.randint(0, new_w - tw)
        if flip is None:
            flip = self.random_flip and random.random() < 0.5

        def geometry(im: Image.Image) -> Image.Image:
            if (new_w, new_h) != (w, h):
                im = im.resize((new_w, new_h), RESAMPLING[self.interpolation])
            im = im.crop((left, top, left + tw, top + th))
            return ImageOps.mirror(im) if flip else im

        out = {
            "pixel_values": pil_to_tensor(geometry(img)),  # (3, th, tw)
            "original_size": torch.tensor(original_size),  # (2,) (h, w)
            # after a flip, the crop's left edge measured in the flipped image
            "crop_top_left": torch.tensor((top, new_w - left - tw if flip else left)),  # (2,) (top, left)
            "target_size": torch.tensor((th, tw)),  # (2,) (h, w)
        }
        for key, other in (paired or {}).items():
            out[key] = pil_to_tensor(geometry(other))  # (3, th, tw)
        return out
