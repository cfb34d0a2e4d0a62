"""A full DreamBooth run killed with SIGKILL during its final save, over the output of an earlier run, leaves a
folder that loads as the old model or the new one, never a mix (a new text encoder beside the old UNet), and
the next run removes what the killed one left. The kill lands where it should through the writer's test-only
pause (customize.utils.TEST_PAUSE_ENV): it stops at a stage, touches a marker file and sleeps."""

import hashlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from bad_input import ROOT, TOY, env
from customize.utils import SWAP_MANIFEST, TEST_PAUSE_ENV

RUN = ["--max_train_steps", "1", "--train_text_encoder"]


def _command(data, out, seed):
    return [sys.executable, str(ROOT / "recipes" / "train_dreambooth.py"), *TOY, "--instance_data_dir", str(data),
            "--output_dir", str(out), "--seed", str(seed), *RUN]


def _weights(out):
    """{file: sha256} of the pipeline's weights and configs (model_index.json and the folders it names)."""
    import json

    parts = [k for k, v in json.loads((out / "model_index.json").read_text()).items() if isinstance(v, list)]
    files = [out / "model_index.json"] + [p for part in parts for p in sorted((out / part).rglob("*")) if p.is_file()]
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _killed_at(stage, data, out, seed, tmp_path):
    marker = tmp_path / f"paused-{stage}"
    proc = subprocess.Popen(_command(data, out, seed), cwd=ROOT, env=env(**{TEST_PAUSE_ENV: f"{stage}:{marker}"}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the {stage!r} stage of its save:\n{proc.stdout.read().decode()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"the save did not reach the {stage!r} stage within 300 s")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_during_the_final_save_leaves_the_old_model_or_the_new_one(tmp_path):
    from diffusers import DiffusionPipeline

    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
    subprocess.run(_command(data, out, 0), cwd=ROOT, env=env(), check=True, capture_output=True)
    old = _weights(out)

    # killed while the folder's other files (the model card here; checkpoints, logs) are carried into the new
    # folder: the old pipeline, whole
    _killed_at("carried", data, out, 1, tmp_path)
    assert _weights(out) == old
    DiffusionPipeline.from_pretrained(str(out))

    # killed once the new folder is in place, before the old one is removed: the new pipeline, whole
    _killed_at("swapped", data, out, 1, tmp_path)
    new = _weights(out)
    changed = {name for name in new if new[name] != old.get(name)}
    assert any(n.startswith("unet/") for n in changed) and any(n.startswith("text_encoder/") for n in changed)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "expected the old folder beside it"

    # the next run finishes the job: the same new model, the model card kept, nothing left over
    done = subprocess.run(_command(data, out, 1), cwd=ROOT, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _weights(out) == new
    assert (out / "README.md").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not (out / SWAP_MANIFEST).exists()
    DiffusionPipeline.from_pretrained(str(out))


def test_swap_without_an_exchange_call_and_its_recovery(tmp_path, monkeypatch):
    """Where the system cannot exchange two paths in one step, the swap is two renames; a process killed between
    them leaves the new folder complete beside a missing one, which recover_dir puts in place."""
    import json

    from customize import utils

    monkeypatch.setattr(utils, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "X"]}))
    (out / "unet").mkdir()
    (out / "unet" / "w").write_text("old")
    (out / "checkpoint-1").mkdir()
    with utils.atomic_pipeline_dir(out) as tmp:
        (tmp / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "X"]}))
        (tmp / "unet").mkdir()
        (tmp / "unet" / "w").write_text("new")
    assert (out / "unet" / "w").read_text() == "new" and (out / "checkpoint-1").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not (out / SWAP_MANIFEST).exists()

    # the state between the two renames: `out` moved aside, the complete new folder (with its manifest) beside it
    new, old = tmp_path / ".out.new", tmp_path / ".out.old"
    out.rename(old)
    new.mkdir()
    (new / "unet").mkdir()
    (new / "unet" / "w").write_text("newer")
    (new / SWAP_MANIFEST).write_text(json.dumps(["unet"]))
    utils.recover_dir(out)
    assert (out / "unet" / "w").read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not (out / SWAP_MANIFEST).exists()
