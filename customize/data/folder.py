"""Datasets for unconditional and class-conditional pixel-space diffusion (the from-scratch DDPM core).

An example is a dict:
    pixel_values   (C, H, W) float32 in [-1, 1]   (C = 1 for grayscale, 3 for RGB)
    class_labels   int64 scalar (the class index; 0 for unconditional data)

`ImageFolderDataset` reads a folder of images (unconditional), or a folder of class sub-folders whose names
are the classes. Every file is read through `customize.data.images.load_image` (EXIF, any mode -> 8-bit,
errors that name the file) and resized / cropped by the shared `ImageTransform` once, at construction, so a
corrupt file stops the run before training starts and epochs cost no decoding. The pictures are held as uint8
(N, C, H, W): a 10,000-image set at 64 px RGB takes 120 MB.

`DigitsDataset` is scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; no download).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from customize.data.images import IMAGE_EXTENSIONS, ImageError, list_images, load_image
from customize.data.transforms import ImageTransform

# pil_to_tensor maps 8-bit values v to v / 127.5 - 1; storing v keeps examples exact and four times smaller.
_HALF_8BIT = 127.5
# sklearn's digits are 4x4-block counts of an original 32x32 bitmap: integer values 0..16.
DIGITS_MAX_VALUE = 16.0
DIGITS_SIZE = 8


class ImageFolderDataset(Dataset):
    """Images of `root` as (C, resolution, resolution) tensors, with class labels from sub-folder names.

    class_conditional=False: every image under `root` (sub-folders included), label 0.
    class_conditional=True: `root/<class name>/*.png`; classes are the sorted sub-folder names
    (`self.classes`), each must hold images, and loose images beside the class folders are an error."""

    def __init__(self, root: str | os.PathLike, resolution: int, channels: int = 3, class_conditional: bool = False,
                 random_flip: bool = False, center_crop: bool = True, interpolation: str = "bicubic"):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        root = Path(root)
        self.channels, self.random_flip = channels, random_flip
        files, labels = self._scan(root, class_conditional)
        transform = ImageTransform(resolution, center_crop=center_crop, interpolation=interpolation)
        mode = "L" if channels == 1 else "RGB"
        images = []
        for path in files:
            # load_image names the file in every error; the transform then sees a clean 8-bit image.
            x = transform(load_image(path, mode=mode).convert("RGB"))["pixel_values"][:channels]  # (C, H, W)
            images.append(((x + 1) * _HALF_8BIT).round().to(torch.uint8))
        self.files = files
        self.images = torch.stack(images)  # (N, C, H, W) uint8
        self.labels = torch.tensor(labels, dtype=torch.int64)  # (N,)

    def _scan(self, root: Path, class_conditional: bool) -> tuple[list[Path], list[int]]:
        if not class_conditional:
            self.classes = []
            files = list_images(root, recursive=True)  # raises, naming the folder, when it holds no image
            return files, [0] * len(files)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise ImageError(f"{root} has no class sub-folders; class-conditional training reads "
                             f"{root}/<class name>/<images>, or turn class conditioning off")
        loose_images = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
                              and p.suffix.lower() in IMAGE_EXTENSIONS)
        if loose_images:
            raise ImageError(f"{loose_images[0]} lies beside the class folders of {root}; move it into its "
                             "class folder (class-conditional data has no unlabelled images)")
        self.classes = [p.name for p in class_dirs]
        files, labels = [], []
        for k, folder in enumerate(class_dirs):
            found = list_images(folder, recursive=True)  # raises, naming the folder, when it is empty
            files += found
            labels += [k] * len(found)
        return files, labels

    @property
    def num_classes(self) -> int:
        return max(len(self.classes), 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        x = self.images[i].float() / _HALF_8BIT - 1.0  # (C, H, W) in [-1, 1]
        if self.random_flip and random.random() < 0.5:  # python RNG: seeded per example by the engine
            x = x.flip(-1)
        return {"pixel_values": x, "class_labels": self.labels[i]}


def load_digits_array() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) float64 in [0, 16] and labels (1797,) int."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits data set comes with scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    return digits.images, digits.target


def digits_to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Digits values [0, 16] -> [-1, 1] float32."""
    return torch.as_tensor(np.asarray(images), dtype=torch.float32) / DIGITS_MAX_VALUE * 2 - 1


def unit_to_digits(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `digits_to_unit`, clipped to the data set's range [0, 16]."""
    return (x.float().clamp(-1, 1) + 1) / 2 * DIGITS_MAX_VALUE


class DigitsDataset(Dataset):
    """The 8x8 digits as (1, resolution, resolution) tensors in [-1, 1], with their class (0-9).

    resolution 8 keeps them as they are; a larger one pads the border with background (-1), centring the digit
    (for UNets with more downsampling levels). `indices` selects a subset (e.g. a train split)."""

    def __init__(self, resolution: int = DIGITS_SIZE, indices: list[int] | np.ndarray | None = None):
        if resolution < DIGITS_SIZE:
            raise ValueError(f"digits are {DIGITS_SIZE}x{DIGITS_SIZE}: resolution must be >= {DIGITS_SIZE}, got {resolution}")
        images, labels = load_digits_array()
        if indices is not None:
            images, labels = images[np.asarray(indices)], labels[np.asarray(indices)]
        x = digits_to_unit(images)[:, None]  # (N, 1, 8, 8)
        pad = resolution - DIGITS_SIZE
        self.images = torch.nn.functional.pad(x, (pad // 2, pad - pad // 2) * 2, value=-1.0)  # (N, 1, R, R)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.classes = [str(d) for d in range(10)]
        self.channels = 1

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i], "class_labels": self.labels[i]}
