"""`customize bench NAME [ARGS...]`: run one of the benchmarks in the source checkout's bench/ folder.

Benchmarks are scripts (each prints ratios against a reference measured in the same run), kept beside the
package rather than inside it; this runner finds them from a source or editable install and lists them."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def bench_dir() -> Path | None:
    here = Path(__file__).resolve().parent.parent / "bench"
    return here if here.is_dir() else None


def available() -> list[str]:
    d = bench_dir()
    return sorted(p.stem for p in d.glob("*.py") if not p.name.startswith("_")) if d else []


def pick(selection: str, known, what: str = "row") -> list[str]:
    """The names of a comma-separated `selection`, in its order, each one of `known`; an unknown one ends the
    script with exit status 2 and a message listing the choices."""
    names = [n.strip() for n in selection.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"unknown {what}(s) {unknown}; choose from {', '.join(known)}", file=sys.stderr)
        raise SystemExit(2)
    return names


def single_thread_unless_set() -> None:
    """One torch thread unless OMP_NUM_THREADS says otherwise: on the toy models' tiny tensors a second thread
    only adds spin-waiting on a busy machine."""
    import os

    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: customize bench NAME [ARGS...]\n\nbenchmarks: " + (", ".join(names) or "(none found)"))
        print("Each benchmark has its own --help, e.g. `customize bench train_step --help`.")
        return 0
    name = argv[0].removesuffix(".py")
    if bench_dir() is None:
        print("customize: the bench/ folder is not installed; run benchmarks from a source checkout", file=sys.stderr)
        return 1
    if name not in names:
        print(f"customize: no benchmark {name!r}; choose one of: {', '.join(names)}", file=sys.stderr)
        return 1
    path = bench_dir() / f"{name}.py"
    old = sys.argv
    sys.argv = [str(path), *argv[1:]]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv = old
    return 0
