"""Two-process data-parallel training on CPU (torchrun + gloo, ACCELERATE_USE_CPU=true).

Every rank must end with the same weights (each writes a hash), and, with the randomness of the toy turned
off, 2 processes x batch 1 must equal 1 process x batch 2: the engine's gradient all-reduce computes the same
mean gradient as one big batch, over the same examples."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "engine_toy.py"


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    if exe.exists():
        return [str(exe)]
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    return ["torchrun"]


def test_two_processes_end_identical_and_match_one_big_batch(tmp_path):
    flags = ["--max_train_steps", "6", "--learning_rate", "0.02", "--checkpointing_steps", "3",
             "--deterministic", "--n_examples", "8"]
    dist, single = tmp_path / "dist", tmp_path / "single"
    run = subprocess.run(
        [*_torchrun(), "--standalone", "--nproc_per_node", "2", str(SCRIPT), "--output_dir", str(dist),
         "--train_batch_size", "1", *flags],
        env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    h0, h1 = (dist / "hash-0.txt").read_text(), (dist / "hash-1.txt").read_text()
    assert h0 == h1
    # Both ranks wrote their RNG streams into the shared checkpoint.
    assert {p.name for p in (dist / "checkpoint-6").glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}

    ref = subprocess.run(
        [sys.executable, str(SCRIPT), "--output_dir", str(single), "--train_batch_size", "2", *flags],
        env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = load_file(str(dist / "toy.safetensors")), load_file(str(single / "toy.safetensors"))
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k
