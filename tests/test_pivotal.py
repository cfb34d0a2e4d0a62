"""Pivotal tuning (new tokens + LoRA) on tiny SD and SDXL pipelines: files that load in a fresh diffusers
pipeline, the embedding stop after train_text_encoder_ti_frac (also across a resume), prompts and errors."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from customize.data import ImageCaptionDataset, PairedDataset
from customize.methods import lora
from customize.methods.pivotal import AbstractionPrompts, PivotalConfig, PivotalTuning
from customize.models import tiny_pipeline
from customize.training import train

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 32  # tiny_pipeline images are sample_size * 2 pixels
EMBEDDING_KEY = "token_embedding.weight"


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_images(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def config(tmp_path, **kw) -> PivotalConfig:
    base = dict(
        output_dir=str(tmp_path / "out"), instance_data_dir=str(make_images(tmp_path / "data")),
        instance_prompt="a photo of TOK dog", resolution=RESOLUTION, max_train_steps=4, learning_rate=2e-2,
        report_to="none", progress=False, checkpointing_steps=1,
    )
    base.update(kw)
    return PivotalConfig(**base)


def run(cfg: PivotalConfig, kind: str = "sd"):
    pipe = tiny_pipeline(kind)
    method = PivotalTuning()
    train(method, pipe, lora.build_dataset(pipe, cfg), cfg)
    return pipe, method


def checkpoint_tensors(out: Path, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the first text encoder's embedding matrix, the UNet LoRA tensors) saved at `step`."""
    tensors = load_file(str(out / f"checkpoint-{step}" / "trainable.safetensors"))
    embedding = [v for k, v in tensors.items() if k.startswith("text_encoder.") and k.endswith(EMBEDDING_KEY)]
    assert len(embedding) == 1, sorted(tensors)
    return embedding[0], {k: v for k, v in tensors.items() if k.startswith("unet.")}


def render(pipe, prompt: str) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.mark.parametrize("kind, train_text_encoder", [("sd", True), ("sdxl", False)])
def test_recipe_lora_and_embedding_load_in_a_fresh_pipeline_with_same_image(kind, train_text_encoder, tmp_path):
    out = tmp_path / "out"
    argv = [
        "--pretrained_model_name_or_path", f"tiny-{kind}", "--instance_data_dir", str(make_images(tmp_path / "data")),
        "--instance_prompt", "a photo of TOK dog", "--output_dir", str(out), "--resolution", str(RESOLUTION),
        "--max_train_steps", "3", "--learning_rate", "0.02", "--report_to", "none", "--progress", "false",
        "--checkpointing_steps", "0", "--train_text_encoder_ti_frac", "1.0",
    ] + (["--train_text_encoder"] if train_text_encoder else [])
    pipe, result = load_recipe("train_pivotal").main(argv)
    assert result.global_step == 3
    names = {p.name for p in out.iterdir()}
    assert {"pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "s0.safetensors"} <= names
    assert ("learned_embeds_2.safetensors" in names) == (kind == "sdxl")
    lora_keys = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("text_encoder.") for k in lora_keys) == train_text_encoder

    prompt = "a photo of <s0> dog"
    in_memory = render(pipe, prompt)
    fresh = tiny_pipeline(kind)
    fresh.load_lora_weights(str(out))
    fresh.load_textual_inversion(str(out), token="<s0>")
    if kind == "sdxl":
        fresh.load_textual_inversion(str(out), weight_name="learned_embeds_2.safetensors", token="<s0>",
                                     text_encoder=fresh.text_encoder_2, tokenizer=fresh.tokenizer_2)
    assert np.abs(in_memory - render(fresh, prompt)).max() <= 1e-4
    # Neither half alone reproduces it: both the tokens and the LoRA were trained.
    lora_only = tiny_pipeline(kind)
    lora_only.load_lora_weights(str(out))
    assert np.abs(in_memory - render(lora_only, "a photo of dog")).max() > 1e-3
    assert np.abs(in_memory - render(tiny_pipeline(kind), "a photo of dog")).max() > 1e-3


def test_kohya_lora_beside_the_embeddings_keeps_its_own_name_and_the_new_word_as_trigger(tmp_path):
    """--lora_format kohya: the LoRA part goes through customize.formats' writer like LoRA's; an output folder named
    like the single-file embedding (s0) does not let one file replace the other; the trigger is the new word."""
    from safetensors import safe_open

    from customize.formats import read_lora

    cfg = config(tmp_path, output_dir=str(tmp_path / "s0"), lora_format="kohya", max_train_steps=2,
                 checkpointing_steps=0, train_text_encoder_ti_frac=1.0)
    pipe, _ = run(cfg)
    out = tmp_path / "s0"
    assert {p.name for p in out.glob("*.safetensors")} == {"s0_lora.safetensors", "s0.safetensors", "learned_embeds.safetensors"}
    assert read_lora(out / "s0_lora.safetensors").format == "kohya"
    assert 'weight_name="s0_lora.safetensors"' in (out / "README.md").read_text()
    with safe_open(str(out / "s0_lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.trigger_phrase"] == "<s0>" and meta["ss_placeholder_token"] == "<s0>"
    assert meta["ss_base_model_version"] == "sd_v1"
    prompt = "a photo of <s0> dog"
    fresh = tiny_pipeline("sd")
    fresh.load_lora_weights(str(out), weight_name="s0_lora.safetensors")
    fresh.load_textual_inversion(str(out), token="<s0>")
    assert np.abs(render(pipe, prompt) - render(fresh, prompt)).max() <= 1e-4


def test_embeddings_stop_after_the_fraction_and_lora_goes_on(tmp_path):
    cfg = config(tmp_path, train_text_encoder_ti_frac=0.5, adam_weight_decay=0.5)
    assert cfg.embedding_steps == 2
    pipe, method = run(cfg)
    out = Path(cfg.output_dir)
    steps = {k: checkpoint_tensors(out, k) for k in range(1, 5)}
    base = tiny_pipeline("sd").text_encoder.get_input_embeddings().weight.detach()
    rows = base.shape[0]
    for k, (embedding, _) in steps.items():
        assert torch.equal(embedding[:rows], base), f"step {k}: a vocabulary row changed"
    assert not torch.equal(steps[1][0][rows:], steps[2][0][rows:]), "the embeddings did not train before the stop"
    assert torch.equal(steps[2][0], steps[3][0]) and torch.equal(steps[3][0], steps[4][0]), "embeddings moved after the stop"
    unet_3, unet_4 = steps[3][1], steps[4][1]
    assert unet_3 and any(not torch.equal(unet_3[k], unet_4[k]) for k in unet_3), "the LoRA stopped too"
    assert torch.equal(method.tokens.embeddings()["text_encoder"], steps[4][0][rows:])


def test_resume_after_the_stop_matches_an_uninterrupted_run(tmp_path):
    """A run resumed past the stop must keep the embeddings fixed from its first step (the counter comes from
    the checkpoint), and end bitwise where the uninterrupted run ended."""
    cfg = config(tmp_path, train_text_encoder_ti_frac=0.5)
    _, straight = run(cfg)
    final = checkpoint_tensors(Path(cfg.output_dir), 4)
    _, resumed = run(config(tmp_path, train_text_encoder_ti_frac=0.5, resume_from_checkpoint="checkpoint-3"))
    assert resumed.step == 4
    again = checkpoint_tensors(Path(cfg.output_dir), 4)
    assert torch.equal(final[0], again[0])
    assert all(torch.equal(final[1][k], again[1][k]) for k in final[1])


def test_the_step_count_is_method_state_kept_with_the_checkpoints(tmp_path):
    """The engine saves PivotalTuning's step count in each checkpoint and hands it back on resume (the method reads
    no checkpoint itself)."""
    cfg = config(tmp_path, max_train_steps=2)
    run(cfg)
    for step in (1, 2):
        saved = json.loads((Path(cfg.output_dir) / f"checkpoint-{step}" / "method_state.json").read_text())
        assert saved == {"state": {"step": step}, "tensors": []}
    method = PivotalTuning()
    method.load_state_dict({"step": 7})
    assert method.step == 7 and method.state_dict() == {"step": 7}


def test_param_groups_use_text_encoder_lr(tmp_path):
    cfg = config(tmp_path, train_text_encoder=True, learning_rate=1e-4, text_encoder_lr=5e-4)
    pipe = tiny_pipeline("sdxl")
    unet_group, text_group = PivotalTuning().trainable_parameters(pipe, cfg)
    assert unet_group["lr"] == 1e-4 and text_group["lr"] == 5e-4
    unet_ids = {id(p) for p in pipe.unet.parameters()}
    assert all(id(p) in unet_ids for p in unet_group["params"])
    embeddings = {id(te.get_input_embeddings().weight) for te in (pipe.text_encoder, pipe.text_encoder_2)}
    assert embeddings <= {id(p) for p in text_group["params"]}
    assert any(id(p) not in embeddings for p in text_group["params"]), "the text-encoder LoRA is missing"


def test_text_encoder_lr_unset_is_learning_rate_and_zero_or_negative_is_refused(tmp_path):
    cfg = config(tmp_path, learning_rate=2e-4)
    assert cfg.text_encoder_lr is None
    assert [g["lr"] for g in PivotalTuning().trainable_parameters(tiny_pipeline("sd"), cfg)] == [2e-4, 2e-4]
    for bad in (0.0, -1e-4, float("nan")):
        with pytest.raises(ValueError, match=r"text_encoder_lr must be > 0.*leave it out for the same as learning_rate"):
            config(tmp_path, text_encoder_lr=bad)
    with pytest.raises(ValueError, match="learning_rate must be > 0, got 0"):
        config(tmp_path, learning_rate=0.0)


def test_abstraction_prompts_rewrite_instance_and_class_parts(tmp_path):
    data = make_images(tmp_path / "data", n=2)
    instance = ImageCaptionDataset.from_folder(data, RESOLUTION, prompt="a photo of TOK dog, TOKEN TOK.")
    classes = ImageCaptionDataset.from_folder(data, RESOLUTION, prompt="a photo of dog")
    paired = AbstractionPrompts(PairedDataset(instance, classes), "TOK", "<s0> <s0>_1")
    item = paired[1]
    assert item["instance"]["prompt"] == "a photo of <s0> <s0>_1 dog, TOKEN <s0> <s0>_1."
    assert item["class"]["prompt"] == "a photo of dog"
    assert AbstractionPrompts(instance, "TOK", "<s0>")[0]["prompt"] == "a photo of <s0> dog, TOKEN <s0>."


def test_bad_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not contain the token abstraction 'TOK'"):
        config(tmp_path, instance_prompt="a photo of sks dog")
    with pytest.raises(ValueError, match="train_text_encoder_ti_frac"):
        config(tmp_path, train_text_encoder_ti_frac=0.0)
    with pytest.raises(ValueError, match="lower case"):
        config(tmp_path, placeholder_token="<S0>")
    # Without new tokens it is a plain LoRA: the prompt needs no abstraction.
    assert not config(tmp_path, instance_prompt="a photo of sks dog", train_text_encoder_ti=False).train_text_encoder_ti
    pipe = tiny_pipeline("sd")
    with pytest.raises(ValueError, match="already in the vocabulary"):
        PivotalTuning().trainable_parameters(pipe, config(tmp_path, placeholder_token="dog"))
    with pytest.raises(ValueError, match="single token"):
        PivotalTuning().trainable_parameters(tiny_pipeline("sd"), config(tmp_path, initializer_token="dogs"))


def test_validation_prompt_names_the_new_tokens(tmp_path):
    cfg = config(tmp_path, validation_prompt="a TOK dog on the grass", num_validation_images=1,
                 validation_inference_steps=2)
    pipe = tiny_pipeline("sd")
    method = PivotalTuning()
    method.trainable_parameters(pipe, cfg)
    images = method.validate(pipe, cfg, step=0)
    expected = pipe("a <s0> dog on the grass", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION,
                    generator=torch.Generator().manual_seed(cfg.seed)).images
    literal = pipe("a TOK dog on the grass", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION,
                   generator=torch.Generator().manual_seed(cfg.seed)).images
    assert np.array_equal(np.asarray(images[0]), np.asarray(expected[0]))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(literal[0]))
