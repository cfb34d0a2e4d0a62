"""Training data: captioned image folders and datasets-library sets, DreamBooth instance/class pairs,
transforms with SDXL size/crop conditioning, feature caches, and the seeded data stream of the engine."""

from customize.data.cache import CachedDataset, cache_features
from customize.data.captions import CaptionError, images_and_captions, read_metadata
from customize.data.datasets import (
    ImageCaptionDataset,
    PairedDataset,
    collate_examples,
    dreambooth_dataset,
    load_hf_dataset,
)
from customize.data.images import ImageError, list_images, load_image
from customize.data.transforms import ImageTransform, pil_to_tensor, tensor_to_pil

__all__ = [
    "CachedDataset", "CaptionError", "ImageCaptionDataset", "ImageError", "ImageTransform", "PairedDataset",
    "cache_features", "collate_examples", "dreambooth_dataset", "images_and_captions", "list_images",
    "load_hf_dataset", "load_image", "pil_to_tensor", "read_metadata", "tensor_to_pil",
]
