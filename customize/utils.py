"""Small helpers shared by every part of the toolkit: atomic file writes, seeding, devices."""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


def _file_mode() -> int:
    """The permissions a plain open() gives a new file under the current umask (0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in the destination folder; on success rename it over `path` (atomic on POSIX).
    On any error the temporary file is removed and `path` is left as it was. The result has the permissions a
    plain open() would give it: mkstemp makes 0600 files, and a writer that replaces the file (safetensors'
    save_file does) makes its own, so the mode is set once the body has written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode())
        _test_pause(f"publish-{path.name}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# `atomic_dir` writes the new folder as the sibling `.<name>.new` and swaps it in. SWAP_MANIFEST, written into it
# once the new content is complete, lists that content: entries of `.<name>.new` it does not list were carried
# over from the old folder. A process killed midway leaves these for `recover_dir` (run by the next write of the
# folder) to finish or undo.
SWAP_MANIFEST = ".customize-swap.json"
INPLACE_NEW = ".customize-new"  # the new content, inside a folder that is a mount point (cannot be renamed)
# Test-only: "<stage>:<file>" makes atomic_dir create <file> and sleep when it reaches <stage> ("written": new
# content complete; "carried": the first old entry carried over; "swapped": new folder in place, old one not yet
# removed), so a test can SIGKILL it there (tests/test_atomic_save.py); "publish-<name>" does the same in
# atomic_path, with the new <name> complete as its temporary file and not yet renamed (tests/test_bad_input_runs.py).
TEST_PAUSE_ENV = "CUSTOMIZE_TEST_SWAP_PAUSE"


def _test_pause(stage: str) -> None:
    spec = os.environ.get(TEST_PAUSE_ENV, "")
    if spec and spec.partition(":")[0] == stage:
        import time

        Path(spec.partition(":")[2]).touch()
        time.sleep(120)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE, macOS renamex_np RENAME_SWAP); False where
    the system or the filesystem cannot."""
    import ctypes
    import sys

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
            at_fdcwd, rename_exchange = -100, 2
            return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
        if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
            return libc.renamex_np(os.fsencode(a), os.fsencode(b), 2) == 0  # RENAME_SWAP
    except OSError:
        pass
    return False


def _manifest(folder: Path) -> list[str] | None:
    import json

    try:
        return json.loads((folder / SWAP_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove(entry: Path) -> None:
    import shutil

    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def _move_in(src: Path, path: Path, names: list[str], keep) -> None:
    """Replace `path`'s content entry by entry (a mount point cannot be renamed). model_index.json (what
    diffusers opens first) is removed first and the new one comes last, so the folder never loads as a mix."""
    index = "model_index.json"
    with contextlib.suppress(FileNotFoundError):
        (path / index).unlink()
    for entry in list(path.iterdir()):
        if entry.name != src.name and entry.name not in names and not keep(entry.name):
            _remove(entry)
    for name in sorted(names, key=lambda n: n == index):
        if (src / name).exists() or (src / name).is_symlink():
            if (path / name).exists() or (path / name).is_symlink():
                _remove(path / name)
            os.replace(src / name, path / name)


def recover_dir(path: str | os.PathLike) -> None:
    """Finish or undo an `atomic_dir` write of `path` that was killed midway: `path` is left as the old content
    or the new one, whole, with every carried-over entry back in it, and the temporary folders are removed."""
    import shutil

    path = Path(path)
    new, old = path.with_name(f".{path.name}.new"), path.with_name(f".{path.name}.old")
    if old.exists():  # killed between the two renames of a swap without exchange
        if not path.exists():
            os.replace(new if _manifest(new) is not None else old, path)
        shutil.rmtree(old, ignore_errors=True)
    if (path / SWAP_MANIFEST).exists():  # swapped in: the sibling holds the old content
        (path / SWAP_MANIFEST).unlink()
        shutil.rmtree(new, ignore_errors=True)
    listed = _manifest(new)
    if listed is not None and path.is_dir():  # not swapped in: carry the old entries back
        for entry in new.iterdir():
            if entry.name not in listed and entry.name != SWAP_MANIFEST and not (path / entry.name).exists():
                os.replace(entry, path / entry.name)
    shutil.rmtree(new, ignore_errors=True)
    listed = _manifest(path / INPLACE_NEW)
    if listed is not None:  # killed while moving the new entries in: finish
        _move_in(path / INPLACE_NEW, path, [n for n in listed if n != SWAP_MANIFEST], keep=lambda name: True)
    shutil.rmtree(path / INPLACE_NEW, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, keep=None):
    """Yield an empty folder beside `path`; when the body returns, it replaces `path` in one step, so a reader
    sees the old folder or the new one, never a mix, wherever the process is killed (the next write of `path`
    finishes or undoes what is left, `recover_dir`). On an error in the body `path` is left as it was.

    `keep(name) -> bool` picks the entries of the old folder, among those the new content does not have, to
    carry over into the new one (a run's checkpoints and logs beside a pipeline); by default none is. The old
    folder is removed only once the new one is in place. A folder that is a mount point cannot be renamed: it
    is replaced entry by entry, its model_index.json removed first and written last."""
    import json
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    keep = keep or (lambda name: False)
    inplace = path.is_dir() and os.path.ismount(path)
    tmp = path / INPLACE_NEW if inplace else path.with_name(f".{path.name}.new")
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):  # writers such as safetensors' save_file make 0600 files
            if file.is_file() and not file.is_symlink():
                os.chmod(file, _file_mode())
        names = sorted(p.name for p in tmp.iterdir())
        with atomic_path(tmp / SWAP_MANIFEST) as m:
            m.write_text(json.dumps(names), encoding="utf-8")
        _test_pause("written")
        if inplace:
            _move_in(tmp, path, names, keep)
        elif not path.exists():
            os.replace(tmp, path)
        else:
            for entry in sorted(path.iterdir()):
                if entry.name not in names and entry.name != SWAP_MANIFEST and keep(entry.name):
                    os.replace(entry, tmp / entry.name)
                    _test_pause("carried")
            if not _exchange(path, tmp):
                old = path.with_name(f".{path.name}.old")
                os.replace(path, old)
                os.replace(tmp, path)
                os.replace(old, tmp)
        _test_pause("swapped")
        (path / SWAP_MANIFEST).unlink()
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        if not (path / SWAP_MANIFEST).exists():
            recover_dir(path)  # carried entries go back; the new content is dropped
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_pipeline_dir(path: str | os.PathLike, parts: tuple[str, ...] = ()):
    """`atomic_dir` for a diffusers pipeline folder, the writer of every pipeline this toolkit saves: the new
    pipeline replaces the old one whole, and whatever else the folder holds (checkpoints, logs, a model card)
    is carried over. The old pipeline's parts are model_index.json, the components it names and `parts`."""
    import json

    path = Path(path)
    old_parts = {"model_index.json", *parts}
    with contextlib.suppress(OSError, ValueError):
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        old_parts |= {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    return atomic_dir(path, keep=lambda name: name not in old_parts)


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
