"""A run killed with SIGKILL after a checkpoint and resumed with `--resume_from_checkpoint latest` ends with
bitwise the same weights as an uninterrupted run (CPU). Both runs are real processes of tests/engine_toy.py,
with dropout, augmentation, loss noise, accumulation, EMA and a cosine schedule in play."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from customize.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "engine_toy.py"
FLAGS = ["--max_train_steps", "12", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
         "--n_examples", "7", "--checkpointing_steps", "3", "--learning_rate", "0.01", "--use_ema",
         "--ema_decay", "0.9", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--output_dir", str(out), *FLAGS, *extra]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    # The run to kill sleeps after each step, so the kill lands between checkpoint 3 and the end.
    proc = subprocess.Popen(_command(cut, "--slow", "0.3"), env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    subprocess.run(_command(ref), env=_env(), cwd=ROOT, check=True, capture_output=True)
    deadline = time.time() + 120
    while not ckpt.list_checkpoints(cut):
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its first checkpoint:\n{proc.stdout.read().decode()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("no checkpoint appeared within 120 s")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (cut / "hash-0.txt").exists(), "the run finished before it was killed"
    done = ckpt.list_checkpoints(cut)
    assert done and ckpt.checkpoint_step(done[-1]) < 12

    resumed = subprocess.run(_command(cut, "--resume_from_checkpoint", "latest"), env=_env(), cwd=ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (cut / "hash-0.txt").read_text() == (ref / "hash-0.txt").read_text()
    assert (cut / "toy.safetensors").read_bytes() == (ref / "toy.safetensors").read_bytes()  # EMA weights
    assert [p.name for p in ckpt.list_checkpoints(cut)][-1] == "checkpoint-12"
    assert not [p for p in cut.iterdir() if p.name.startswith(".")], "temp folders left behind"
