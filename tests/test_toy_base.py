"""The toy base model's parts: tokenizer vocabulary, training data, the two engine methods and the recipe."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from customize.toy import base, tokenizer as toy_tok, world

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return toy_tok.toy_tokenizer(num_captions=500)


def _tokens(tok, text):
    return tok.convert_ids_to_tokens(tok(text).input_ids)[1:-1]


def test_tokenizer_has_whole_words_for_captions_and_placeholders_but_not_held_out_names(tok):
    captions = [world.base_example(0, i)[1] for i in range(300)]
    for word in {w for c in captions for w in c.split()} | set(toy_tok.PLACEHOLDER_FRIENDLY_WORDS):
        assert _tokens(tok, word) == [f"{word}</w>"], word
    assert _tokens(tok, world.SUBJECT.prompt("green")) == ["a</w>", "sks</w>", "shape</w>", "on</w>", "a</w>", "green</w>", "background</w>"]
    for held in ("cross", "magenta", "stripes", "striped", "plus"):
        assert len(_tokens(tok, held)) > 1, held  # never learned as a word
    ids = tok("a red circle", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == toy_tok.MODEL_MAX_LENGTH and ids[-1] == tok.pad_token_id == tok.eos_token_id


def test_tokenizer_files_load_as_clip_tokenizer_old_and_new(tok, tmp_path):
    from transformers import CLIPTokenizer

    tok.save_pretrained(tmp_path)
    base.write_clip_vocab_files(tok, tmp_path)
    text = "a small sks shape at the top left on a blue background in zwx style"
    assert CLIPTokenizer.from_pretrained(tmp_path)(text).input_ids == tok(text).input_ids
    # The vocab.json + merges.txt pair alone (what older, slow-tokenizer releases read) gives the same ids.
    import shutil

    files_only = tmp_path / "files_only"
    files_only.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (tmp_path / name).exists():
            shutil.copy(tmp_path / name, files_only / name)
    assert CLIPTokenizer.from_pretrained(files_only)(text).input_ids == tok(text).input_ids
    assert json.loads((tmp_path / "vocab.json").read_text())["sks</w>"] == tok.convert_tokens_to_ids("sks</w>")


def test_toy_images_are_deterministic_and_crop():
    ds = base.ToyImages(50, seed=3, clutter_fraction=0.5)
    a, b = ds[7], ds[7]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["text"] == b["text"]
    clutter = [ds.is_clutter(i) for i in range(50)]
    assert 10 < sum(clutter) < 40
    assert all(ds[i]["text"] == "" for i in range(50) if clutter[i])
    assert all(ds[i]["text"] == world.base_example(3, i)[1] for i in range(50) if not clutter[i])
    random.seed(0)
    crop = base.ToyImages(5, crop_size=16)[0]["pixel_values"]
    assert crop.shape == (3, 16, 16) and crop.min() >= -1 and crop.max() <= 1


def test_caption_dropout_rate():
    random.seed(0)
    ds = base.CaptionDropout(base.ToyImages(400), 0.25)
    dropped = sum(ds[i]["text"] == "" for i in range(400)) / 400
    assert 0.18 < dropped < 0.32


def test_vae_loss_is_reconstruction_plus_weighted_kl():
    vae = base.new_vae(0)
    x = torch.stack([base.ToyImages(2)[i]["pixel_values"] for i in range(2)])
    cfg = base.ToyBaseConfig(kl_weight=0.5)
    torch.manual_seed(0)
    out = base.VAEStage().loss(vae, {"pixel_values": x}, cfg)
    assert torch.allclose(out["loss"], out["reconstruction"] + 0.5 * out["kl"])
    torch.manual_seed(0)
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    assert torch.allclose(out["reconstruction"], (recon - x).abs().mean())


def test_committed_vae_scaling_factor_gives_unit_variance_latents():
    """scaling_factor normalises the latents the diffusion model sees: scaling_factor * std(z), z ~ q(z | x), is
    close to 1 on world scenes other than the 512 it was computed on (data seed 0). Measured on 256 scenes of each
    of seeds 1-4: 0.991-1.018; SD's 0.18215 would give 0.29, and a factor off by 2x (either way) 2.0 or 0.5."""
    from diffusers import AutoencoderKL

    from customize.toy import experiments

    if not experiments.base_available():
        pytest.skip("no toy base model in data/toy/base")
    vae = AutoencoderKL.from_pretrained(experiments.BASE_DIR / "vae")
    scaled_std = vae.config.scaling_factor * base.latent_std(vae, n=256, seed=1)
    assert abs(scaled_std - 1) < 0.1, scaled_std


def test_recipe_trains_both_stages_and_saves_a_pipeline_diffusers_loads(tmp_path):
    from diffusers import StableDiffusionPipeline

    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import train_toy_base
    finally:
        sys.path.pop(0)
    result = train_toy_base.main([
        "--output_dir", str(tmp_path / "run"), "--num_train_images", "16", "--vae_train_steps", "2",
        "--unet_train_steps", "2", "--train_batch_size", "4", "--vae_batch_size", "4", "--lr_warmup_steps", "0",
        "--progress", "false", "--checkpointing_steps", "0",
    ])
    folder = Path(result.pipeline_dir)
    assert (folder / "model_index.json").is_file() and (folder / "README.md").is_file()
    assert (folder / "tokenizer" / "vocab.json").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    # scaling_factor is 1 / std of the trained encoder's latents (here about 0.86-1.01, seed to seed), so it makes
    # the latents of other scenes unit-variance too (measured 0.996-1.001); diffusers' default 0.18215 gives 0.18
    assert abs(pipe.vae.config.scaling_factor * base.latent_std(pipe.vae, n=256, seed=1) - 1) < 0.1
    assert {k: pipe.scheduler.config[k] for k in base.SCHEDULER_CONFIG} == base.SCHEDULER_CONFIG
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    # a second run reuses the finished VAE stage
    again = train_toy_base.main(["--output_dir", str(tmp_path / "run"), "--num_train_images", "16",
                                 "--unet_train_steps", "1", "--train_batch_size", "4", "--progress", "false",
                                 "--checkpointing_steps", "0", "--pipeline_dir", str(tmp_path / "p2")])
    assert "vae" not in again.final_loss and Path(again.pipeline_dir).is_dir()
