"""Precompute per-example features once (VAE latent moments, text states, ...) and train from them.

`cache_features(dataset, encode)` runs the method's `encode(batch) -> {name: (B, ...) tensor}` over the data set
once, under no_grad, and returns a `CachedDataset` whose examples are the original ones without the dropped
keys (pixel_values by default) plus the features. Kept in memory, and optionally in one safetensors file that a
later run reuses when its fingerprint (given by the caller: model, resolution, ...) matches.

Random augmentation with a cache:
- flips: when the data set has `random_flip`, BOTH versions of every example are encoded (twice the encode
  time and memory) and each training step picks one at random, so flipping stays a per-step augmentation;
- random crops: the crop is drawn once, when the cache is built, and then fixed (as in diffusers' scripts);
  turn caching off to re-draw crops every epoch.
Building the cache draws no number from the global RNGs (each example is made under its own seed), so a run
that reads the cache from disk continues exactly like the run that computed it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from customize.data.datasets import collate_examples
from customize.data.sampling import derived_seed, seeded_rng
from customize.utils import save_safetensors_atomic


class CachedDataset(Dataset):
    """Examples held in memory: item i is one of `variants[i]` (chosen at random when there are two flips)."""

    def __init__(self, variants: list[list[dict]]):
        self.variants = variants

    def __len__(self) -> int:
        return len(self.variants)

    def __getitem__(self, i: int) -> dict:
        options = self.variants[i]
        pick = int(torch.randint(len(options), ())) if len(options) > 1 else 0
        return dict(options[pick])


def _example(dataset, i: int, flip: bool | None, seed: int) -> dict:
    # The same seed for both flips of one example gives them the same random crop.
    with seeded_rng(derived_seed(seed, i)):
        return dataset.get(i, flip=flip) if flip is not None else dataset[i]


def _load(path: Path, fingerprint: str, n: int) -> list[list[dict]] | None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("fingerprint") != fingerprint:
            return None
        extras = json.loads(meta["examples"])
        if len(extras) != n:
            return None
        variants = [[dict(x) for x in per] for per in extras]
        for key in f.keys():
            i, v, name = key.split("/", 2)
            variants[int(i)][int(v)][name] = f.get_tensor(key)
    return variants


def _save(path: Path, variants: list[list[dict]], fingerprint: str) -> None:
    tensors, extras = {}, []
    for i, per in enumerate(variants):
        extras.append([])
        for v, ex in enumerate(per):
            extras[-1].append({k: x for k, x in ex.items() if not torch.is_tensor(x)})
            tensors.update({f"{i}/{v}/{k}": x for k, x in ex.items() if torch.is_tensor(x)})
    save_safetensors_atomic(tensors, path, metadata={"fingerprint": fingerprint, "examples": json.dumps(extras)})


def cache_features(
    dataset,
    encode: Callable[[dict], dict[str, torch.Tensor]],
    *,
    batch_size: int = 8,
    drop: Sequence[str] = ("pixel_values",),
    both_flips: bool | None = None,
    seed: int = 0,
    cache_file: str | os.PathLike | None = None,
    fingerprint: str = "",
    accelerator=None,
    collate: Callable[[list[dict]], dict] = collate_examples,
) -> CachedDataset:
    """Encode every example of `dataset` once (see the module docstring).

    `both_flips` defaults to the data set's `random_flip`; it needs `dataset.get(i, flip=...)`.
    With `cache_file` and an `accelerator`, the main process builds and writes the file while the others wait
    and then read it."""
    both_flips = bool(getattr(dataset, "random_flip", False)) if both_flips is None else both_flips
    if both_flips and not callable(getattr(dataset, "get", None)):
        raise TypeError(f"{type(dataset).__name__} has random flips but no get(i, flip=...): cannot cache both "
                        "flips; pass both_flips=False to cache one fixed flip")
    flips: list[bool | None] = [False, True] if both_flips else [None]
    path = Path(cache_file) if cache_file is not None else None
    n = len(dataset)

    def build() -> list[list[dict]]:
        if path is not None and path.is_file():
            cached = _load(path, fingerprint, n)
            if cached is not None:
                return cached
        variants: list[list[dict]] = [[] for _ in range(n)]
        jobs = [(i, f) for i in range(n) for f in flips]
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            examples = [_example(dataset, i, f, seed) for i, f in chunk]
            with torch.no_grad(), seeded_rng(derived_seed(seed, n, start), cuda=True):
                features = encode(collate(examples))
            for row, ((i, _), ex) in enumerate(zip(chunk, examples)):
                kept = {k: v for k, v in ex.items() if k not in drop}
                kept.update({k: v[row].detach().cpu() for k, v in features.items()})
                variants[i].append(kept)
        if path is not None and (accelerator is None or accelerator.is_main_process):
            _save(path, variants, fingerprint)
        return variants

    if accelerator is not None and path is not None:
        with accelerator.main_process_first():
            return CachedDataset(build())
    return CachedDataset(build())
