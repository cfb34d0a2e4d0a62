"""Training runs refused for what a user can fix, run as a user runs them (tests/bad_input.py: exit status 1, one
`error:` line naming the problem, no traceback, nothing written or left behind): an output folder holding another
run's checkpoints, a resume from a checkpoint of other settings, past the requested end or damaged, a run that
diverged, an output folder that cannot be written. And a LoRA run SIGKILLed during its final save over an earlier
LoRA: the folder holds the old LoRA or the new one, whole, and the next run removes what the kill left.

Most cases run the toy method (tests/engine_toy.py, a few seconds a process); the LoRA cases the toy pipeline."""

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch
from bad_input import ROOT, TOY, Run, assert_refused, env, listing, recipe
from safetensors.torch import load_file

from customize.formats.lora import LORA_WEIGHT_NAME
from customize.training import checkpoint as ckpt

TOY_SCRIPT = ROOT / "tests" / "engine_toy.py"
SUBJECT = ROOT / "data" / "toy" / "subject"


def toy(out, *args) -> Run:
    """`python tests/engine_toy.py --output_dir OUT ARGS` (the toy method's recipe)."""
    done = subprocess.run([sys.executable, str(TOY_SCRIPT), "--output_dir", str(out), *map(str, args)], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=600)
    return Run(done.returncode, done.stdout, done.stderr)


def ok(run: Run) -> Run:
    assert run.returncode == 0, run.output
    return run


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_an_output_dir_holding_another_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    """The old run's checkpoints are neither pruned in place of the new run's nor resumed under its settings."""
    out = tmp_path / "a"
    ok(toy(out, "--max_train_steps", 40, "--checkpointing_steps", 10))
    first = (out / "hash-0.txt").read_text()
    other = ["--n_examples", 5, "--checkpointing_steps", 1, "--checkpoints_total_limit", 3, "--max_train_steps", 5]
    before = listing(out)
    assert_refused(toy(out, *other), f"output_dir {out} already holds checkpoints", "checkpoint-40",
                   "--resume_from_checkpoint latest", "--overwrite_output_dir")
    assert_refused(toy(out, *other, "--resume_from_checkpoint", "latest"), "checkpoint-40", "other settings",
                   "n_examples (8 in the checkpoint, 5 now)")
    assert listing(out) == before

    # What writes killed midway leave (atomic_path temporaries, a checkpoint save), beside a user's own hidden file.
    leftovers = [out / ".toy.safetensors.k2j4x9q0.tmp", out / ".checkpoint-50.tmp" / "optimizer.bin",
                 out / "validation" / ".step-000010.png.a1b2c3d4.tmp"]
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("partial")
    (out / ".notes.tmp").write_text("not a temporary write")
    ok(toy(out, *other, "--overwrite_output_dir"))
    # The old checkpoints are gone, the new ones pruned to the limit (none of them as soon as it was written).
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]
    assert (out / "hash-0.txt").read_text() != first
    assert hidden(out) == [".notes.tmp"] and not list((out / "validation").iterdir())


def test_a_diverged_run_checkpoints_nothing_non_finite(tmp_path):
    """A weight turns NaN after step 3 (the loss of step 3 was still finite): checkpoint-3 is not written and the
    error names the last finite checkpoint (tests/test_engine.py resumes from it)."""
    out = tmp_path / "d"
    assert_refused(toy(out, "--checkpointing_steps", 1, "--max_train_steps", 5, "--poison_after", 3),
                   "not finite after step 3", f"the last finite checkpoint is {out / 'checkpoint-2'}", "learning_rate")
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "toy.safetensors").exists() and not hidden(out)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A toy run with checkpoint-2 and checkpoint-4 (the default settings otherwise)."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    ok(toy(out, "--max_train_steps", 4, "--checkpointing_steps", 2))
    return out


def _without_step(path):
    state = json.loads(path.read_text())
    del state["global_step"]
    path.write_text(json.dumps(state))


@pytest.mark.parametrize("name, damage, needle", [
    ("random_states_0.pkl", lambda p: p.write_bytes(b"\x80\x04garbage"), "is truncated or not a torch file"),
    ("trainer_state.json", _without_step, "holds no step count"),
], ids=["rng-state-garbage", "state-without-step"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, checkpointed, name, damage, needle):
    """accelerate skips an unreadable RNG-state file with a log line (the run then differs from an uninterrupted
    one); every damaged file is refused instead, with the other checkpoint offered (more damage in
    tests/test_resume.py)."""
    out = tmp_path / "run"
    shutil.copytree(checkpointed, out)
    damage(out / "checkpoint-4" / name)
    before = listing(out)
    assert_refused(toy(out, "--max_train_steps", 6, "--resume_from_checkpoint", "latest"),
                   f"{out / 'checkpoint-4' / name} {needle}", "damaged", "checkpoint-2")
    assert listing(out) == before


def test_a_resume_past_the_requested_end_is_refused(checkpointed):
    before = listing(checkpointed)
    assert_refused(toy(checkpointed, "--max_train_steps", 2, "--resume_from_checkpoint", "latest"),
                   "checkpoint-4 is at step 4, past max_train_steps=2", "--max_train_steps 4")
    assert listing(checkpointed) == before


def test_an_unwritable_output_dir_is_refused_before_the_model_loads(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    run = recipe("train_dreambooth_lora", *TOY, "--instance_data_dir", SUBJECT, "--instance_prompt", "a photo of sks",
                 "--max_train_steps", 1, "--output_dir", blocker / "out")
    assert_refused(run, f"output_dir {blocker / 'out'} cannot be created", f"{blocker} exists and is not a folder")
    assert "Loading pipeline components" not in run.output
    assert listing(tmp_path) == {"file": len("not a folder")}


def test_sigkill_during_the_final_lora_save_leaves_the_old_lora_or_the_new_one(tmp_path):
    """A second LoRA run into the folder of a first is killed while its final file is complete but not yet in
    place (a test-only pause in customize.utils.atomic_path, CUSTOMIZE_TEST_SWAP_PAUSE): the folder still holds the
    first LoRA, whole; the next run removes the temporary file and writes its LoRA whole. Then a resume with
    another rank is refused, naming it."""
    out = tmp_path / "lora"
    weights = out / LORA_WEIGHT_NAME
    args = [*TOY, "--instance_data_dir", SUBJECT, "--instance_prompt", "a photo of sks", "--max_train_steps", 1,
            "--output_dir", out]
    ok(recipe("train_dreambooth_lora", *args, "--checkpointing_steps", 0))
    old = weights.read_bytes()
    (tmp_path / "old.safetensors").write_bytes(old)

    marker, log = tmp_path / "paused", tmp_path / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "recipes" / "train_dreambooth_lora.py"), *map(str, args),
             "--checkpointing_steps", "0", "--seed", "1"],
            cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
            env=env(CUSTOMIZE_TEST_SWAP_PAUSE=f"publish-{LORA_WEIGHT_NAME}:{marker}"))
        deadline = time.time() + 300
        while not marker.exists():
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the run did not reach its final save:\n{log.read_text()}")
            time.sleep(0.05)
        proc.kill()  # SIGKILL
        proc.wait()
    assert weights.read_bytes() == old and load_file(weights)
    (tmp,) = hidden(out)
    assert tmp.startswith(f".{LORA_WEIGHT_NAME}.") and tmp.endswith(".tmp")
    killed = load_file(out / tmp)  # complete, never renamed
    assert killed.keys() == load_file(weights).keys()

    ok(recipe("train_dreambooth_lora", *args, "--checkpointing_steps", 1, "--seed", 1))
    assert not hidden(out)
    new = load_file(weights)  # the same run again: the new LoRA, whole
    assert new.keys() == killed.keys() and all(torch.equal(new[k], killed[k]) for k in new)
    assert not all(torch.equal(new[k], v) for k, v in load_file(tmp_path / "old.safetensors").items())

    before = listing(out)
    assert_refused(recipe("train_dreambooth_lora", *args, "--seed", 1, "--rank", 8, "--resume_from_checkpoint",
                          "latest"),
                   "checkpoint-1 was written by a run with other settings", "rank (4 in the checkpoint, 8 now)")
    assert listing(out) == before
