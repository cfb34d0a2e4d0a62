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
    # The uninterrupted reference runs after the kill: run before it, on a loaded machine, it let the slowed run
    # reach its last checkpoint before the watch below began.
    proc = subprocess.Popen(_command(cut, "--slow", "0.3"), env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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

    subprocess.run(_command(ref), env=_env(), cwd=ROOT, check=True, capture_output=True)
    resumed = subprocess.run(_command(cut, "--resume_from_checkpoint", "latest"), env=_env(), cwd=ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (cut / "hash-0.txt").read_text() == (ref / "hash-0.txt").read_text()
    assert (cut / "toy.safetensors").read_bytes() == (ref / "toy.safetensors").read_bytes()  # EMA weights
    assert [p.name for p in ckpt.list_checkpoints(cut)][-1] == "checkpoint-12"
    assert not [p for p in cut.iterdir() if p.name.startswith(".")], "temp folders left behind"


# ---------------------------------------------------------------------------------------------------------------
# What check_run_folder refuses before a resume touches anything (the subprocess cases: tests/test_bad_input_runs.py)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_checkpoints(tmp_path_factory):
    """An in-process toy run with checkpoint-2 and checkpoint-4."""
    from engine_toy import ToyConfig, run

    out = tmp_path_factory.mktemp("damage") / "run"
    run(ToyConfig(output_dir=str(out), max_train_steps=4, checkpointing_steps=2))
    return out


def _flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _rng_without_state(path):
    import torch

    torch.save({"step": 0}, path)


DAMAGE = {
    "rng-truncated": ("random_states_0.pkl", lambda p: p.write_bytes(p.read_bytes()[:100]), "is truncated"),
    "rng-without-state": ("random_states_0.pkl", _rng_without_state, "holds no random state"),
    "optimizer-empty": ("optimizer.bin", lambda p: p.write_bytes(b""), "is empty"),
    "optimizer-altered": ("optimizer.bin", _flip_middle_byte, "damaged"),
    "scheduler-missing": ("scheduler.bin", lambda p: p.unlink(), "is missing"),
    "trainable-truncated": ("trainable.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-16]),
                            "cannot be read as safetensors"),
    "state-not-json": ("trainer_state.json", lambda p: p.write_text('{"global_step": 4,'), "is not JSON"),
    "state-empty": ("trainer_state.json", lambda p: p.write_text(""), "is empty"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, toy_checkpoints, case):
    import shutil

    from engine_toy import ToyConfig

    from customize.training import TrainingError

    name, damage, needle = DAMAGE[case]
    out = tmp_path / "run"
    shutil.copytree(toy_checkpoints, out)
    damage(out / "checkpoint-4" / name)
    cfg = ToyConfig(output_dir=str(out), max_train_steps=6, resume_from_checkpoint="latest")
    with pytest.raises(TrainingError, match=f"checkpoint-4/{name}.*{needle}.*checkpoint-2"):
        ckpt.check_run_folder(cfg)
    # The undamaged checkpoint still passes.
    assert ckpt.check_run_folder(ToyConfig(output_dir=str(out), max_train_steps=6,
                                           resume_from_checkpoint="checkpoint-2")) == out / "checkpoint-2"


def test_prune_never_removes_the_checkpoint_just_written(tmp_path):
    """A run resumed from an older checkpoint writes steps below those after it: its own stay."""
    for step in (1, 20, 30, 40):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / ckpt.STATE_FILE).write_text("{}")
    assert [p.name for p in ckpt.prune(tmp_path, 3, keep=tmp_path / "checkpoint-1")] == ["checkpoint-20"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-30", "checkpoint-40"]


def test_output_dir_checks(tmp_path, monkeypatch):
    import tempfile

    from engine_toy import ToyConfig

    from customize.training import TrainingError

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", refuse)
        with pytest.raises(TrainingError, match=f"output_dir {tmp_path / 'a' / 'b'} cannot be written .in its nearest "
                                                f"existing folder {tmp_path}.: Permission denied"):
            ckpt.check_writable(tmp_path / "a" / "b")
    ckpt.check_writable(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == [], "the check creates nothing"
    with pytest.raises(TrainingError, match="contradict"):
        ckpt.check_run_folder(ToyConfig(output_dir=str(tmp_path), resume_from_checkpoint="latest",
                                        overwrite_output_dir=True))
    # Settings that do not change what is trained may differ; a folder written another way is the same setting.
    from dataclasses import dataclass

    @dataclass
    class PathConfig(ToyConfig):
        data_dir: str = "data"

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    saved = ckpt.run_settings(PathConfig(output_dir="out", data_dir=str(tmp_path / "data"), seed=5))
    now = PathConfig(output_dir="elsewhere", data_dir="data", logging_steps=3, slow=1.0, validation_steps=2)
    assert ckpt.settings_differences(saved, now) == ["seed (5 in the checkpoint, 0 now)"]
