"""Class images for DreamBooth's prior preservation, generated with the base model before training.

Image i is always drawn from the seed `seed + i` (by `customize.inference.generate`) and written as
`class-{i:05d}.png` through a temporary file, so an interrupted generation resumes where it stopped and yields the
same pictures as an uninterrupted one. Images already in the folder (the user's own, or an earlier run's) count
towards `num_class_images`: only the difference is generated, in batches, split between the processes of an
`accelerate launch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from customize.data.images import IMAGE_EXTENSIONS, save_image_atomic
from customize.inference import generate
from customize.utils import atomic_path


def class_image_name(index: int) -> str:
    return f"class-{index:05d}.png"


def present_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def missing_indices(folder: str | Path, num_class_images: int) -> list[int]:
    """The image indices to generate: the first (num_class_images - present) whose file does not exist yet."""
    present = present_images(folder)
    need = max(0, num_class_images - len(present))
    names = {p.name for p in present}
    todo, i = [], 0
    while len(todo) < need:
        if class_image_name(i) not in names:
            todo.append(i)
        i += 1
    return todo


@torch.no_grad()
def generate_class_images(
    pipe,
    class_data_dir: str | Path,
    class_prompt: str | Sequence[str],
    num_class_images: int,
    *,
    sample_batch_size: int = 4,
    seed: int = 0,
    resolution: int | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    progress: bool = True,
) -> list[Path]:
    """Fill `class_data_dir` up to `num_class_images` images of `class_prompt`; returns the files written here.
    A list of prompts: image i is drawn from prompts[i % len(prompts)] and its prompt is written beside it as
    `class-{i:05d}.txt` (before the image, so an image never lacks its caption), which the DreamBooth dataset
    reads with use_captions. `guidance_scale`: classifier-free guidance of the class images (None: the
    pipeline's default, 7.5 for Stable Diffusion); a model drawing its class poorly at 7.5 wants its own."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    prompts = [class_prompt] if isinstance(class_prompt, str) else list(class_prompt)
    if not all(prompts) or not prompts:
        raise ValueError("prior preservation needs --class_prompt (e.g. 'a photo of dog') to generate class images")
    if sample_batch_size < 1:
        raise ValueError(f"sample_batch_size must be >= 1, got {sample_batch_size}")
    state = PartialState()
    todo = missing_indices(class_data_dir, num_class_images)
    written: list[Path] = []
    if todo:
        pipe.to(state.device)
        with state.split_between_processes(todo) as mine:
            # one generate call per batch, its images written before the next batch is drawn: what an
            # interruption loses is at most one batch
            batches = [mine[i : i + sample_batch_size] for i in range(0, len(mine), sample_batch_size)]
            bar = tqdm(batches, desc="class images", disable=not (progress and state.is_local_main_process))
            for batch in bar:
                images = generate(
                    pipe, [prompts[i % len(prompts)] for i in batch], [seed + i for i in batch], height=resolution,
                    width=resolution, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    batch_size=sample_batch_size,
                )
                for i, img in zip(batch, images):
                    path = Path(class_data_dir) / class_image_name(i)
                    if not isinstance(class_prompt, str):
                        with atomic_path(path.with_suffix(".txt")) as tmp:
                            tmp.write_text(prompts[i % len(prompts)])
                    written.append(save_image_atomic(img, path))
    state.wait_for_everyone()
    return written
