"""What the LoRA and embedding readers share: the error type, the model families and how to name them, and
reading tensor files with errors that say what to do.

Families are told apart by the width of the text features the UNet attends to (docs/formats.md, 'Base families'):
SD 1.x conditions on CLIP ViT-L (768 wide), SD 2.x on OpenCLIP ViT-H (1024), SDXL on CLIP ViT-L and
OpenCLIP ViT-bigG concatenated (768 + 1280 = 2048).
"""

from __future__ import annotations

import os
import re
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


def flat_tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """{dotted name: tensor} of every tensor in a file's contents (nested dicts and lists walked)."""
    if isinstance(obj, torch.Tensor):
        return {prefix or "(tensor)": obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = {}
    for k, v in items:
        out.update(flat_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def nonfinite_counts(obj) -> dict[str, tuple[int, int]]:
    """{tensor name: (NaN values, infinite values)} of the tensors holding any."""
    out = {}
    for name, t in flat_tensors(obj).items():
        if t.is_floating_point() or t.is_complex():
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            if nan or inf:
                out[name] = (nan, inf)
    return out


def describe_nonfinite(counts: dict[str, tuple[int, int]]) -> str:
    """'unet.x.lora.up.weight (3 NaN, 1 infinite), ...' (the first three names, then how many more)."""
    parts = [f"{name} ({', '.join(f'{n} {what}' for n, what in ((nan, 'NaN'), (inf, 'infinite')) if n)})"
             for name, (nan, inf) in list(counts.items())[:3]]
    more = f" and {len(counts) - 3} more tensors" if len(counts) > 3 else ""
    return ", ".join(parts) + more


def read_tensor_file(path: str | os.PathLike, finite: bool = True) -> tuple[object, dict[str, str]]:
    """(contents, metadata) of a .safetensors file (a dict of tensors) or a pickled torch file (usually a dict).

    Pickles are read with `torch.load(weights_only=True)` only: tensors, dicts, lists, strings and numbers
    load, anything else (a file that would run code while loading) is refused. A tensor holding NaN or infinite
    values is refused, naming it (it would turn every image black), unless `finite=False` (inspection)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    obj, metadata = _read_tensor_file(path)
    if finite and (bad := nonfinite_counts(obj)):
        raise FormatError(
            f"{path}: tensor {describe_nonfinite(bad)} holds values that are not finite numbers; weights like "
            "these give black or noise images (the training run that wrote them diverged?): use another file, "
            "or train again with a lower learning rate"
        )
    return obj, metadata


def _read_tensor_file(path: Path) -> tuple[object, dict[str, str]]:
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
            # torch's message ends by suggesting weights_only=False: the one thing not to do with a file from
            # someone else, so only the name of what it refused is kept
            refused = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(e), flags=re.IGNORECASE)
            raise FormatError(
                f"{path}: cannot be read safely: besides tensors it holds pickled Python objects"
                f"{f' ({refused.group(1)})' if refused else ''}, and loading it would run code from the file. "
                "Convert it to .safetensors on a machine you trust with the tool that made it, or ask its author "
                "for a .safetensors version"
            ) from None
        except Exception as e:
            raise FormatError(f"{path}: not a readable torch file ({type(e).__name__}: {e}); export it again") from e
        return obj, {}
    raise FormatError(f"{path}: unknown file type {path.suffix!r}; expected .safetensors or one of {PICKLE_SUFFIXES}")
