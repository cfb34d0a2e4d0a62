"""Resumable checkpoints: `output_dir/checkpoint-<step>/`, written atomically.

A checkpoint folder holds accelerate's `save_state` files (optimizer, LR schedule, grad scaler, one RNG-state
file per process; all read back with `torch.load(weights_only=True)`), plus ours:
    trainable.safetensors   the trained parameters, by name
    ema.safetensors         the EMA shadows (only with use_ema)
    trainer_state.json      step counter, loss history, EMA update count, the batch geometry of the run and
                            its settings (`run_settings`: every config field that changes what is trained)
    method_state.json       the method's own state (only for a method with state_dict / load_state_dict, see
    method_state.safetensors  customize.training.method): its JSON values, and its tensors when it has any
Everything is first written to `.checkpoint-<step>.tmp` and renamed when complete, so a run killed mid-save
leaves a hidden temp folder that `list_checkpoints` ignores (and the next run removes), never a half checkpoint.

Before a run touches anything, `check_run_folder` decides what its output_dir means: a fresh start (refused when
the folder holds another run's checkpoints, unless `overwrite_output_dir`), or a resume (refused, naming the
setting to change, when the checkpoint was written with other settings, is damaged or lies past
max_train_steps). Every such refusal is a `customize.errors.TrainingError`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from customize.errors import TrainingError
from customize.training.method import METHOD_STATE_FILE, METHOD_TENSORS_FILE
from customize.utils import atomic_path, recover_dir, save_safetensors_atomic

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "trainer_state.json"
RNG_PREFIX = "random_states_"  # accelerate's RNG-state files, one per process: random_states_<rank>.pkl
# accelerate's own files; a checkpoint without one of them cannot restore the run
ACCELERATE_FILES = ("optimizer.bin", "scheduler.bin")
_RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")
# What writes killed midway leave: this module's `.checkpoint-<step>.tmp` / `.old`, and the temporary files and
# folders of customize.utils.atomic_path and mkstemp / mkdtemp (`.<name>.<8 random characters>.tmp`).
_CKPT_LEFTOVER = re.compile(rf"^\.{PREFIX}(\d+)\.(tmp|old)$")
_ATOMIC_TMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_SWAP_LEFTOVER = re.compile(r"^\.(.+)\.(new|old)$")  # customize.utils.atomic_dir's sibling folders


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
        raise TrainingError(f"resume_from_checkpoint={resume!r}: no such checkpoint folder "
                            f"(use 'latest' or one of {[p.name for p in list_checkpoints(output_dir)]})")
    if not (path / STATE_FILE).is_file():
        raise TrainingError(f"resume_from_checkpoint={resume!r}: {path} has no {STATE_FILE}, so it is not a complete "
                            f"checkpoint of this toolkit (use 'latest' or one of "
                            f"{[p.name for p in list_checkpoints(output_dir)]})")
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_partial(output_dir: str | os.PathLike) -> list[Path]:
    """Clean up after writes that were killed midway, in `output_dir` and its direct sub-folders (not inside
    checkpoints, which are published whole): temporary files and folders of atomic writes are removed; an old
    checkpoint moved aside by a re-save that was killed before the new one took its place is put back; a folder
    swap of customize.utils.atomic_dir is finished or undone (`recover_dir`). Returns what was removed or put back."""
    output_dir = Path(output_dir)
    recover_dir(output_dir)  # output_dir itself may be a pipeline folder swapped by atomic_dir
    if not output_dir.is_dir():
        return []
    touched = []
    folders = [output_dir] + sorted(p for p in output_dir.iterdir()
                                    if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
                                    and not _NAME.match(p.name))
    for folder in folders:
        for p in sorted(folder.iterdir()):
            ckpt = _CKPT_LEFTOVER.match(p.name) if folder == output_dir else None
            swap = _SWAP_LEFTOVER.match(p.name)
            if ckpt and ckpt.group(2) == "old" and p.is_dir() and not (folder / f"{PREFIX}{ckpt.group(1)}").exists():
                os.replace(p, folder / f"{PREFIX}{ckpt.group(1)}")
            elif ckpt or _ATOMIC_TMP.match(p.name):
                _remove(p)
            elif swap and p.is_dir():
                recover_dir(folder / swap.group(1))
            else:
                continue
            touched.append(p)
    if touched:
        logger.warning("removed what interrupted writes left in %s: %s", output_dir,
                       ", ".join(str(p.relative_to(output_dir)) for p in touched))
    return touched


def remove_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete every checkpoint folder of `output_dir`, complete or not (overwrite_output_dir)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    doomed = sorted(p for p in output_dir.iterdir() if p.is_dir() and _NAME.match(p.name))
    for p in doomed:
        shutil.rmtree(p)
    return doomed


def prune(output_dir: str | os.PathLike, total_limit: int | None, keep: Path | None = None) -> list[Path]:
    """Keep the newest `total_limit` checkpoints, `keep` (the one just written) always among them: a run resumed
    from an older checkpoint writes steps below those of the checkpoints after it, and must not delete its own."""
    if total_limit is None:
        return []
    found = [p for p in list_checkpoints(output_dir) if keep is None or p != Path(keep)]
    others = total_limit - (1 if keep is not None else 0)
    doomed = found[: max(len(found) - others, 0)]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


def split_method_state(method_state: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """A method's `state_dict()` answer as (JSON values, tensors on the CPU); a value that is neither is refused
    naming its key."""
    if not isinstance(method_state, dict) or not all(isinstance(k, str) for k in method_state):
        raise TypeError(f"a method's state_dict() must return a dict with str keys, got {type(method_state).__name__}")
    values, tensors = {}, {}
    for key, value in method_state.items():
        if torch.is_tensor(value):
            tensors[key] = value.detach().cpu().contiguous().clone()
            continue
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"a method's state_dict() entry {key!r} is neither a tensor nor JSON ({e}): return "
                            "numbers, strings, lists and dicts of them, or tensors at the top level") from None
        values[key] = value
    return values, tensors


def save_checkpoint(accelerator, output_dir, step: int, trainable: dict, ema: dict | None, state: dict,
                    total_limit: int | None, method_state: dict | None = None) -> Path:
    """Collective: every process calls it (each writes its own RNG state); the main process writes the rest
    and publishes the folder with one rename. `method_state` (the method's state_dict(), None for a method
    without state) is written as method_state.json (+ method_state.safetensors for its tensors)."""
    method_files = split_method_state(method_state) if method_state is not None else None
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
        if method_files is not None:
            values, tensors = method_files
            if tensors:
                save_safetensors_atomic(tensors, tmp / METHOD_TENSORS_FILE)
            with atomic_path(tmp / METHOD_STATE_FILE) as f:
                f.write_text(json.dumps({"state": values, "tensors": sorted(tensors)}, indent=1))
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
        prune(output_dir, total_limit, keep=final)
    accelerator.wait_for_everyone()
    return final


def check_tensors(path: Path, tensors: dict, shapes: dict, what: str = "trained") -> None:
    """The checkpoint's tensors must be exactly this run's trained parameters, by name and shape (`shapes`)."""
    hint = ("resume with the method and the options that wrote the checkpoint (those that decide which weights "
            "train and their shapes: rank, lora_target, train_text_encoder, num_vectors, ...), or start over with "
            "--overwrite_output_dir")
    missing = [n for n in shapes if n not in tensors]
    if missing:
        raise TrainingError(f"{path}: no saved {what} tensor for {len(missing)} of this run's {len(shapes)} trained "
                            f"tensors (e.g. {missing[0]}); {hint}")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise TrainingError(f"{path} holds {len(extra)} {what} tensors this run does not train (e.g. {extra[0]}); "
                            f"{hint}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise TrainingError(f"{path}: {name} is {tuple(tensors[name].shape)} in the checkpoint and "
                                f"{tuple(shape)} in this run; {hint}")


def load_checkpoint(accelerator, path: str | os.PathLike, use_ema: bool = False,
                    shapes: dict | None = None) -> tuple[dict, dict | None, dict]:
    """Restore accelerate's state (optimizer, schedule, scaler, this process's RNG streams) and return
    (trainable tensors, EMA tensors or None, trainer state). Every file is checked first (`verify_checkpoint`):
    accelerate would skip an unreadable RNG-state file with a log line, and the run would then silently differ
    from an uninterrupted one. `shapes` ({name: shape} of this run's trained tensors) must match the saved ones."""
    path = Path(path)
    rng_file = path / f"{RNG_PREFIX}{accelerator.process_index}.pkl"
    if not rng_file.is_file():
        raise TrainingError(
            f"{rng_file} is missing: the checkpoint was written by fewer processes than this run uses "
            f"({accelerator.num_processes}); resume with the same number of processes"
        )
    state = verify_checkpoint(path, use_ema)
    if accelerator.scaler is not None and not (path / "scaler.pt").is_file():
        raise TrainingError(f"{path / 'scaler.pt'} is missing: the checkpoint was not written with "
                            "mixed_precision fp16; resume with the mixed_precision that wrote it")
    trainable = load_file(str(path / TRAINABLE_FILE), device="cpu")
    ema = load_file(str(path / EMA_FILE), device="cpu") if use_ema else None
    for file, tensors in ((TRAINABLE_FILE, trainable), (EMA_FILE, ema)):
        if tensors is None:
            continue
        if shapes is not None:
            check_tensors(path, tensors, shapes, "trained" if file == TRAINABLE_FILE else "EMA")
        bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
        if bad:
            raise TrainingError(f"{path / file} holds non-finite values (nan or inf in {len(bad)} tensors, e.g. "
                                f"{bad[0]}): the run had diverged when it was written; {_elsewhere(path)}")
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # a file that passed the checks but does not fit this run's optimizer or schedule
        raise TrainingError(f"{path}: the optimizer / schedule state cannot be restored ({type(e).__name__}: "
                            f"{e}); resume with the settings that wrote it, {_elsewhere(path)}") from e
    return trainable, ema, state


def _read_method_file(file: Path) -> dict:
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _damaged(file, f"cannot be read as JSON ({e})") from None
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict) and isinstance(saved.get("tensors"), list)):
        raise _damaged(file, "holds no method state (state, tensors)")
    if saved["tensors"] and not (file.parent / METHOD_TENSORS_FILE).is_file():
        raise _damaged(file.parent / METHOD_TENSORS_FILE, "is missing")
    return saved


def load_method_state(path: str | os.PathLike) -> dict | None:
    """The method state saved in checkpoint `path` (what the method's state_dict() returned, tensors on the
    CPU), or None when the checkpoint holds none."""
    path = Path(path)
    file = path / METHOD_STATE_FILE
    if not file.is_file():
        return None
    saved = _read_method_file(file)
    tensors = load_file(str(path / METHOD_TENSORS_FILE), device="cpu") if saved["tensors"] else {}
    if sorted(tensors) != sorted(saved["tensors"]):
        raise _damaged(path / METHOD_TENSORS_FILE, f"does not hold the tensors {METHOD_STATE_FILE} lists "
                                                   f"({sorted(saved['tensors'])})")
    return {**saved["state"], **tensors}


# ---------------------------------------------------------------------------------------------------------------
# What a run may do with its output_dir
# ---------------------------------------------------------------------------------------------------------------


def _names(paths: list[Path]) -> str:
    names = [p.name for p in paths]
    return ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]}, ..., {names[-1]} ({len(names)})"


def _elsewhere(path: Path) -> str:
    """What a user can do instead of resuming from the checkpoint `path`."""
    others = [p for p in list_checkpoints(path.parent) if p != path]
    earlier = (f"resume from another checkpoint ({_names(others)}) with --resume_from_checkpoint NAME, "
               if others else "")
    return f"{earlier}or start over with --overwrite_output_dir (removes the checkpoints)"


def _damaged(file: Path, why: str) -> TrainingError:
    return TrainingError(f"{file} {why}: the checkpoint is damaged (a copy or a disk that failed?); "
                         f"{_elsewhere(file.parent)}")


def run_settings(cfg) -> dict:
    """The settings of a run that must be the same when it is resumed: every config field but those of
    `RESUME_FREE` (and validation settings), as JSON values."""
    free = getattr(type(cfg), "RESUME_FREE", frozenset())
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name in free or "validation" in f.name:
            continue
        value = getattr(cfg, f.name)
        out[f.name] = os.fspath(value) if isinstance(value, os.PathLike) else value
    return json.loads(json.dumps(out, default=repr))


def _same(saved, now) -> bool:
    if saved == now:
        return True
    # the same folder written another way (relative / absolute, a symlink)
    if isinstance(saved, str) and isinstance(now, str) and os.path.exists(saved) and os.path.exists(now):
        return os.path.samefile(saved, now)
    return False


def settings_differences(saved: dict, cfg) -> list[str]:
    """'name (checkpoint value there, value now)' for each setting of `cfg` that differs from `saved`."""
    free = getattr(type(cfg), "RESUME_FREE", frozenset())
    now = run_settings(cfg)
    missing = object()
    out = []
    for name in sorted(set(saved) | set(now)):
        if name in free or "validation" in name:
            continue
        a, b = saved.get(name, missing), now.get(name, missing)
        if not _same(a, b):
            show = lambda v: "unset" if v is missing else repr(v)  # noqa: E731
            out.append(f"{name} ({show(a)} in the checkpoint, {show(b)} now)")
    return out


def read_state(path: str | os.PathLike) -> dict:
    """The checkpoint's trainer_state.json, checked: a JSON object with the step, the loss history and the batch
    geometry."""
    file = Path(path) / STATE_FILE
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _damaged(file, f"cannot be read ({e})") from None
    try:
        state = json.loads(text)
    except ValueError:
        raise _damaged(file, "is empty" if not text.strip() else "is not JSON") from None
    step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _damaged(file, "holds no step count (global_step)")
    if not isinstance(state.get("losses"), list) or len(state["losses"]) != step:
        raise _damaged(file, f"holds no loss history of {step} steps (losses)")
    if not isinstance(state.get("geometry"), list) or len(state["geometry"]) != 3:
        raise _damaged(file, "holds no batch geometry (geometry)")
    return state


_VERIFIED: set[tuple] = set()  # (path, size, mtime) of the files already checked in this process


def _check_file(file: Path) -> None:
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    if stat.st_size == 0:
        raise _damaged(file, "is empty")
    if file.name == METHOD_STATE_FILE:
        _read_method_file(file)
    elif file.suffix == ".safetensors":
        from safetensors import safe_open

        try:  # the header and the file size must agree: catches a truncated file without reading the tensors
            with safe_open(str(file), "pt") as f:
                list(f.keys())
        except Exception as e:
            raise _damaged(file, f"cannot be read as safetensors ({e})") from None
    elif file.suffix in (".bin", ".pt", ".pkl"):
        # torch.save writes a zip archive with a CRC per entry: a truncated or altered file fails here
        try:
            with zipfile.ZipFile(file) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            raise _damaged(file, f"is truncated or not a torch file ({e})") from None
        if bad is not None:
            raise _damaged(file, f"is corrupt (entry {bad} fails its checksum)")
        if file.name.startswith(RNG_PREFIX):
            from accelerate.utils import load

            try:
                states = load(str(file))
            except Exception as e:
                raise _damaged(file, f"cannot be loaded ({type(e).__name__}: {e})") from None
            missing = [k for k in _RNG_KEYS if not isinstance(states, dict) or k not in states]
            if missing:
                raise _damaged(file, f"holds no random state ({', '.join(missing)})")
    _VERIFIED.add(key)


def verify_checkpoint(path: str | os.PathLike, use_ema: bool = False) -> dict:
    """Check that every file of the checkpoint `path` is there and readable (without loading the optimizer) and
    return its trainer state; a damaged checkpoint raises TrainingError naming the file."""
    path = Path(path)
    state = read_state(path)
    needed = [TRAINABLE_FILE, *ACCELERATE_FILES]
    if use_ema:
        if not (path / EMA_FILE).is_file():
            raise TrainingError(f"{path} has no EMA state ({EMA_FILE}) but use_ema is on: resume with use_ema off, "
                                "or from a checkpoint written with it")
        needed.append(EMA_FILE)
    for name in needed:
        if not (path / name).is_file():
            raise _damaged(path / name, "is missing")
    if not list(path.glob(f"{RNG_PREFIX}*.pkl")):
        raise _damaged(path / f"{RNG_PREFIX}0.pkl", "is missing")
    for file in sorted(path.iterdir()):
        if file.is_file() and file.name != STATE_FILE:
            _check_file(file)
    return state


def check_writable(output_dir: str | os.PathLike) -> None:
    """Refuse an output_dir that cannot be created or written, without creating it: a file is created and
    removed in it, or in its nearest existing parent folder."""
    path = Path(output_dir)
    probe = path
    while not probe.exists() and not probe.is_symlink() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise TrainingError(f"output_dir {path} cannot be created: {probe} exists and is not a folder; "
                            "choose another --output_dir")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        where = "" if probe == path else f" (in its nearest existing folder {probe})"
        raise TrainingError(f"output_dir {path} cannot be written{where}: {e.strerror or e}; choose another "
                            "--output_dir or change its permissions") from None


def check_run_folder(cfg) -> Path | None:
    """What the run configured by `cfg` will do with its output_dir, decided before it loads or writes anything:
    the checkpoint to resume from (None: a fresh start). Refuses (TrainingError) an output_dir that cannot be
    written; a fresh start in a folder holding another run's checkpoints (unless overwrite_output_dir, whose
    removal of them the engine does); and a resume from a checkpoint that is damaged, lies past max_train_steps,
    or was written with other settings (each differing one named)."""
    output_dir = Path(cfg.output_dir)
    overwrite = getattr(cfg, "overwrite_output_dir", False)
    if overwrite and cfg.resume_from_checkpoint:
        raise TrainingError(f"resume_from_checkpoint={cfg.resume_from_checkpoint!r} and overwrite_output_dir "
                            "contradict each other: give --resume_from_checkpoint to go on with the run in "
                            "output_dir, or --overwrite_output_dir to start over")
    check_writable(output_dir)
    if not cfg.resume_from_checkpoint:
        found = list_checkpoints(output_dir)
        if found and not overwrite:
            raise TrainingError(f"output_dir {output_dir} already holds checkpoints of an earlier run "
                                f"({_names(found)}): resume it with --resume_from_checkpoint latest, start over "
                                "with --overwrite_output_dir (removes them), or choose another --output_dir")
        return None
    resume = resolve_resume(output_dir, cfg.resume_from_checkpoint)
    if resume is None:
        return None
    state = verify_checkpoint(resume, getattr(cfg, "use_ema", False))
    step = state["global_step"]
    saved = state.get("settings")
    if saved is None:
        logger.warning("%s was written without its run settings (an older version): they cannot be compared "
                       "with this run's", resume)
    else:
        differ = settings_differences(saved, cfg)
        if differ:
            shown = "; ".join(differ[:6]) + (f"; and {len(differ) - 6} more" if len(differ) > 6 else "")
            raise TrainingError(f"{resume} was written by a run with other settings: {shown}. Resume with the "
                                "settings that wrote it, or start over with --overwrite_output_dir (or another "
                                "--output_dir)")
    if step > cfg.max_train_steps:
        raise TrainingError(f"{resume} is at step {step}, past max_train_steps={cfg.max_train_steps}: give "
                            f"--max_train_steps {step} or more to go on from it, or {_elsewhere(resume)}")
    if step == cfg.max_train_steps:
        logger.warning("%s is at max_train_steps=%d: nothing is left to train, the final weights are written from "
                       "it", resume, step)
    return resume
