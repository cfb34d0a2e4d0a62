"""Reading images from disk with errors a person can act on.

Every dataset in the toolkit reads pixels through `load_image`, so a corrupt file, an unreadable mode or a
too-small picture is reported once, the same way, naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file and says what to do."""


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Sorted image files in `folder`. Raises with a clear message if the folder is missing or holds none."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder of images")
    it = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise ImageError(
            f"image folder {folder} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def to_rgb(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited on `background`; 16/32-bit grey is rescaled from
    its real range (PIL's plain convert would clip 16-bit values to white)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if img.mode == "F" and arr.max() <= 1.0:
            hi = 1.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def open_image(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """The decoded image of a file as stored (mode, EXIF orientation untouched). Raises FileNotFoundError for a
    missing file and ImageError naming the file for anything PIL cannot decode (truncated, not an image, empty)
    or that declares far more pixels than is safe to open."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()  # decoded now: the pixels stay usable once the file is closed
        return im
    except Image.DecompressionBombError as e:
        # PIL's guard against a file that declares far more pixels than it holds (its header is read first)
        raise ImageError(f"{path}: too large to open safely ({e}); downscale it (training uses a few hundred "
                         "pixels a side) or remove it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot be read as an image ({e}); remove or replace the file") from None


def load_image(path: str | os.PathLike, mode: str = "RGB", min_size: int = 1) -> Image.Image:
    """Open, apply EXIF orientation, convert to `mode` ("RGB" or "L"), check the size.

    Raises ImageError naming the file for anything PIL cannot decode (truncated, not an image, empty)."""
    path = Path(path)
    img = to_rgb(ImageOps.exif_transpose(open_image(path)))
    if mode == "L":
        img = img.convert("L")
    elif mode != "RGB":
        raise ValueError(f"load_image mode must be 'RGB' or 'L', got {mode!r}")
    if min(img.size) < min_size:
        raise ImageError(
            f"{path}: image is {img.size[0]}x{img.size[1]} pixels, smaller than the {min_size} px needed; "
            "use a larger image or lower the resolution"
        )
    return img


ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def paired_image(img: Image.Image, where: str) -> Image.Image:
    """A paired image (a ControlNet's conditioning image, an edit's input image) as 8-bit RGB, with its EXIF
    orientation applied. Refused, naming `where`: a transparent image (flattening it onto white, as `to_rgb` does
    for a training image, would change what a mask or an edge map says: save it without alpha)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        raise ImageError(f"{where}: is a {img.mode} image with transparency; a paired (conditioning) image is read "
                         "as RGB and flattening its alpha would change it: save it as RGB or greyscale")
    return to_rgb(img)


def open_paired_image(path: str | os.PathLike, where: str | None = None) -> Image.Image:
    """`paired_image` of a file, with the errors of `load_image` for an unreadable one."""
    path = Path(path)
    im = open_image(path, where or "paired image")
    return paired_image(im, f"{where + ' ' if where else ''}{path}")


def save_image_atomic(img: Image.Image, path: str | os.PathLike, **kwargs) -> Path:
    """Write an image through a temporary file and a rename, so a killed run never leaves half a PNG."""
    from customize.utils import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fmt = (path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG")
        img.save(tmp, format=fmt, **kwargs)
    return path
