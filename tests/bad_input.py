"""Driving the recipes and the `customize` command as a user does (real processes) and checking how they refuse
bad input: exit status 1, exactly one `error:` line that names the problem, no traceback, and nothing written
or left behind. Imported by the tests/test_bad_input_*.py modules."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY_BASE = ROOT / "data" / "toy" / "base"
# The flags every toy recipe run shares (32 px toy model, quiet, no trackers).
TOY = ["--pretrained_model_name_or_path", str(TOY_BASE), "--resolution", "32", "--no_progress", "--report_to", "none"]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def env(**extra: str) -> dict:
    out = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out.pop("CUSTOMIZE_TRACEBACK", None)
    return {**out, **extra}


def recipe(name: str, *args: str, cwd: Path | None = None, timeout: float = 600, **extra_env: str) -> Run:
    """Run `python recipes/<name>.py ARGS`."""
    return _run([sys.executable, str(ROOT / "recipes" / f"{name}.py"), *map(str, args)], cwd, timeout, extra_env)


def customize(*args: str, cwd: Path | None = None, timeout: float = 600, **extra_env: str) -> Run:
    """Run the `customize` command (as `python -m customize.cli`)."""
    return _run([sys.executable, "-m", "customize.cli", *map(str, args)], cwd, timeout, extra_env)


def _run(command, cwd, timeout, extra_env) -> Run:
    done = subprocess.run(command, cwd=cwd or ROOT, env=env(**extra_env), capture_output=True, text=True,
                          timeout=timeout)
    return Run(done.returncode, done.stdout, done.stderr)


# argparse's status for a command line it cannot parse (an unknown flag, a value of the wrong type)
USAGE_ERROR = 2


def assert_refused(run: Run, *needles: str, status: int = 1) -> str:
    """Exit status `status` (1; USAGE_ERROR for a command line argparse refuses), one `error:` line on standard
    error that contains every needle (case-insensitive), and no traceback. Returns the error line."""
    assert "Traceback" not in run.output, run.output
    assert run.returncode == status, f"exit status {run.returncode}:\n{run.output}"
    errors = [line for line in run.stderr.splitlines() if ": error: " in line or line.startswith("error: ")]
    assert len(errors) == 1, f"expected one error line:\n{run.stderr}"
    for needle in needles:
        assert needle.lower() in errors[0].lower(), f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def listing(folder: Path) -> dict[str, int]:
    """{relative path: size} of every file under `folder` (hidden ones included), to compare before / after."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
