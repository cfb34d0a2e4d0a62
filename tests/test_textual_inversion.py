"""Textual inversion (docs/methods.md, 'Textual inversion') on tiny SD and SDXL pipelines: init invariants, the
frozen-row guard, prompts, files that load in plain diffusers, checkpoint/resume, and the errors a user can run into."""

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from customize.data import ImageCaptionDataset
from customize.formats import FormatError, load_embedding_into, read_embedding
from customize.methods import textual_inversion as ti
from customize.models import tiny_pipeline
from customize.training import sd, train

REPO = Path(__file__).resolve().parents[1]
KINDS = ("sd", "sdxl")
RESOLUTION = 32  # tiny_pipeline images are sample_size * 2 pixels


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_images(folder: Path, n: int = 3, captions: dict[int, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        if captions and i in captions:
            (folder / f"{i}.txt").write_text(captions[i])
    return folder


def config(tmp_path, **kw) -> ti.TextualInversionConfig:
    base = dict(
        output_dir=str(tmp_path / "out"), placeholder_token="<tok>", initializer_token="dog", resolution=RESOLUTION,
        max_train_steps=3, gradient_accumulation_steps=1, learning_rate=5e-2, scale_lr=False, report_to="none",
        progress=False, checkpointing_steps=0,
    )
    base.update(kw)
    return ti.TextualInversionConfig(**base)


def embedding_weights(pipe) -> list[torch.Tensor]:
    return [te.get_input_embeddings().weight for te in sd.text_encoders(pipe)]


def render(pipe, prompt: str) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images


# ---------------------------------------------------------------------------------------------------------------
# Tokens and the frozen-row guard
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_placeholder_encodes_exactly_like_initializer_at_init(kind):
    pipe = tiny_pipeline(kind)
    tokens = ti.PlaceholderTokens(pipe, "<tok>", num_vectors=1, initializer_token="dog")
    assert tokens.tokens == ["<tok>"]
    with torch.no_grad():
        new = sd.encode_prompts(pipe, ["a photo of <tok>"])
        old = sd.encode_prompts(pipe, ["a photo of dog"])
    assert set(new) == ({"encoder_hidden_states", "text_embeds"} if kind == "sdxl" else {"encoder_hidden_states"})
    for key in new:
        assert torch.equal(new[key], old[key]), key
    # ...and the placeholder is a token of its own, not the initializer's id.
    for tok in sd.tokenizers(pipe):
        assert tok("a photo of <tok>").input_ids != tok("a photo of dog").input_ids


def test_multi_vector_placeholder_names_rows_and_prompt_text():
    pipe = tiny_pipeline("sd")
    rows = embedding_weights(pipe)[0].shape[0]
    tokens = ti.PlaceholderTokens(pipe, "<tok>", num_vectors=3, initializer_token="cat")
    assert tokens.tokens == ["<tok>", "<tok>_1", "<tok>_2"]
    assert tokens.prompt_text == "<tok> <tok>_1 <tok>_2"
    assert tokens.slots[0].token_ids == [rows, rows + 1, rows + 2]
    weight = embedding_weights(pipe)[0]
    cat = pipe.tokenizer.convert_tokens_to_ids("cat</w>")
    assert torch.equal(weight[rows:], weight[cat].expand(3, -1))
    with torch.no_grad():
        assert torch.equal(sd.encode_prompts(pipe, ["a <tok> <tok>_1 <tok>_2"])["encoder_hidden_states"],
                           sd.encode_prompts(pipe, ["a cat cat cat"])["encoder_hidden_states"])


def test_random_init_scales_to_existing_embeddings():
    """initializer_token=None (pivotal tuning's default): N(0, std^2) rows with the std of the vocabulary."""
    pipe = tiny_pipeline("sd")
    tokens = ti.PlaceholderTokens(pipe, "<s0>", num_vectors=64, initializer_token=None,
                                  generator=torch.Generator().manual_seed(0))
    weight = embedding_weights(pipe)[0]
    new, old = weight[tokens.slots[0].token_ids], weight[: tokens.slots[0].token_ids[0]]
    assert abs(new.std().item() / old.std().item() - 1) < 0.05
    assert abs(new.mean().item()) < 0.1 * old.std().item()


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_mask_and_restore_keep_other_rows_bitwise(kind):
    """AdamW's decoupled weight decay moves every row, even those with zero gradient: the guard must restore them."""
    pipe = tiny_pipeline(kind)
    before = [w.detach().clone() for w in embedding_weights(pipe)]
    tokens = ti.PlaceholderTokens(pipe, "<tok>", initializer_token="dog")
    params = tokens.parameters()
    cond = sd.encode_prompts(pipe, ["a photo of <tok> on a red background"])
    sum(v.square().mean() for v in cond.values()).backward()
    for slot, p in zip(tokens.slots, params):
        rows_with_grad = p.grad.abs().sum(1).nonzero().flatten().tolist()  # (k,)
        assert rows_with_grad == slot.token_ids, "only the placeholder rows may carry a gradient"
    torch.optim.AdamW(params, lr=1e-1, weight_decay=0.5).step()
    assert not torch.equal(params[0][: before[0].shape[0]], before[0]), "weight decay should have moved old rows"
    tokens.restore_frozen_rows()
    for old, slot, p in zip(before, tokens.slots, params):
        assert torch.equal(p[: old.shape[0]], old)
        assert not torch.equal(p[slot.token_ids], slot.frozen[slot.token_ids]), "the placeholder must have trained"


@pytest.mark.parametrize("kind", KINDS)
def test_training_changes_only_placeholder_rows(kind, tmp_path):
    pipe = tiny_pipeline(kind)
    reference = tiny_pipeline(kind)
    data = make_images(tmp_path / "data")
    cfg = config(tmp_path, adam_weight_decay=0.5, num_vectors=2)
    method = ti.TextualInversion()
    result = train(method, pipe, ImageCaptionDataset.from_folder(data, RESOLUTION, prompt=""), cfg)
    assert result.global_step == 3
    for name in ("unet", "vae") + tuple(n for n, _ in ti.ENCODER_SLOTS if getattr(pipe, n, None) is not None):
        trained = getattr(pipe, name).state_dict()
        for key, value in getattr(reference, name).state_dict().items():
            if key.endswith("token_embedding.weight"):
                rows = value.shape[0]
                assert torch.equal(trained[key][:rows], value), f"{name}.{key}: a vocabulary row changed"
                new = trained[key][rows:]  # (2, D)
                assert new.shape[0] == 2 and not torch.equal(new, value[520].expand_as(new)), "the placeholder did not train"
            else:
                assert torch.equal(trained[key], value), f"{name}.{key} changed"


# ---------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------


def test_training_prompts_templates_and_captions():
    rng = random.Random(0)
    drawn = {ti.training_prompt("<t>", "object", rng=rng) for _ in range(200)}
    assert drawn <= {t.format("<t>") for t in ti.OBJECT_TEMPLATES} and len(drawn) > 10
    assert ti.training_prompt("<t> <t>_1", "style", rng=random.Random(1)) in {
        t.format("<t> <t>_1") for t in ti.STYLE_TEMPLATES}
    assert ti.training_prompt("<t>", caption="a sks, on grass", caption_token="sks") == "a <t>, on grass"
    assert ti.training_prompt("<t>", caption="asks sks", caption_token="sks") == "asks <t>"
    assert ti.training_prompt("<t>", caption="a dog on grass", caption_token="sks") == "a dog on grass <t>"
    assert ti.training_prompt("<t>", caption="a dog on grass") == "a dog on grass <t>"
    with pytest.raises(ValueError, match="learnable_property"):
        ti.training_prompt("<t>", "texture")


def test_dataset_prompts_follow_captions_and_the_seeded_stream(tmp_path):
    data = make_images(tmp_path / "data", n=2, captions={1: "a sks on the table"})
    base = ImageCaptionDataset.from_folder(data, RESOLUTION, prompt="", use_captions=True)
    prompts = ti.PlaceholderPrompts(base, "<tok>", "object", caption_token="sks")
    assert prompts[1]["prompt"] == "a <tok> on the table"
    random.seed(3)
    first = [prompts[0]["prompt"] for _ in range(5)]
    random.seed(3)
    assert [prompts[0]["prompt"] for _ in range(5)] == first
    assert all(p in {t.format("<tok>") for t in ti.OBJECT_TEMPLATES} for p in first)


# ---------------------------------------------------------------------------------------------------------------
# Files: the recipe's output loads in plain diffusers; checkpoints resume the placeholder rows
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_recipe_embedding_loads_in_plain_diffusers_with_same_image(kind, tmp_path):
    data = make_images(tmp_path / "data")
    out = tmp_path / "out"
    pipe, result = load_recipe("train_textual_inversion").main([
        "--pretrained_model_name_or_path", f"tiny-{kind}", "--train_data_dir", str(data), "--output_dir", str(out),
        "--placeholder_token", "<tok>", "--initializer_token", "dog", "--num_vectors", "2",
        "--resolution", str(RESOLUTION), "--max_train_steps", "2", "--gradient_accumulation_steps", "1",
        "--learning_rate", "0.05", "--report_to", "none", "--progress", "false", "--checkpointing_steps", "0",
    ])
    assert result.global_step == 2
    expected = {"learned_embeds.safetensors", "tok.safetensors", "README.md"}
    if kind == "sdxl":
        expected.add("learned_embeds_2.safetensors")
    assert expected <= {p.name for p in out.iterdir()}
    prompt = "a photo of <tok> on the grass"
    in_memory = render(pipe, prompt)

    fresh = tiny_pipeline(kind)
    fresh.load_textual_inversion(str(out), token="<tok>")
    if kind == "sdxl":
        fresh.load_textual_inversion(str(out), weight_name="learned_embeds_2.safetensors", token="<tok>",
                                     text_encoder=fresh.text_encoder_2, tokenizer=fresh.tokenizer_2)
    assert len(fresh.tokenizer) == len(pipe.tokenizer)
    loaded = render(fresh, prompt)
    assert np.abs(in_memory - loaded).max() <= 1e-4
    assert np.abs(in_memory - render(tiny_pipeline(kind), "a photo of dog dog on the grass")).max() > 1e-3, (
        "the trained embedding should change the image"
    )

    # The single file holds the same vectors ({"clip_l", "clip_g"} for SDXL) and names the token.
    single, folder = read_embedding(out / "tok.safetensors"), read_embedding(out)
    assert single.token == folder.token == "<tok>"
    assert single.format == ("sdxl" if kind == "sdxl" else "diffusers")
    assert set(single.vectors) == set(folder.vectors)
    for name, vectors in folder.vectors.items():
        assert vectors.shape == (2, 32) and torch.equal(single.vectors[name], vectors)


def test_resume_restores_placeholder_rows_exactly(tmp_path):
    data = make_images(tmp_path / "data")

    def run(**kw):
        pipe = tiny_pipeline("sd")
        method = ti.TextualInversion()
        dataset = ImageCaptionDataset.from_folder(data, RESOLUTION, prompt="")
        train(method, pipe, dataset, config(tmp_path, max_train_steps=4, checkpointing_steps=2, **kw))
        return method.tokens.embeddings()["text_encoder"]

    straight = run()
    resumed = run(resume_from_checkpoint="checkpoint-2")
    assert torch.equal(straight, resumed)
    assert (tmp_path / "out" / "checkpoint-4").is_dir()


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("placeholder, initializer, message", [
    ("dog", "cat", "already in the vocabulary"),  # a whole word of the vocabulary ('dog</w>')
    ("<Tok>", "cat", "lower case"),
    ("<my tok>", "cat", "without spaces"),
    ("<tok>", "dogs", r"single token.*'do', 'g', 's</w>'"),  # three BPE pieces
    ("<tok>", "red dog", "single token"),
])
def test_bad_tokens_are_refused_and_leave_the_pipeline_untouched(placeholder, initializer, message):
    pipe = tiny_pipeline("sdxl")
    sizes = [len(t) for t in sd.tokenizers(pipe)] + [w.shape[0] for w in embedding_weights(pipe)]
    with pytest.raises(ValueError, match=message):
        ti.PlaceholderTokens(pipe, placeholder, initializer_token=initializer)
    assert [len(t) for t in sd.tokenizers(pipe)] + [w.shape[0] for w in embedding_weights(pipe)] == sizes


def test_placeholder_added_twice_is_refused():
    pipe = tiny_pipeline("sd")
    ti.PlaceholderTokens(pipe, "<tok>", num_vectors=2, initializer_token="dog")
    with pytest.raises(ValueError, match=r"\['<tok>', '<tok>_1'\] already in the vocabulary"):
        ti.PlaceholderTokens(pipe, "<tok>", num_vectors=2, initializer_token="dog")
    with pytest.raises(ValueError, match="lower case"):
        config(Path("unused"), placeholder_token="<TOK>")
    with pytest.raises(ValueError, match="num_vectors"):
        config(Path("unused"), num_vectors=0)


def test_trained_embedding_refused_by_a_model_it_does_not_fit(tmp_path):
    """End to end: a file the method wrote, loaded into models of another family / another width."""
    from transformers import CLIPTextConfig, CLIPTextModel

    pipe = tiny_pipeline("sd")
    tokens = ti.PlaceholderTokens(pipe, "<tok>", initializer_token="dog")
    files = ti.save_embeddings(tokens, tmp_path / "emb")

    with pytest.raises(FormatError, match=r"needs \['text_encoder', 'text_encoder_2'\]"):
        load_embedding_into(tiny_pipeline("sdxl"), files["diffusers"])

    wide = tiny_pipeline("sd")
    te = wide.text_encoder.config.to_dict()
    te.update(hidden_size=48, intermediate_size=96)
    wide.text_encoder = CLIPTextModel(CLIPTextConfig(**te))
    with pytest.raises(FormatError, match="32 wide but the model's text_encoder embeds tokens 48 wide"):
        load_embedding_into(wide, files["single"])
    assert "<tok>" not in wide.tokenizer.get_vocab(), "a refused file must not add its token"

    ok = tiny_pipeline("sd")
    assert load_embedding_into(ok, files["single"]) == ["<tok>"]
    assert torch.equal(ok.text_encoder.get_input_embeddings().weight[-1], tokens.embeddings()["text_encoder"][0])


def test_validation_images_use_the_placeholder(tmp_path):
    pipe = tiny_pipeline("sd")
    cfg = config(tmp_path, validation_prompt="a {} on the grass", num_validation_images=2, validation_inference_steps=2)
    method = ti.TextualInversion()
    (weight,) = method.trainable_parameters(pipe, cfg)
    with torch.no_grad():
        # S* no longer looks like its initializer. Not a constant shift: every LayerNorm of the text encoder
        # removes a vector's mean, so "+= 1.0" would leave its output unchanged.
        ids = method.tokens.slots[0].token_ids
        weight[ids] += torch.randn(weight[ids].shape, generator=torch.Generator().manual_seed(0))
    images = method.validate(pipe, cfg, step=0)

    def seeds():  # validation image i is drawn from the seed cfg.seed + i (customize.inference.generate)
        return [torch.Generator().manual_seed(cfg.seed + i) for i in range(2)]

    expected = pipe("a <tok> on the grass", num_images_per_prompt=2, num_inference_steps=2, height=RESOLUTION,
                    width=RESOLUTION, generator=seeds()).images
    assert len(images) == 2
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, expected))
    initializer = pipe("a dog on the grass", num_images_per_prompt=2, num_inference_steps=2, height=RESOLUTION,
                       width=RESOLUTION, generator=seeds()).images
    assert not np.array_equal(np.asarray(images[0]), np.asarray(initializer[0]))
