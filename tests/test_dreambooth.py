"""DreamBooth on the shared engine: SD/SDXL conditioning equal to the pipelines', cached == uncached loss, class
image generation (count, determinism, resume), full fine-tune output that from_pretrained loads to the same
image, frozen modules untouched, atomic output."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from customize.data import collate_examples
from customize.methods import class_images, dreambooth
from customize.models import load_pipeline, tiny_pipeline
from customize.training import parse_config, sd, train

RESOLUTION = 32  # tiny pipelines: sample_size 16 latents, VAE factor 2
PROMPTS = ["a photo of sks dog", "a red circle on the left"]


def _images(folder, n=2, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _pixels(path):
    return np.asarray(Image.open(path)).astype(np.int16)  # signed: differences of uint8 pixels wrap around


def _image(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS[0], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images


def test_sd_conditioning_equals_the_pipeline(tiny_sd):
    with torch.no_grad():
        ours = sd.encode_prompts(tiny_sd, PROMPTS)
        theirs, _ = tiny_sd.encode_prompt(PROMPTS, "cpu", 1, False)
    assert ours.keys() == {"encoder_hidden_states"}
    assert torch.equal(ours["encoder_hidden_states"], theirs)


def test_sdxl_conditioning_and_time_ids_equal_the_pipeline(tiny_sdxl):
    with torch.no_grad():
        ours = sd.encode_prompts(tiny_sdxl, PROMPTS)
        embeds, _, pooled, _ = tiny_sdxl.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(ours["encoder_hidden_states"], embeds) and torch.equal(ours["text_embeds"], pooled)
    ids = sd.time_ids(torch.tensor([[40, 36], [32, 32]]), torch.tensor([[4, 0], [0, 0]]), torch.tensor([[32, 32], [32, 32]]))
    want = tiny_sdxl._get_add_time_ids((40, 36), (4, 0), (32, 32), torch.float32,
                                       tiny_sdxl.text_encoder_2.config.projection_dim)
    assert ids.shape == (2, 6) and torch.equal(ids[:1], want)


def test_latents_are_scaled_samples_of_the_vae_posterior(tiny_sd):
    pixels = torch.rand(2, 3, RESOLUTION, RESOLUTION) * 2 - 1
    with torch.no_grad():
        dist = tiny_sd.vae.encode(pixels).latent_dist
        latents = sd.encode_images(tiny_sd.vae, pixels, torch.Generator().manual_seed(5))
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(latents, (dist.mean + dist.std * noise) * tiny_sd.vae.config.scaling_factor)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_cached_features_give_the_uncached_loss(tmp_path, kind):
    """prepare() replaces images and prompts by VAE moments and text states, encoding train_batch_size images at a
    time; the loss of a batch is unchanged."""
    pipe = tiny_pipeline(kind)
    cfg = dreambooth.DreamBoothConfig(
        pretrained_model_name_or_path=f"tiny-{kind}", instance_data_dir=str(_images(tmp_path / "inst")),
        class_data_dir=str(_images(tmp_path / "cls", 3, seed=1)), class_prompt="a photo of dog",
        with_prior_preservation=True, num_class_images=3, resolution=RESOLUTION, center_crop=True, snr_gamma=5.0,
        noise_offset=0.1, train_batch_size=2,
    )
    dataset = dreambooth.build_dataset(pipe, cfg)
    encoded, encode = [], pipe.vae.encode
    pipe.vae.encode = lambda x, *a, **k: encoded.append(x.shape[0]) or encode(x, *a, **k)
    cached = dreambooth.prepare(pipe, dataset, cfg, accelerator=None)
    del pipe.vae.encode
    # the cache encodes a training batch at a time (a batch that trains fits in memory), every image once
    assert max(encoded) == 2 and sum(encoded) == 2 + 3
    raw_batch = collate_examples([dataset[0], dataset[1]])
    cached_batch = collate_examples([cached[0], cached[1]])
    assert raw_batch["num_prior"] == cached_batch["num_prior"] == 2
    assert "pixel_values" not in cached_batch and "encoder_hidden_states" in cached_batch
    tokenized_batch = {k: v for k, v in raw_batch.items() if k != "prompt"}
    tokenized_batch["input_ids"] = sd.tokenize(pipe, raw_batch["prompt"])  # what a collate may hand over instead
    with torch.no_grad():
        raw = sd.batch_loss(pipe, raw_batch, cfg, torch.Generator().manual_seed(0))
        tokenized = sd.batch_loss(pipe, tokenized_batch, cfg, torch.Generator().manual_seed(0))
        fast = sd.batch_loss(pipe, cached_batch, cfg, torch.Generator().manual_seed(0))
    assert raw.keys() == fast.keys() == tokenized.keys() == {"loss", "instance_loss", "prior_loss"}
    for key in raw:
        torch.testing.assert_close(raw[key], fast[key], rtol=1e-5, atol=1e-6)
        assert torch.equal(raw[key], tokenized[key])


def test_class_images_fill_the_folder_deterministically_and_resume(tmp_path, tiny_sd):
    folder = _images(tmp_path / "cls", 2, seed=3)  # the user's own class pictures count
    kw = dict(sample_batch_size=2, seed=7, resolution=RESOLUTION, num_inference_steps=2, progress=False)
    written = class_images.generate_class_images(tiny_sd, folder, "a photo of dog", 5, **kw)
    assert [p.name for p in written] == [class_images.class_image_name(i) for i in range(3)]
    assert len(class_images.present_images(folder)) == 5
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left
    first = {p.name: _pixels(p) for p in written}
    names = [class_images.class_image_name(i) for i in range(3)]  # seeds 7, 8, 9; drawn in batches [0, 1], [2]

    # an interrupted run: one generated image missing; asking again regenerates exactly it. Image 2 was drawn in a
    # batch of its own and is drawn so again: the same batch shape, so bitwise the same pixels.
    written[2].unlink()
    again = class_images.generate_class_images(tiny_sd, folder, "a photo of dog", 5, **kw)
    assert [p.name for p in again] == [names[2]]
    assert np.array_equal(_pixels(again[0]), first[names[2]])
    assert class_images.generate_class_images(tiny_sd, folder, "a photo of dog", 5, **kw) == []
    assert class_images.generate_class_images(tiny_sd, folder, "a photo of dog", 1, **kw) == []

    # image i depends on its seed only, not on the batch it was generated in. Drawn in batches of 1, image 2 has
    # its batch shape of before: bitwise equal. Images 0 and 1 were drawn in a batch of 2, and batched float32 CPU
    # kernels are not bitwise batch-invariant (the blocking of a matmul or convolution depends on the batch size
    # and the thread count): the pipeline's [0, 1] output moves by about 1e-6 (<= 3e-6 measured with 1 and 2
    # threads), far below one 8-bit level (1/255 = 4e-3), so a pixel can only round to the neighbouring level, and
    # rarely (measured: 0-1 of the 3072 values). Another seed's image differs by about 40 levels on average, so an
    # image drawn from the wrong seed fails this comparison.
    alone = class_images.generate_class_images(tiny_sd, tmp_path / "solo", "a photo of dog", 3,
                                               **{**kw, "sample_batch_size": 1})
    solo = {p.name: _pixels(p) for p in alone}
    assert sorted(solo) == names and np.array_equal(solo[names[2]], first[names[2]])
    for name in names[:2]:
        diff = np.abs(solo[name] - first[name])
        assert diff.max() <= 1 and diff.mean() < 0.01, (name, diff.max(), diff.mean())
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert np.abs(first[names[i]] - first[names[j]]).mean() > 10, (i, j)  # the seeds give different images


def test_class_images_take_their_own_guidance_scale(tmp_path, tiny_sd):
    kw = dict(sample_batch_size=2, seed=7, resolution=RESOLUTION, num_inference_steps=2, progress=False)
    pixels = {}
    for name, extra in (("default", {}), ("7.5", {"guidance_scale": 7.5}), ("1.0", {"guidance_scale": 1.0})):
        (written,) = class_images.generate_class_images(tiny_sd, tmp_path / name, "a photo of dog", 1, **kw, **extra)
        pixels[name] = _pixels(written)
    assert np.array_equal(pixels["default"], pixels["7.5"])  # unset: the pipeline's own default
    assert np.abs(pixels["default"] - pixels["1.0"]).mean() > 1  # guidance 1: the conditional prediction alone


def test_full_dreambooth_output_loads_with_from_pretrained(tmp_path):
    """Recipe steps with prior preservation and a trained text encoder; the saved folder reproduces the
    in-memory model's image, the VAE is bitwise unchanged, and validation images were recorded."""
    args = [
        "--pretrained_model_name_or_path", "tiny-sd", "--instance_data_dir", str(_images(tmp_path / "inst")),
        "--with_prior_preservation", "--class_data_dir", str(tmp_path / "cls"), "--class_prompt", "a photo of dog",
        "--num_class_images", "2", "--class_inference_steps", "2", "--resolution", str(RESOLUTION),
        "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2", "--learning_rate", "1e-3",
        "--train_text_encoder", "--validation_prompt", "a photo of sks dog", "--num_validation_images", "1",
        "--validation_inference_steps", "2", "--validation_steps", "2", "--report_to", "none", "--progress", "false",
    ]
    cfg = parse_config(dreambooth.DreamBoothConfig, args)
    pipe = load_pipeline(cfg.pretrained_model_name_or_path)
    vae_before = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    te_before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    base_image = _image(pipe)
    result = train(dreambooth, pipe, dreambooth.build_dataset(pipe, cfg), cfg)

    assert result.global_step == 2 and "prior_loss" in result.logs[-1] and result.validation_images
    assert all(torch.equal(v, pipe.vae.state_dict()[k]) for k, v in vae_before.items())
    assert any(not torch.equal(v, pipe.unet.state_dict()[k]) for k, v in unet_before.items())
    assert not torch.equal(te_before, pipe.text_encoder.get_input_embeddings().weight)
    trained_image = _image(pipe)
    assert np.abs(trained_image - base_image).max() > 1e-3

    out = tmp_path / "out"
    assert "a photo of sks dog" in (out / "README.md").read_text()
    loaded = DiffusionPipeline.from_pretrained(str(out))
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    assert np.abs(_image(loaded) - trained_image).max() <= 1e-4


def test_full_dreambooth_sdxl_trains_the_unet_only(tmp_path):
    cfg = dreambooth.DreamBoothConfig(
        pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=str(_images(tmp_path / "inst")),
        resolution=RESOLUTION, output_dir=str(tmp_path / "out"), max_train_steps=2, learning_rate=1e-3,
        random_flip=True, report_to="none", progress=False,
    )
    pipe = load_pipeline(cfg.pretrained_model_name_or_path)
    frozen = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
              for name in ("vae", "text_encoder", "text_encoder_2")}
    train(dreambooth, pipe, dreambooth.build_dataset(pipe, cfg), cfg)
    for name, before in frozen.items():
        assert all(torch.equal(v, getattr(pipe, name).state_dict()[k]) for k, v in before.items()), name
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    assert np.abs(_image(loaded) - _image(pipe)).max() <= 1e-4


def test_interrupted_pipeline_save_leaves_no_partial_model(tmp_path, tiny_sd, monkeypatch):
    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    cfg = dreambooth.DreamBoothConfig(pretrained_model_name_or_path="tiny-sd")
    with monkeypatch.context() as m:
        m.setattr(type(tiny_sd.vae), "save_pretrained", broken)
        with pytest.raises(OSError, match="disk full"):
            dreambooth.save(tiny_sd, cfg, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []

    out = tmp_path / "out"
    dreambooth.save(tiny_sd, cfg, out)
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (out / "old_part").mkdir()  # a component the old model_index.json names and the new pipeline lacks
    index = json.loads((out / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps({**index, "old_part": ["x", "Y"]}))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with monkeypatch.context() as m:
        m.setattr(type(tiny_sd.vae), "save_pretrained", broken)
        with pytest.raises(OSError, match="disk full"):
            dreambooth.save(tiny_sd, cfg, out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # the old pipeline, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing left beside it

    dreambooth.save(tiny_sd, cfg, out)  # over the old one: swapped in whole, checkpoints carried over
    assert (out / "checkpoint-3" / "trainer_state.json").read_text() == "{}"
    assert not (out / "old_part").exists() and "old_part" not in (out / "model_index.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not list(out.glob(".*"))
    modes = {oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_file()}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == {oct(0o666 & ~umask)}  # safetensors' save_file alone makes 0600 files


def test_configuration_errors_say_what_to_do(tmp_path, tiny_sd):
    with pytest.raises(ValueError, match="--class_data_dir and --class_prompt"):
        dreambooth.DreamBoothConfig(with_prior_preservation=True)
    with pytest.raises(ValueError, match="multiple of the VAE downsampling factor 2; use 32 or 34"):
        dreambooth.build_dataset(tiny_sd, dreambooth.DreamBoothConfig(instance_data_dir=str(tmp_path), resolution=33))
    with pytest.raises(ValueError, match="instance_data_dir is required"):
        dreambooth.build_dataset(tiny_sd, dreambooth.DreamBoothConfig(resolution=RESOLUTION))
