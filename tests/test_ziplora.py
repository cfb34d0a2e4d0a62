"""ZipLoRA (customize.methods.ziplora): the merger vectors' invariants ((1, 0) is the content LoRA, (0, 1) the style
LoRA, (1, 1) the direct sum), the exported file reproducing the in-memory merge in a plain diffusers pipeline, the
loss's targets, what the merged model is fed, the engine run (only the vectors train; files written; resume), and
the recipe's refusals."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

import customize
from customize.formats import read_lora, save_lora
from customize.formats.lora_load import find_module
from customize.formats.lora_state import split_key
from customize.methods import ziplora
from tests.bad_input import assert_refused, listing, recipe
from tests.lora_helpers import add_delta, image, image_with_delta, tiny_pipe as make_pipe, trained_state

# The two LoRAs adapt overlapping modules (to_k, and the text encoder's out_proj) and some of their own, one of
# them convolutions: the merge runs over the union. (Both adapt out_proj: diffusers cannot read a kohya text-encoder
# part without it, see tests/test_formats.py.)
CONTENT = dict(unet_targets=["to_q", "to_k", "conv1"], te_targets=["q_proj", "out_proj"])
STYLE = dict(unet_targets=["to_k", "to_v", "proj_in"], te_targets=["k_proj", "out_proj"], rank=2, alpha=3)


@pytest.fixture(scope="module")
def loras():
    return trained_state("sd", 1, **CONTENT), trained_state("sd", 2, **STYLE)


@pytest.fixture(scope="module")
def lora_files(loras, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ziplora-loras")
    return save_lora(loras[0], folder / "content.safetensors"), save_lora(loras[1], folder / "style.safetensors")


def _vectors(content, style, fill_c, fill_s, seed=None):
    """Vectors for every module of each LoRA: constants, or (seed) random values around 1."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    out = {}
    for side, state, fill in (("content", content, fill_c), ("style", style, fill_s)):
        for key, layer in state.layers.items():
            n = layer.down[0].numel()
            out.setdefault(key, {})[side] = (torch.full((n,), float(fill)) if g is None
                                             else 1 + 0.5 * torch.randn(n, generator=g))
    return out


def _max_diff(a, b):
    keys = set(a) | set(b)
    zero = lambda k: torch.zeros_like((a.get(k) if k in a else b[k]))  # noqa: E731
    return max(float((a.get(k, zero(k)) - b.get(k, zero(k))).abs().max()) for k in keys)


def _deltas(state):
    return {k: layer.delta() for k, layer in state.layers.items()}


def test_vectors_one_zero_give_each_lora_and_one_one_the_direct_sum(loras):
    content, style = loras
    dc, ds = _deltas(content), _deltas(style)
    assert _max_diff(_deltas(ziplora.ziplora_state(content, style, _vectors(content, style, 1, 0))), dc) <= 1e-6
    assert _max_diff(_deltas(ziplora.ziplora_state(content, style, _vectors(content, style, 0, 1))), ds) <= 1e-6
    both = ziplora.ziplora_state(content, style, _vectors(content, style, 1, 1))
    total = {k: dc.get(k, 0) + ds.get(k, 0) for k in set(dc) | set(ds)}
    assert _max_diff(_deltas(both), total) <= 1e-6
    # exported rank r_c + r_s where both adapt a module, the one LoRA's rank elsewhere
    shared = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    assert both.layers[shared].rank == content.layers[shared].rank + style.layers[shared].rank
    assert set(both.layers) == set(content.layers) | set(style.layers)


def test_exported_update_is_the_column_scaled_sum(loras):
    """dW = dW_c diag(m_c) + dW_s diag(m_s), a convolution's columns being in*kh*kw."""
    content, style = loras
    vectors = _vectors(content, style, None, None, seed=3)
    merged = ziplora.ziplora_state(content, style, vectors)
    want = {}
    for side, state in (("content", content), ("style", style)):
        for key, layer in state.layers.items():
            flat = layer.delta().flatten(1) * vectors[key][side][None, :]  # (out, in*kh*kw) * (1, in*kh*kw)
            want[key] = want.get(key, 0) + flat.reshape(layer.delta().shape)
    assert _max_diff(_deltas(merged), want) <= 1e-5


def test_installed_layers_follow_their_mode_and_the_file_gives_the_same_image(loras, tmp_path):
    """Modes content / style / merged give the images of the pipeline with dW_c / dW_s / the merged dW added to its
    weights; the exported file, loaded by diffusers' load_lora_weights into a plain pipeline, gives the merged
    image (<= 1e-4); the base weights come back bitwise after remove."""
    content, style = loras
    pipe = make_pipe("sd")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    base_image = image(pipe)
    layers = ziplora.install(pipe, content, style)
    assert set(layers) == set(content.layers) | set(style.layers)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in layers.values():
            for p in (layer.merger_content, layer.merger_style):
                if p is not None:
                    p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    vectors = ziplora.merger_vectors(pipe)
    merged = ziplora.ziplora_state(content, style, vectors)
    for mode, state in (("content", content), ("style", style), ("merged", merged)):
        with ziplora.merger_mode(pipe, mode):
            np.testing.assert_allclose(image(pipe), image_with_delta("sd", state), atol=1e-4, err_msg=mode)
    with ziplora.merger_mode(pipe, "base"):
        np.testing.assert_allclose(image(pipe), base_image, atol=1e-6)
    merged_image = image(pipe)
    assert np.abs(merged_image - base_image).max() > 1e-2, "the merge must change the image for the test to mean anything"
    # the state rebuilt from the installed layers is the same merge as from the files' states
    assert _max_diff(_deltas(ziplora.ziplora_state(*ziplora.source_loras(pipe), vectors)), _deltas(merged)) <= 1e-5
    ziplora.remove(pipe)
    assert not ziplora.ziplora_layers(pipe)
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and set(before) == set(after)
    path = save_lora(merged, tmp_path / "zip.safetensors")
    plain = make_pipe("sd")
    plain.load_lora_weights(str(path))
    np.testing.assert_allclose(image(plain), merged_image, atol=1e-4)


def test_the_loss_targets_each_lora_on_its_own_rows(loras, lora_files):
    """Vectors (1, 0) make the merged model the content model: the content term is 0 (to rounding) and the style term
    is not; (0, 1) the other way round. So each half of a batch is compared with its own LoRA's prediction."""
    content, style = loras
    pipe = make_pipe("sd")
    cfg = ziplora.ZipLoRAConfig(content_lora=str(lora_files[0]), style_lora=str(lora_files[1]), content_prompt="a sks dog",
                                style_prompt="a cat in zwx style", resolution=32)
    ziplora.install(pipe, content, style)
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.rand(4, 3, 32, 32, generator=g) * 2 - 1,
             "prompt": ["a sks dog"] * 2 + ["a cat in zwx style"] * 2, "num_prior": 2}
    for fill, zero, nonzero in (((1, 0), "content_mse", "style_mse"), ((0, 1), "style_mse", "content_mse")):
        with torch.no_grad():
            for layer in ziplora.ziplora_layers(pipe).values():
                for p, v in ((layer.merger_content, fill[0]), (layer.merger_style, fill[1])):
                    if p is not None:
                        p.fill_(v)
            torch.manual_seed(0)
            out = ziplora.loss(pipe, batch, cfg)
        assert float(out[zero]) <= 1e-10 and float(out[nonzero]) > 1e-6, (fill, out)  # 0 up to float rounding
    with pytest.raises(ValueError, match="one to one"):
        ziplora.loss(pipe, {**batch, "num_prior": 1}, cfg)


def _run(lora_files, out, **options):
    pipe = make_pipe("sd")
    settings = dict(num_images=2, generation_steps=2, resolution=32, learning_rate=1e-2, progress=False,
                    train_batch_size=2)
    settings.update(options)
    steps = settings.pop("steps", 4)
    return pipe, customize.ziplora(pipe, *lora_files, "a sks dog", "a cat in zwx style", steps, output_dir=str(out),
                                   **settings)


def test_training_moves_only_the_vectors_and_writes_the_files(loras, lora_files, tmp_path):
    sources = [hashlib.sha256(p.read_bytes()).hexdigest() for p in lora_files]
    pipe, result = _run(lora_files, tmp_path / "run")
    fresh = make_pipe("sd")
    for comp in ("unet", "text_encoder"):  # the pipeline is given back as it was: base weights bitwise
        a, b = getattr(pipe, comp).state_dict(), getattr(fresh, comp).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), comp
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in lora_files] == sources
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))
    moved = [float((v - 1).abs().max()) for sides in result.vectors.values() for v in sides.values()]
    assert min(moved) > 0, "every vector trains"
    assert {"content_mse", "style_mse", "cos"} <= set(result.logs[-1])
    out = tmp_path / "run"
    assert set(listing(out)) >= {"pytorch_lora_weights.safetensors", ziplora.VECTORS_FILE, ziplora.VECTORS_PLOT, "README.md"}
    # the file is the merge of the returned vectors, the vectors file holds them, the chart is a PNG
    on_disk = read_lora(out / "pytorch_lora_weights.safetensors")
    assert _max_diff(_deltas(on_disk), _deltas(result.lora)) <= 1e-6
    assert _max_diff(_deltas(on_disk), _deltas(ziplora.ziplora_state(*loras, result.vectors))) <= 1e-5
    back = ziplora.read_vectors(out / ziplora.VECTORS_FILE)
    assert back.keys() == result.vectors.keys()
    assert all(torch.equal(back[k][s], result.vectors[k][s]) for k in back for s in back[k])
    with Image.open(out / ziplora.VECTORS_PLOT) as im:
        assert im.format == "PNG" and im.width > 100
    assert "ziplora" in on_disk.metadata.get("customize.merge", "")


def test_generated_data_comes_from_each_lora_alone(loras, lora_files, tmp_path):
    """What the merged model is fed by default: image i of the content (style) folder is the content (style)
    LoRA's own image of its prompt from seed seed + i."""
    _run(lora_files, tmp_path / "run", steps=1, seed=7)
    for side, state, prompt in (("content", loras[0], "a sks dog"), ("style", loras[1], "a cat in zwx style")):
        pipe = add_delta(make_pipe("sd"), state)
        want = pipe(prompt, num_inference_steps=2, height=32, width=32,
                    generator=torch.Generator().manual_seed(7 + 1)).images[0]
        got = Image.open(tmp_path / "run" / ziplora.DATA_FOLDER / side / "class-00001.png")
        diff = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(want, dtype=np.int16))
        assert diff.max() <= 1, (side, diff.max())


def test_resume_gives_the_vectors_of_an_uninterrupted_run(lora_files, tmp_path):
    _, straight = _run(lora_files, tmp_path / "straight", steps=4, checkpointing_steps=2)
    _run(lora_files, tmp_path / "cut", steps=2, checkpointing_steps=2)
    _, resumed = _run(lora_files, tmp_path / "cut", steps=4, checkpointing_steps=2, resume_from_checkpoint="latest")
    for key, sides in straight.vectors.items():
        for side, v in sides.items():
            assert torch.equal(resumed.vectors[key][side], v), (key, side)


def test_recipe_refuses_a_lora_of_another_family_and_missing_options(lora_files, tmp_path):
    sdxl = save_lora(trained_state("sdxl", 1, te_targets=()), tmp_path / "sdxl.safetensors")
    common = ["--pretrained_model_name_or_path", "tiny-sd", "--content_prompt", "a sks dog", "--style_prompt", "x"]
    out = tmp_path / "out"
    run = recipe("train_ziplora", *common, "--content_lora", lora_files[0], "--style_lora", sdxl, "--output_dir", out)
    assert_refused(run, "style LoRA", "sdxl.safetensors")
    assert not out.exists()
    run = recipe("train_ziplora", *common, "--content_lora", lora_files[0], "--output_dir", out)
    assert_refused(run, "--style_lora")


def test_vectors_file_of_another_kind_is_refused(tmp_path):
    from customize.utils import save_safetensors_atomic

    path = save_safetensors_atomic({"weight": torch.ones(3)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not a ZipLoRA merger vector"):
        ziplora.read_vectors(path)


def test_find_module_sees_through_an_installed_layer(loras):
    """customize.formats' layer checks look through a ZipLoRA layer as through a peft one (base_layer)."""
    from customize.formats.lora_load import _shape_problem

    pipe = make_pipe("sd")
    ziplora.install(pipe, *loras)
    for key, layer in loras[0].layers.items():
        assert _shape_problem(layer, find_module(pipe, *split_key(key))) is None


def test_recipe_writes_a_kohya_file_that_diffusers_loads_with_the_merged_image(lora_files, tmp_path):
    """`recipes/train_ziplora.py --lora_format kohya` on the LoRAs' own images (data folders): the A1111 file
    named after the output folder, read back and loaded by diffusers' own kohya loader, gives the image of the
    merge of the vectors it saved."""
    import sys
    from pathlib import Path

    from customize.data.images import save_image_atomic

    root = Path(__file__).resolve().parents[1]
    for side in ("content", "style"):
        g = np.random.default_rng(len(side))
        for i in range(2):
            save_image_atomic(Image.fromarray(g.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
                              tmp_path / side / f"{i}.png")
    sys.path.insert(0, str(root / "recipes"))
    try:
        import train_ziplora
    finally:
        sys.path.remove(str(root / "recipes"))
    out = tmp_path / "dog-in-zwx"
    train_ziplora.main(["--pretrained_model_name_or_path", "tiny-sd", "--content_lora", str(lora_files[0]),
                        "--style_lora", str(lora_files[1]), "--content_prompt", "a sks dog", "--style_prompt",
                        "a cat in zwx style", "--content_data_dir", str(tmp_path / "content"), "--style_data_dir",
                        str(tmp_path / "style"), "--max_train_steps", "2", "--learning_rate", "1e-2",
                        "--lora_format", "kohya", "--output_dir", str(out), "--report_to", "none", "--no_progress"])
    file = out / "dog-in-zwx.safetensors"
    assert file.is_file() and not (out / ziplora.DATA_FOLDER).exists()  # trained on the folders given
    vectors = ziplora.read_vectors(out / ziplora.VECTORS_FILE)
    content, style = (read_lora(p) for p in lora_files)
    want = ziplora.ziplora_state(content, style, vectors)
    assert _max_diff(_deltas(read_lora(file)), _deltas(want)) <= 1e-5
    plain = make_pipe("sd")
    plain.load_lora_weights(str(out), weight_name=file.name)
    np.testing.assert_allclose(image(plain), image_with_delta("sd", want), atol=1e-4)
