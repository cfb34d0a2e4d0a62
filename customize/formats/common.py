"""What the LoRA and embedding readers share: the error type, the model families and how to name them, and
reading tensor files with errors that say what to do.

Families are told apart by the width of the text features the UNet attends to (docs/formats.md, 'Base families'):
SD 1.x conditions on CLIP ViT-L (768 wide), SD 2.x on OpenCLIP ViT-H (1024), SDXL on CLIP ViT-L and
OpenCLIP ViT-bigG concatenated (768 + 1280 = 2048).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CLIP_L_WIDTH = 768  # SD 1.x text encoder; SDXL text_encoder
OPENCLIP_H_WIDTH = 1024  # SD 2.x text encoder
OPENCLIP_BIGG_WIDTH = 1280  # SDXL text_encoder_2

CROSS_ATTENTION_FAMILY = {
    CLIP_L_WIDTH: "sd1",
    OPENCLIP_H_WIDTH: "sd2",
    CLIP_L_WIDTH + OPENCLIP_BIGG_WIDTH: "sdxl",
}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class FormatError(ValueError):
    """A weights file that cannot be used as asked; the message names the file and says what to do."""


def describe_family(family: str | None, cross_attention_dim: int | None = None) -> str:
    """'SDXL (cross-attention width 2048)', or 'an unknown base (...)' when the widths match no known family."""
    name = FAMILY_NAMES.get(family, "an unknown base") if family else "an unknown base"
    return f"{name} (cross-attention width {cross_attention_dim})" if cross_attention_dim else name


def _safetensors_error(path: Path, e: Exception) -> FormatError:
    return FormatError(
        f"{path}: not a readable .safetensors file ({type(e).__name__}: {e}); the file is truncated or corrupt: "
        "download or export it again"
    )


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[list[int], str]], dict[str, str]]:
    """{name: (shape, dtype)} and metadata of a .safetensors file, without reading the tensors."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            shapes = {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
            return shapes, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for truncated / garbled headers
        raise _safetensors_error(path, e) from e


def read_tensor_file(path: str | os.PathLike) -> tuple[object, dict[str, str]]:
    """(contents, metadata) of a .safetensors file (a dict of tensors) or a pickled torch file (usually a dict).

    Pickles are read with `torch.load(weights_only=True)` only: tensors, dicts, lists, strings and numbers
    load, anything else (a file that would run code while loading) is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, metadata
        except Exception as e:  # safetensors raises its own error types for truncated / garbled files
            raise _safetensors_error(path, e) from e
    if path.suffix.lower() in PICKLE_SUFFIXES:
        import pickle

        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise FormatError(
                f"{path}: refusing to load: the file holds pickled Python objects beyond tensors and plain "
                f"containers ({e}). Loading it would run code from the file. Convert it to .safetensors with "
                "the tool that made it, or ask its author for a safetensors version."
            ) from e
        except Exception as e:
            raise FormatError(f"{path}: not a readable torch file ({type(e).__name__}: {e}); export it again") from e
        return obj, {}
    raise FormatError(f"{path}: unknown file type {path.suffix!r}; expected .safetensors or one of {PICKLE_SUFFIXES}")
