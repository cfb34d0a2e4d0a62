"""Textual-inversion embedding files (Gal et al.; docs/formats.md, 'Textual-inversion embeddings'): read, write,
and load into a pipeline.

  diffusers   learned_embeds.safetensors {token: (n, d)}, plus learned_embeds_2.safetensors for SDXL's second
              text encoder; learned_embeds.bin holds the same dict as a pickle
  SDXL file   one .safetensors {"clip_l": (n, 768), "clip_g": (n, 1280)} (A1111 / ComfyUI); no token inside,
              the file name is the token (we also write it into the header metadata)
  A1111       .pt {"string_to_param": {"*": (n, 768)}, "name": ..., "string_to_token": ..., "step": ...}, or
              .safetensors {"emb_params": (n, 768)}

Pickles are read with torch.load(weights_only=True) only. A concept of n vectors is the placeholder `<tok>`
followed by `<tok>_1` ... `<tok>_{n-1}`: diffusers' naming, which its pipelines expand inside prompts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from customize.formats.common import (
    CLIP_L_WIDTH,
    OPENCLIP_H_WIDTH,
    FormatError,
    describe_family,
    read_tensor_file,
)

ENCODERS = ("text_encoder", "text_encoder_2")
# diffusers.loaders.textual_inversion.TEXT_INVERSION_NAME_SAFE / TEXT_INVERSION_NAME (a test keeps them equal)
EMBEDDING_WEIGHT_NAME = "learned_embeds.safetensors"
EMBEDDING_WEIGHT_NAME_BIN = "learned_embeds.bin"
EMBEDDING_WEIGHT_NAME_2 = "learned_embeds_2.safetensors"  # diffusers' textual_inversion_sdxl.py
SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
A1111_SAFETENSORS_KEY = "emb_params"
TOKEN_METADATA_KEY = "token"
LAYOUTS = ("diffusers", "single")


@dataclass
class Embedding:
    token: str | None  # None when the file does not name one (a bare tensor)
    vectors: dict[str, torch.Tensor]  # encoder name -> (n_vectors, width)
    format: str  # "diffusers" | "sdxl" | "a1111"

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def family(self) -> str | None:
        """SDXL if it has a vector for the second encoder; else by the width of the first (768 / 1024)."""
        if "text_encoder_2" in self.vectors:
            return "sdxl"
        width = self.vectors["text_encoder"].shape[1]
        return {CLIP_L_WIDTH: "sd1", OPENCLIP_H_WIDTH: "sd2"}.get(width)

    def summary(self, path: str = "") -> str:
        shapes = ", ".join(f"{enc}: {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" for enc, v in self.vectors.items())
        return "\n".join([f"file:        {path}"] * bool(path) + [
            f"kind:        textual-inversion embedding ({self.format} format)",
            f"token:       {self.token or '(none in the file: pass one)'}",
            f"family:      {describe_family(self.family)}",
            f"vectors:     {self.num_vectors} ({shapes})",
        ])


def placeholder_tokens(token: str, n: int) -> list[str]:
    """`<tok>`, `<tok>_1`, ..., `<tok>_{n-1}`."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def _as_matrix(t, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.ndim not in (1, 2):
        raise FormatError(f"{where}: expected embedding vectors of shape (n, width), got {getattr(t, 'shape', type(t).__name__)}")
    return t.reshape(1, -1) if t.ndim == 1 else t


def _from_contents(obj, stem: str, metadata: dict, where: str) -> Embedding:
    """Tell the layout of a loaded file apart and return its vectors per encoder."""
    if isinstance(obj, torch.Tensor):
        return Embedding(None, {"text_encoder": _as_matrix(obj, where)}, "diffusers")
    if not isinstance(obj, dict) or not obj:
        raise FormatError(f"{where}: not an embedding file (empty or not a dict of tensors)")
    if set(obj) <= set(SDXL_KEYS) and "clip_l" in obj:
        vectors = {SDXL_KEYS[k]: _as_matrix(obj[k], where) for k in SDXL_KEYS if k in obj}
        return Embedding(metadata.get(TOKEN_METADATA_KEY) or stem, vectors, "sdxl")
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise FormatError(f"{where}: A1111 file with {len(params)} entries in string_to_param; expected one ('*')")
        return Embedding(obj.get("name") or stem, {"text_encoder": _as_matrix(next(iter(params.values())), where)}, "a1111")
    if set(obj) == {A1111_SAFETENSORS_KEY}:
        return Embedding(metadata.get(TOKEN_METADATA_KEY) or stem, {"text_encoder": _as_matrix(obj[A1111_SAFETENSORS_KEY], where)}, "a1111")
    if len(obj) == 1:
        token, t = next(iter(obj.items()))
        return Embedding(token, {"text_encoder": _as_matrix(t, where)}, "diffusers")
    raise FormatError(
        f"{where}: unknown embedding layout with keys {sorted(obj)[:6]}; expected {{token: tensor}}, "
        "{'clip_l', 'clip_g'}, A1111's string_to_param or emb_params"
    )


def read_embedding(path: str | os.PathLike, finite: bool = True) -> Embedding:
    """Read a textual-inversion file, or a diffusers output folder (learned_embeds[_2].safetensors). A file with
    NaN or infinite values is refused, naming the tensor, unless `finite=False` (inspection)."""
    path = Path(path)
    if path.is_dir():
        for name in (EMBEDDING_WEIGHT_NAME, EMBEDDING_WEIGHT_NAME_BIN):
            if (path / name).is_file():
                return read_embedding(path / name, finite)
        raise FormatError(f"{path}: no {EMBEDDING_WEIGHT_NAME} or {EMBEDDING_WEIGHT_NAME_BIN} in this folder")
    obj, metadata = read_tensor_file(path, finite=finite)
    emb = _from_contents(obj, path.stem, metadata, str(path))
    if path.name == EMBEDDING_WEIGHT_NAME_2:
        raise FormatError(f"{path}: this is the second-encoder half of an SDXL embedding; read {EMBEDDING_WEIGHT_NAME} beside it")
    second = path.with_name(EMBEDDING_WEIGHT_NAME_2)
    if path.name == EMBEDDING_WEIGHT_NAME and second.is_file():
        obj2, meta2 = read_tensor_file(second, finite=finite)
        other = _from_contents(obj2, second.stem, meta2, str(second))
        if other.token != emb.token:
            raise FormatError(f"{path} names token {emb.token!r} but {second.name} names {other.token!r}")
        emb.vectors["text_encoder_2"] = other.vectors["text_encoder"]
    return emb


def save_embedding(
    path: str | os.PathLike,
    token: str,
    vectors: dict[str, torch.Tensor] | torch.Tensor,
    layout: str = "diffusers",
) -> list[Path]:
    """Write an embedding atomically.

    layout "diffusers": `path` is a folder; writes learned_embeds.safetensors {token: (n, d)} and, when there is
    a second encoder, learned_embeds_2.safetensors. layout "single": `path` is a .safetensors file; SD gets
    {token: (n, d)}, SDXL the common {"clip_l": (n, 768), "clip_g": (n, 1280)} with the token in the metadata."""
    from customize.utils import save_safetensors_atomic

    if isinstance(vectors, torch.Tensor):
        vectors = {"text_encoder": vectors}
    unknown = set(vectors) - set(ENCODERS)
    if unknown or "text_encoder" not in vectors:
        raise ValueError(f"vectors must map {ENCODERS} (text_encoder at least) to (n, width) tensors, got {sorted(vectors)}")
    vectors = {k: _as_matrix(v.detach(), k) for k, v in vectors.items()}
    if len({v.shape[0] for v in vectors.values()}) != 1:
        raise ValueError(f"every encoder needs the same number of vectors, got {({k: v.shape[0] for k, v in vectors.items()})}")
    meta = {TOKEN_METADATA_KEY: token}
    if layout == "diffusers":
        folder = Path(path)
        # A folder may have a dot in its name (outputs/sd1.5-cat); only an existing file or a weights-file
        # suffix means the caller passed a file.
        if folder.is_file() or folder.suffix in (".safetensors", ".bin", ".pt"):
            raise ValueError(f"{folder}: the diffusers layout writes into a folder; pass a folder path")
        out = [save_safetensors_atomic({token: vectors["text_encoder"]}, folder / EMBEDDING_WEIGHT_NAME, meta)]
        if "text_encoder_2" in vectors:
            out.append(save_safetensors_atomic({token: vectors["text_encoder_2"]}, folder / EMBEDDING_WEIGHT_NAME_2, meta))
        return out
    if layout == "single":
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: the single-file layout writes a .safetensors file")
        if "text_encoder_2" in vectors:
            inverse = {v: k for k, v in SDXL_KEYS.items()}
            return [save_safetensors_atomic({inverse[k]: v for k, v in vectors.items()}, path, meta)]
        return [save_safetensors_atomic({token: vectors["text_encoder"]}, path, meta)]
    raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def _in_vocabulary(tokenizer, token: str) -> bool:
    """CLIP's vocabulary holds whole words as '<word></w>', so 'dog' is taken even though 'dog' is no key."""
    vocab = tokenizer.get_vocab()
    return token in vocab or f"{token}</w>" in vocab


def _encoders(pipe) -> list[tuple[str, object, object]]:
    pairs = [("text_encoder", pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append(("text_encoder_2", pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def load_embedding_into(pipe, path: str | os.PathLike | Embedding, token: str | None = None) -> list[str]:
    """Add the file's tokens to the pipeline's tokenizer(s), grow the text encoder(s) and set the new rows.

    SDXL pipelines get a vector in both encoders, so the file must hold both (768 and 1280 wide). Everything is
    checked before the pipeline is touched. Returns the tokens added (`<tok>`, `<tok>_1`, ...)."""
    from customize.models import detect_family

    emb = path if isinstance(path, Embedding) else read_embedding(path)
    where = "embedding" if isinstance(path, Embedding) else str(path)
    token = token or emb.token
    if not token:
        raise FormatError(f"{where}: the file names no token; pass one (e.g. --embedding FILE:<my-token>)")
    encoders = _encoders(pipe)
    have, need = set(emb.vectors), {name for name, _, _ in encoders}
    if have != need:
        raise FormatError(
            f"{where}: this embedding has vectors for {sorted(have)} ({describe_family(emb.family)}) but the model "
            f"({describe_family(detect_family(pipe))}) needs {sorted(need)}; use an embedding made for this family"
        )
    tokens = placeholder_tokens(token, emb.num_vectors)
    for name, tokenizer, encoder in encoders:
        vec = emb.vectors[name]
        width = encoder.get_input_embeddings().weight.shape[1]
        if vec.shape[1] != width:
            raise FormatError(
                f"{where}: {name} vectors are {vec.shape[1]} wide but the model's {name} embeds tokens {width} wide "
                f"(the file is for {describe_family(emb.family)})"
            )
        if vec.shape[0] != emb.num_vectors:
            raise FormatError(f"{where}: {name} has {vec.shape[0]} vectors, the first encoder {emb.num_vectors}")
        taken = [t for t in tokens if _in_vocabulary(tokenizer, t)]
        if taken:
            raise FormatError(
                f"{where}: token(s) {taken} already in the {name} vocabulary; pick a new placeholder "
                f"(e.g. FILE:<{token.strip('<>')}-2>) or load the embedding only once"
            )
    for name, tokenizer, encoder in encoders:
        tokenizer.add_tokens(tokens)
        # Some checkpoints carry more embedding rows than tokens (padded vocabularies): never shrink those.
        rows = encoder.get_input_embeddings().weight.shape[0]
        encoder.resize_token_embeddings(max(len(tokenizer), rows))
        weight = encoder.get_input_embeddings().weight
        ids = tokenizer.convert_tokens_to_ids(tokens)
        with torch.no_grad():
            weight[ids] = emb.vectors[name].to(device=weight.device, dtype=weight.dtype)  # (n, width)
    return tokens
