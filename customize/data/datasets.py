"""The training datasets: captioned images from a folder or a datasets-library data set, and the DreamBooth
pairing of instance and class examples.

An example is a dict:
    pixel_values   (3, H, W) float32 in [-1, 1]
    prompt         str (the image's caption, else the dataset's default prompt)
    original_size, crop_top_left, target_size   (2,) int64 each, SDXL micro-conditioning of the applied transform
    <name>_pixel_values   (3, H, W) float32 in [-1, 1] for each paired image (`paired_images`, e.g.
                   conditioning_image -> conditioning_pixel_values), with the very same resize, crop and flip
`collate_examples` stacks them; for pairs it puts the class examples after the instance ones and records how
many there are in `num_prior` (DreamBooth eq. 2 splits the loss there).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from customize.data.captions import METADATA_FILE, images_and_captions, metadata_rows, read_paired
from customize.data.images import ImageError, load_image, open_paired_image, paired_image, to_rgb
from customize.data.transforms import ImageTransform

logger = logging.getLogger(__name__)


class ColumnError(ValueError, KeyError):
    """A column a datasets-library set lacks: a ValueError (one line from the recipes) that is also the KeyError
    this has always raised."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def paired_key(name: str) -> str:
    """The example key of a paired image column: conditioning_image -> conditioning_pixel_values (the name
    diffusers' ControlNet script uses), input_image -> input_pixel_values."""
    return f"{name.removesuffix('_image')}_pixel_values"


class ImageCaptionDataset(Dataset):
    """Images (files, or rows of a datasets-library data set) with captions, through one `ImageTransform`."""

    def __init__(self, transform: ImageTransform, default_prompt: str | None = None):
        self.transform = transform
        self.default_prompt = default_prompt
        self._paths: list[Path] | None = None
        self._hf = None
        self._image_column = self._caption_column = None
        self._captions: list[str | None] = []
        # paired images: {name: column} of a datasets-library set, or one {name: path} per image of a folder
        self._paired_columns: dict[str, str] = {}
        self._paired_paths: list[dict[str, Path]] | None = None

    # -- constructors ------------------------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, resolution, *, center_crop: bool = False,
                    random_flip: bool = False, prompt: str | None = None, caption_column: str | None = None,
                    use_captions: bool = True, interpolation: str = "bilinear",
                    warn_uncaptioned: bool = False, paired_images: Sequence[str] | dict[str, str] = ()
                    ) -> ImageCaptionDataset:
        """Every image of `folder` (or those its metadata.jsonl lists). Captions come from metadata.jsonl or .txt
        sidecars when `use_captions`; an image without one gets `prompt` (and is an error if there is none).
        `warn_uncaptioned` (the user asked for captions): one warning, naming the folder, when images have none.
        `paired_images` (e.g. ["conditioning_image"]): each image's partner named by metadata.jsonl's
        `<name>_file_name` column, every line must have it (`read_paired`); {name: column prefix} reads a
        name from another column."""
        ds = cls(ImageTransform(resolution, center_crop, random_flip, interpolation), prompt)
        images, captions = images_and_captions(folder, caption_column)
        if paired_images:
            pairs = read_paired(folder, paired_images if isinstance(paired_images, dict) else tuple(paired_images))
            ds._paired_paths = [pairs[p] for p in images]
        ds._paths = images
        ds._captions = captions if use_captions else [None] * len(images)
        ds._check_prompts([str(p) for p in images])
        missing = sum(c is None for c in ds._captions)
        if use_captions and warn_uncaptioned and missing and prompt is not None:
            shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
            instead = f"the prompt {shown!r}" if prompt else "the prompt templates"
            which = (f"no image in {folder} has a" if missing == len(images)
                     else f"{missing} of the {len(images)} images in {folder} have no")
            logger.warning("--use_captions: %s caption (metadata.jsonl, or a .txt / .caption file beside the "
                           "image); they are trained with %s", which, instead)
        return ds

    @classmethod
    def from_hf(cls, name_or_path: str, resolution, *, image_column: str = "image",
                caption_column: str | None = "text", split: str = "train", center_crop: bool = False,
                random_flip: bool = False, prompt: str | None = None, interpolation: str = "bilinear",
                cache_dir: str | None = None, paired_columns: dict[str, str] | None = None) -> ImageCaptionDataset:
        """A datasets-library data set: a folder written by `save_to_disk`, else anything `load_dataset`
        takes (a hub name, a local imagefolder, a data-files folder). `paired_columns` ({name: column}, e.g.
        {"conditioning_image": "conditioning_image"}) adds paired images read from those columns."""
        hf = load_hf_dataset(name_or_path, split=split, cache_dir=cache_dir)
        columns = list(hf.column_names)
        paired_columns = dict(paired_columns or {})
        flags = {image_column: "--image_column", caption_column: "--caption_column"}
        flags.update({c: f"--{n}_column" for n, c in paired_columns.items()})
        wanted = [c for c in (image_column, caption_column, *paired_columns.values()) if c is not None]
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise ColumnError(f"{name_or_path}: no column {missing[0]!r}; its columns are {columns} "
                             f"(use {flags.get(missing[0], '--image_column / --caption_column')})")
        if len(hf) == 0:
            raise ImageError(f"{name_or_path} (split {split!r}) has no rows")
        ds = cls(ImageTransform(resolution, center_crop, random_flip, interpolation), prompt)
        ds._hf, ds._image_column, ds._caption_column = hf, image_column, caption_column
        ds._paired_columns = paired_columns
        ds._captions = list(hf[caption_column]) if caption_column else [None] * len(hf)
        ds._check_prompts([f"{name_or_path}[{i}]" for i in range(len(hf))])
        return ds

    def _check_prompts(self, names: Sequence[str]) -> None:
        if self.default_prompt is None:
            for name, caption in zip(names, self._captions):
                if caption is None:
                    raise ValueError(f"{name} has no caption: add it to metadata.jsonl or a .txt file beside the "
                                     "image, or give a prompt for every image (e.g. --instance_prompt)")

    # -- access ------------------------------------------------------------------------------------------------

    @property
    def random_flip(self) -> bool:
        return self.transform.random_flip

    def __len__(self) -> int:
        return len(self._captions)

    @property
    def paired_names(self) -> tuple[str, ...]:
        """The paired image columns every example carries (e.g. ("conditioning_image",))."""
        if self._paired_paths is not None:
            return tuple(self._paired_paths[0]) if self._paired_paths else ()
        return tuple(self._paired_columns)

    def _cell(self, i: int, column: str):
        value = self._hf[i][column]
        if isinstance(value, dict) and value.get("path") and not value.get("bytes"):
            return value["path"]
        if value is None:
            raise ImageError(f"row {i}, column {column!r}: no image (null)")
        if not isinstance(value, (str, os.PathLike, Image.Image)):
            raise ImageError(f"row {i}, column {column!r}: expected an image or a path, got {type(value).__name__}")
        return value

    def image(self, i: int) -> Image.Image:
        """The i-th image as RGB with its EXIF orientation applied."""
        if self._paths is not None:
            return load_image(self._paths[i])
        value = self._cell(i, self._image_column)
        if isinstance(value, (str, os.PathLike)):
            return load_image(value)
        return to_rgb(ImageOps.exif_transpose(value))

    def paired(self, i: int, name: str) -> Image.Image:
        """The i-th example's paired image `name` as RGB (`customize.data.images.paired_image`: no transparency)."""
        if self._paired_paths is not None:
            return open_paired_image(self._paired_paths[i][name], name.replace("_", " "))
        column = self._paired_columns[name]
        value = self._cell(i, column)
        if isinstance(value, (str, os.PathLike)):
            return open_paired_image(value, f"row {i}, column {column!r}:")
        return paired_image(value, f"row {i}, column {column!r}")

    def prompt(self, i: int) -> str:
        caption = self._captions[i]
        return self.default_prompt if caption is None else caption

    def get(self, i: int, flip: bool | None = None) -> dict:
        """The i-th example; `flip` forces the flip decision (None: random when random_flip is on)."""
        image = self.image(i)
        paired = {}
        for name in self.paired_names:
            other = self.paired(i, name)
            if other.size != image.size:
                where = str(self._paths[i]) if self._paths is not None else f"row {i}"
                src = self._paired_paths[i][name] if self._paired_paths is not None else self._paired_columns[name]
                raise ImageError(f"{where}: its {name.replace('_', ' ')} ({src}) is {other.size[0]}x{other.size[1]} "
                                 f"but the image is {image.size[0]}x{image.size[1]}; they must have the same size "
                                 "(both get the same crop and flip)")
            paired[paired_key(name)] = other
        example = self.transform(image, flip=flip, paired=paired)
        example["prompt"] = self.prompt(i)
        return example

    def __getitem__(self, i: int) -> dict:
        return self.get(i)


def load_hf_dataset(name_or_path: str, split: str = "train", cache_dir: str | None = None):
    import datasets

    path = Path(name_or_path)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise KeyError(f"{name_or_path} has splits {list(loaded)}, not {split!r}; pass --dataset_split")
            loaded = loaded[split]
        return loaded
    if path.is_dir() and (path / METADATA_FILE).is_file():
        metadata_rows(path)  # datasets' imagefolder opens what it names: the same rule as our own folders
    return datasets.load_dataset(name_or_path, split=split, cache_dir=cache_dir)


class PairedDataset(Dataset):
    """DreamBooth pairing: item i = {"instance": instance[i % n_inst], "class": class[i % n_class]}.

    The length is the longer of the two, so each epoch shows every class image once and cycles the (usually
    few) instance images, as in the DreamBooth paper's training script."""

    def __init__(self, instance: Dataset, class_data: Dataset | None = None):
        if len(instance) == 0:
            raise ValueError("the instance dataset is empty")
        if class_data is not None and len(class_data) == 0:
            raise ValueError("the class dataset is empty: generate class images first or turn prior preservation off")
        self.instance, self.class_data = instance, class_data

    def __len__(self) -> int:
        return max(len(self.instance), len(self.class_data) if self.class_data is not None else 0)

    def __getitem__(self, i: int) -> dict:
        item = {"instance": self.instance[i % len(self.instance)]}
        if self.class_data is not None:
            item["class"] = self.class_data[i % len(self.class_data)]
        return item


def dreambooth_dataset(instance_data_dir, instance_prompt: str, resolution, *, class_data_dir=None,
                       class_prompt: str | None = None, center_crop: bool = False, random_flip: bool = False,
                       use_captions: bool = False, caption_column: str | None = None) -> PairedDataset:
    """Instance images (prompt: `instance_prompt`, or their own captions with `use_captions`) paired with class
    images when `class_data_dir` is given (prompt: `class_prompt`, or with `use_captions` the caption a class image
    has in the folder's metadata.jsonl or .txt sidecar: kohya's captioned regularization images)."""
    instance = ImageCaptionDataset.from_folder(
        instance_data_dir, resolution, center_crop=center_crop, random_flip=random_flip, prompt=instance_prompt,
        caption_column=caption_column, use_captions=use_captions, warn_uncaptioned=True,
    )
    class_data = None
    if class_data_dir is not None:
        if class_prompt is None:
            raise ValueError("class images need a class prompt (e.g. --class_prompt 'a photo of dog')")
        class_data = ImageCaptionDataset.from_folder(
            class_data_dir, resolution, center_crop=center_crop, random_flip=random_flip, prompt=class_prompt,
            use_captions=use_captions,
        )
    return PairedDataset(instance, class_data)


def _stack(examples: list[dict]) -> dict:
    batch = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if torch.is_tensor(values[0]):
            batch[key] = torch.stack(values)  # (B, ...)
        elif isinstance(values[0], (int, float, bool)):
            batch[key] = torch.tensor(values)  # (B,)
        else:
            batch[key] = values
    return batch


def collate_examples(examples: list[dict]) -> dict:
    """Stack examples into a batch. Pairs from `PairedDataset` become cat(instance, class) along the batch, with
    `num_prior` = the number of class rows at the end (0 without class data)."""
    if "instance" in examples[0]:
        prior = [e["class"] for e in examples if "class" in e]
        batch = _stack([e["instance"] for e in examples] + prior)
        batch["num_prior"] = len(prior)
        return batch
    batch = _stack(examples)
    batch["num_prior"] = 0
    return batch
