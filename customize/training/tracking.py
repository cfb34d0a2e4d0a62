"""Trackers, validation grids and model cards: the engine's outputs besides weights."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from customize.data.images import save_image_atomic
from customize.utils import atomic_path

logger = logging.getLogger(__name__)

_TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def resolve_trackers(report_to: str) -> list[str]:
    """Trackers to hand to accelerate: the requested ones that are installed. A missing package is a warning,
    not a failure: losing the curves must not cost the run."""
    if report_to in ("none", "", None):
        return []
    wanted = list(_TRACKER_PACKAGES) if report_to == "all" else [report_to]
    usable = []
    for name in wanted:
        if any(importlib.util.find_spec(pkg) is not None for pkg in _TRACKER_PACKAGES[name]):
            usable.append(name)
        elif report_to != "all":
            logger.warning("report_to=%s but %s is not installed (pip install %s); logging to no tracker",
                           name, name, _TRACKER_PACKAGES[name][0])
    return usable


def tracker_config(cfg) -> dict:
    """The config as trackers accept it (TensorBoard hparams take only scalars and strings)."""
    out = {}
    for k, v in cfg.to_dict().items():
        if isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif v is not None:
            out[k] = str(v)
    return out


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images (resized to the first one's size) row by row into one picture."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        img = img.convert("RGB")
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.BICUBIC)
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def record_validation(accelerator, images: list[Image.Image], step: int, output_dir) -> Path:
    """Save the validation images as one PNG grid (atomically) and send them to every tracker that takes images."""
    path = save_image_atomic(image_grid(images), Path(output_dir) / "validation" / f"step-{step:06d}.png")
    arrays = np.stack([np.asarray(img.convert("RGB").resize(images[0].size)) for img in images])  # (N, H, W, 3)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"validation": arrays}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({"validation": list(arrays)}, step=step)
    return path


SCORES_FILE = "scores.jsonl"  # validation/ of the output folder: one {"step": s, name: value} line per validation
SCORES_PLOT = "scores.png"


def record_validation_scores(scalars: dict[str, float], step: int, output_dir) -> Path:
    """Append a validation's scalars to validation/scores.jsonl and redraw validation/scores.png, one line per
    name against the step (`customize.plots.line_chart`). Rows at or past `step` are dropped first: they are
    from the part of an earlier run that a resume replays. Both files are written atomically."""
    import json

    from customize.plots import line_chart, save_chart

    folder = Path(output_dir) / "validation"
    path = folder / SCORES_FILE
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    rows = [r for r in rows if r["step"] < step] + [{"step": step, **scalars}]
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    names = sorted({k for r in rows for k in r if k != "step"})
    series = {n: [(r["step"], r[n]) for r in rows if n in r] for n in names}
    save_chart(line_chart(series, title="validation scores", x_label="step"), folder / SCORES_PLOT)
    return path


def run_settings(cfg) -> dict:
    """The model-card rows every fine-tune shares: resolution, steps, batch, precision, seed."""
    return {
        "resolution": cfg.resolution or "model default",
        "steps": cfg.max_train_steps,
        "batch size x accumulation": f"{cfg.train_batch_size} x {cfg.gradient_accumulation_steps}",
        "mixed precision": cfg.mixed_precision,
        "seed": cfg.seed,
    }


def model_card_text(title: str, intro: str, settings: dict) -> str:
    """A model card (README.md) body: a title, how to use the weights, and a settings table."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in settings.items())
    return f"# {title}\n\n{intro}\n\n| setting | value |\n|---|---|\n{rows}\n"


def write_model_card(text: str, output_dir: str | os.PathLike) -> Path:
    path = Path(output_dir) / "README.md"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
