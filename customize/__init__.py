"""customize: personalise and edit pretrained text-to-image diffusion models (SD 1.x/2.x, SDXL).

The Python API re-exports the few entry points most users need; importing `customize` stays cheap because
they are resolved lazily (torch, diffusers and transformers load only when one is used).

    import customize
    pipe = customize.load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
    customize.load_lora_files(pipe, [("my_lora.safetensors", 0.8)])
    merged, report = customize.merge_loras(["subject.safetensors", "style.safetensors"], method="svd", rank=16)
    zipped = customize.ziplora(pipe, "subject.safetensors", "style.safetensors", "a sks dog", "a cat in zwx style")
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_pipeline": "customize.models",
    "tiny_pipeline": "customize.models",
    "detect_family": "customize.models",
    "TrainConfig": "customize.training",
    "train": "customize.training",
    "parse_config": "customize.training",
    "read_lora": "customize.formats.lora_read",
    "save_lora": "customize.formats.lora_write",
    "convert_lora": "customize.formats.lora_write",
    "merge_loras": "customize.formats.lora_merge",
    "ziplora": "customize.methods.ziplora",
    "inspect_lora": "customize.formats.lora_read",
    "check_lora_compatible": "customize.formats.lora_load",
    "load_lora_files": "customize.formats.lora_load",
    "read_embedding": "customize.formats.embeddings",
    "save_embedding": "customize.formats.embeddings",
    "load_embedding_into": "customize.formats.embeddings",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'customize' has no attribute {name!r}")


def __dir__():
    return __all__
