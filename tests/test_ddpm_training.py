"""Pixel-space DDPM training: the datasets (bad input included), Algorithm 1's loss, the recipe end to end on the
shared engine (files that load in diffusers), and a SIGKILLed run resuming to the uninterrupted weights."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from customize.core import DDPMScheduler, UNet, UNetConfig, ddpm_loss
from customize.data.folder import DigitsDataset, ImageFolderDataset
from customize.data.images import ImageError
from customize.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_ddpm.py"
TINY = ["--block_out_channels", "8", "16", "--layers_per_block", "1", "--attention_levels", "1",
        "--attention_head_dim", "8", "--norm_num_groups", "4", "--ddpm_num_steps", "50", "--report_to", "none",
        "--progress", "false"]


# ---------------------------------------------------------------------------------------------------------------
# Datasets and bad input
# ---------------------------------------------------------------------------------------------------------------


def _write_mixed_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (12, 10, 3), dtype=np.uint8), "RGB").save(folder / "rgb.png")
    Image.fromarray(rng.randint(0, 256, (9, 9), dtype=np.uint8), "L").save(folder / "gray.png")
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., 0], rgba[2:8, 2:8, 3] = 200, 255  # red square on a transparent background
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    ramp = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600)  # 0..59400: 16-bit grey
    deep = Image.fromarray(ramp.astype(np.uint16))
    assert deep.mode.startswith("I;16")
    deep.save(folder / "deep.png")
    Image.fromarray(rng.randint(0, 256, (3, 2, 3), dtype=np.uint8), "RGB").save(folder / "tiny.jpg")
    Image.fromarray(rng.randint(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").convert("P").save(folder / "palette.gif")
    (folder / "notes.txt").write_text("not an image, ignored")


@pytest.mark.parametrize("channels", [3, 1])
def test_image_folder_reads_every_mode(tmp_path, channels):
    _write_mixed_folder(tmp_path / "mixed")
    ds = ImageFolderDataset(tmp_path / "mixed", resolution=8, channels=channels)
    assert len(ds) == 6 and ds.classes == [] and ds.num_classes == 1
    for i in range(len(ds)):
        ex = ds[i]
        assert ex["pixel_values"].shape == (channels, 8, 8) and ex["pixel_values"].dtype == torch.float32
        assert ex["pixel_values"].min() >= -1 and ex["pixel_values"].max() <= 1 and int(ex["class_labels"]) == 0
    deep = ds[[p.name for p in ds.files].index("deep.png")]["pixel_values"]
    assert deep.std() > 0.3  # the 16-bit ramp is rescaled, not clipped to white
    rgba = ds[[p.name for p in ds.files].index("rgba.png")]["pixel_values"]
    assert rgba.max() == 1.0 and rgba.min() < 0  # transparent border composited on white, square stays dark


def test_image_folder_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageError, match="empty"):
        ImageFolderDataset(empty, resolution=8)
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderDataset(tmp_path / "missing", resolution=8)
    bad = tmp_path / "bad"
    _write_mixed_folder(bad)
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    with pytest.raises(ImageError, match="corrupt.png") as err:
        ImageFolderDataset(bad, resolution=8)
    assert err.value.__suppress_context__  # the PIL traceback is not chained under ours
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(truncated / "ok.png")
    (truncated / "cut.png").write_bytes((truncated / "ok.png").read_bytes()[:60])
    with pytest.raises(ImageError, match="cut.png"):
        ImageFolderDataset(truncated, resolution=8)


def test_class_folders_give_labels_and_bad_layouts_are_refused(tmp_path):
    root = tmp_path / "classes"
    for name, n in (("cat", 2), ("dog", 1)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (9, 9), (40 * i, 0, 0)).save(root / name / f"{i}.png")
    ds = ImageFolderDataset(root, resolution=4, class_conditional=True, random_flip=True)
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 1]
    (root / "empty_class").mkdir()
    with pytest.raises(ImageError, match="empty_class"):
        ImageFolderDataset(root, resolution=4, class_conditional=True)
    (root / "empty_class").rmdir()
    Image.new("RGB", (9, 9)).save(root / "loose.png")
    with pytest.raises(ImageError, match="loose.png"):
        ImageFolderDataset(root, resolution=4, class_conditional=True)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (9, 9)).save(flat / "a.png")
    with pytest.raises(ImageError, match="no class sub-folders"):
        ImageFolderDataset(flat, resolution=4, class_conditional=True)


def test_digits_dataset():
    ds = DigitsDataset()
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.channels == 1
    x = ds.images
    assert x.shape == (1797, 1, 8, 8) and x.min() == -1 and x.max() == 1
    padded = DigitsDataset(resolution=12)
    assert padded.images.shape == (1797, 1, 12, 12)
    assert torch.equal(padded.images[:, :, 2:10, 2:10], x) and (padded.images[:, :, :2] == -1).all()
    assert sorted(set(ds.labels.tolist())) == list(range(10))


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 1
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_ddpm_loss_is_algorithm_1(prediction_type, snr_gamma):
    unet = UNet(UNetConfig(in_channels=1, out_channels=1, channels=(8, 16), layers_per_level=1,
                           down_attention=(False, True), norm_groups=4, num_class_embeds=3))
    sched = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    y = torch.tensor([0, 1, 2, 1])
    loss = ddpm_loss(unet, sched, x0, y, noise=eps, timesteps=t, snr_gamma=snr_gamma)["loss"]
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    target = {"epsilon": eps, "sample": x0, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction_type]
    per_sample = (unet(x_t, t, y) - target).square().flatten(1).mean(1)
    if snr_gamma:
        snr = (ab / (1 - ab)).flatten()
        clipped = snr.clamp(max=snr_gamma)
        per_sample = per_sample * {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]
    torch.testing.assert_close(loss, per_sample.mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in unet.parameters())


# ---------------------------------------------------------------------------------------------------------------
# The recipe on the shared engine
# ---------------------------------------------------------------------------------------------------------------


def test_recipe_unconditional_folder_loads_in_diffusers(tmp_path):
    import diffusers

    from customize.methods.ddpm import load_ddpm

    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import train_ddpm
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    data = tmp_path / "data"
    _write_mixed_folder(data)
    out = tmp_path / "run"
    model, result = train_ddpm.main(["--train_data_dir", str(data), "--resolution", "8", "--output_dir", str(out),
                                     "--max_train_steps", "4", "--train_batch_size", "3", "--validation_steps", "2",
                                     "--num_validation_images", "4", "--ddpm_num_inference_steps", "2",
                                     "--checkpointing_steps", "2", "--use_ema", "false", *TINY])
    assert result.global_step == 4 and len(result.losses) == 4 and all(np.isfinite(result.losses))
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000002.png", "step-000004.png"]
    assert Image.open(out / "validation" / "step-000004.png").size == (16, 16)  # 2x2 grid of 8 px samples
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]

    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 8, 8, 3)
    ours = load_ddpm(out)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours.unet(x, torch.tensor([3, 40])), pipe.unet(x, torch.tensor([3, 40])).sample,
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.unet(x, 7), model.unet(x, 7), rtol=0, atol=0)  # saved == trained
    assert ours.noise_scheduler.config.num_train_timesteps == 50


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(RECIPE), "--dataset_name", "digits", "--class_conditional", "--output_dir", str(out),
            "--max_train_steps", "120", "--checkpointing_steps", "20", "--train_batch_size", "8",
            "--validation_steps", "60", "--num_validation_images", "2", "--ddpm_num_inference_steps", "2",
            "--dropout", "0.1", "--ema_decay", "0.9", *TINY, *extra]


# The recipe run with DDPM given an after_step hook that sleeps (the method has none; the engine calls it after each
# optimizer step and it touches no weight or RNG), as tests/engine_toy.py's --slow does for tests/test_resume.py.
# Usage: python -c SLOW_RECIPE SECONDS RECIPE [flags].
SLOW_RECIPE = ("import runpy, sys, time; from customize.methods.ddpm import DDPM; seconds = float(sys.argv.pop(1)); "
               "DDPM.after_step = lambda self, model, cfg, step: time.sleep(seconds); "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    # The run to kill sleeps 0.25 s after each step, so the kill lands between checkpoint 20 and the end (100 more
    # steps: over 25 s), however fast the machine.
    slow = [sys.executable, "-c", SLOW_RECIPE, "0.25", *_command(cut)[1:]]
    proc = subprocess.Popen(slow, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while not ckpt.list_checkpoints(cut):
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its first checkpoint:\n{proc.stdout.read().decode()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("no checkpoint appeared within 180 s")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (cut / "model_index.json").exists(), "the run finished before it was killed"
    assert ckpt.checkpoint_step(ckpt.list_checkpoints(cut)[-1]) < 120

    done = subprocess.run(_command(ref), env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    resumed = subprocess.run(_command(cut, "--resume_from_checkpoint", "latest"), env=_env(), cwd=ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    weights = Path("unet") / "diffusion_pytorch_model.safetensors"
    assert (cut / weights).read_bytes() == (ref / weights).read_bytes()  # EMA weights, bitwise
    assert (cut / "validation" / "step-000120.png").read_bytes() == (ref / "validation" / "step-000120.png").read_bytes()
