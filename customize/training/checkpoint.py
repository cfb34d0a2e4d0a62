"""Resumable checkpoints: `output_dir/checkpoint-<step>/`, written atomically.

A checkpoint folder holds accelerate's `save_state` files (optimizer, LR schedule, grad scaler, one RNG-state
file per process; all read back with `torch.load(weights_only=True)`), plus ours:
    trainable.safetensors   the trained parameters, by name
    ema.safetensors         the EMA shadows (only with use_ema)
    trainer_state.json      step counter, loss history, EMA update count, the batch geometry of the run
Everything is first written to `.checkpoint-<step>.tmp` and renamed when complete, so a run killed mid-save
leaves a hidden temp folder that `list_checkpoints` ignores (and the next run removes), never a half checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file

from customize.utils import atomic_path, save_safetensors_atomic

PREFIX = "checkpoint-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "trainer_state.json"


def checkpoint_step(path: str | os.PathLike) -> int:
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint folder (expected a name like {PREFIX}500)")
    return int(m.group(1))


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (temp folders of interrupted saves are skipped)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def resolve_resume(output_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """`None` -> None; "latest" -> newest checkpoint in output_dir (None when there is none yet, so the same
    command starts a run and resumes it); a folder path, or a bare checkpoint name inside output_dir."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.exists() and (Path(output_dir) / resume).exists():
        path = Path(output_dir) / resume
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={resume!r}: no such checkpoint folder "
                                f"(use 'latest' or one of {[p.name for p in list_checkpoints(output_dir)]})")
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} has no {STATE_FILE}: not a complete checkpoint of this toolkit")
    return path


def remove_partial(output_dir: str | os.PathLike) -> list[Path]:
    """Delete temp folders left by saves that were killed midway."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    stale = [p for p in output_dir.iterdir() if p.is_dir() and re.match(rf"^\.{PREFIX}\d+\.(tmp|old)$", p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def prune(output_dir: str | os.PathLike, total_limit: int | None) -> list[Path]:
    """Keep the newest `total_limit` checkpoints."""
    if total_limit is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = found[: max(len(found) - total_limit, 0)]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


def save_checkpoint(accelerator, output_dir, step: int, trainable: dict, ema: dict | None, state: dict,
                    total_limit: int | None) -> Path:
    """Collective: every process calls it (each writes its own RNG state); the main process writes the rest
    and publishes the folder with one rename."""
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".{PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        save_safetensors_atomic(trainable, tmp / TRAINABLE_FILE)
        if ema is not None:
            save_safetensors_atomic(ema, tmp / EMA_FILE)
        with atomic_path(tmp / STATE_FILE) as f:
            f.write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            # Re-reaching a step that already has a checkpoint (a resume from an older one): swap it out whole.
            old = output_dir / f".{PREFIX}{step}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        prune(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | os.PathLike) -> tuple[dict, dict | None, dict]:
    """Restore accelerate's state (optimizer, schedule, scaler, this process's RNG streams) and return
    (trainable tensors, EMA tensors or None, trainer state)."""
    path = Path(path)
    rng_file = path / f"random_states_{accelerator.process_index}.pkl"
    if not rng_file.is_file():
        raise FileNotFoundError(
            f"{rng_file} is missing: the checkpoint was written by fewer processes than this run uses "
            f"({accelerator.num_processes}); resume with the same number of processes"
        )
    accelerator.load_state(str(path))
    trainable = load_file(str(path / TRAINABLE_FILE), device="cpu")
    ema = load_file(str(path / EMA_FILE), device="cpu") if (path / EMA_FILE).is_file() else None
    state = json.loads((path / STATE_FILE).read_text())
    return trainable, ema, state
