"""LoRA and textual-inversion files: every format loads in diffusers with the same effect as ours, conversions
keep dW = (alpha / r) B A exactly, families are told apart, and bad files are refused with clear errors."""

import numpy as np
import pytest
import torch

from customize.formats import (
    FormatError,
    LoraCompatibilityError,
    LoraLayer,
    LoraState,
    UNetLayout,
    check_lora_compatible,
    convert_lora,
    detect_lora_family,
    inspect_lora,
    load_embedding_into,
    load_lora_files,
    lora_state_from_model,
    read_embedding,
    read_lora,
    save_embedding,
    save_lora,
)
from customize.formats import lora as lora_mod
from customize.utils import save_safetensors_atomic
from tests.lora_helpers import add_lora, tiny_pipe

PROMPT = "a photo of sks dog"


def _image(pipe):
    return pipe(PROMPT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images


def _peft_deltas(pipe) -> dict:
    """dW of every peft LoRA layer, as peft computes it, keyed like LoraState (text_model. form)."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        root = getattr(pipe, comp, None)
        for name, m in root.named_modules() if root is not None else ():
            if isinstance(m, PeftLoraLayer) and m.lora_A:
                (adapter,) = list(m.lora_A)
                out[f"{comp}.{lora_mod.canonical_module(comp, name)}"] = m.get_delta_weight(adapter).float()
    return out


@pytest.fixture(scope="module")
def lora_pipes():
    """{kind: (pipe with adapters, its image, its LoraState)}, built once."""
    out = {}
    for kind in ("sd", "sdxl"):
        pipe = add_lora(tiny_pipe(kind))
        out[kind] = (pipe, _image(pipe), lora_state_from_model(pipe))
    return out


def test_file_names_match_diffusers():
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE
    from diffusers.loaders.textual_inversion import TEXT_INVERSION_NAME, TEXT_INVERSION_NAME_SAFE

    from customize.formats import embeddings

    assert (lora_mod.LORA_WEIGHT_NAME, lora_mod.ADAPTER_METADATA_KEY) == (LORA_WEIGHT_NAME_SAFE, LORA_ADAPTER_METADATA_KEY)
    assert (embeddings.EMBEDDING_WEIGHT_NAME, embeddings.EMBEDDING_WEIGHT_NAME_BIN) == (TEXT_INVERSION_NAME_SAFE, TEXT_INVERSION_NAME)


def test_state_from_model_equals_peft_delta(lora_pipes):
    pipe, _, state = lora_pipes["sdxl"]
    want = _peft_deltas(pipe)
    assert set(state.layers) == set(want)
    for key, layer in state.layers.items():
        torch.testing.assert_close(layer.delta(), want[key], rtol=1e-5, atol=1e-7)
    ranks = {k.rsplit(".", 1)[-1]: v.rank for k, v in state.layers.items()}
    assert ranks["proj_in"] == 2 and ranks["to_q"] == 4  # rank_pattern kept


def test_alpha_patterns_survive_every_format(tmp_path):
    pipe = add_lora(tiny_pipe("sd"), alpha_pattern={"to_k": 8, "conv1": 0.5})
    state = lora_state_from_model(pipe)
    assert {v.alpha for k, v in state.layers.items() if k.endswith("attn2.to_k")} == {8.0}
    assert {v.alpha for k, v in state.layers.items() if k.endswith("conv1")} == {0.5}
    for fmt in ("diffusers", "peft", "kohya"):
        back = read_lora(save_lora(state, tmp_path / f"{fmt}.safetensors", fmt))
        for key, layer in state.layers.items():
            assert back.layers[key].alpha == layer.alpha and torch.equal(back.layers[key].delta(), layer.delta())
        if fmt != "kohya":  # the adapter metadata carries the pattern into diffusers' loader
            fresh = tiny_pipe("sd")
            fresh.load_lora_weights(str(tmp_path / f"{fmt}.safetensors"))
            theirs = _peft_deltas(fresh)
            for key, layer in state.layers.items():
                torch.testing.assert_close(theirs[key], layer.delta(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_every_format_loads_in_diffusers_with_the_same_image(kind, lora_pipes, tmp_path):
    _, ref, state = lora_pipes[kind]
    base = _image(tiny_pipe(kind))
    assert np.abs(ref - base).max() > 1e-3, "the LoRA must change the image for this test to mean anything"
    layout = UNetLayout.from_config(tiny_pipe(kind).unet.config)
    for fmt in ("diffusers", "peft", "kohya"):
        path = save_lora(state, tmp_path / f"{fmt}.safetensors", fmt, layout=layout)
        back = read_lora(path, layout)
        assert back.format == fmt and set(back.layers) == set(state.layers)
        for key, layer in state.layers.items():
            assert torch.equal(back.layers[key].delta(), layer.delta()), key
        fresh = tiny_pipe(kind)
        fresh.load_lora_weights(str(path))
        np.testing.assert_allclose(_image(fresh), ref, atol=1e-5, err_msg=f"{fmt} file gives another image")


def test_reads_files_written_by_diffusers_save_lora_weights(lora_pipes, tmp_path):
    """The real client's own files (mixed lora.down / lora_A names, LoraConfig as adapter metadata)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    pipe, _, state = lora_pipes["sd"]
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
    )
    back = read_lora(tmp_path)
    assert back.format == "diffusers" and set(back.layers) == set(state.layers)
    for key, layer in state.layers.items():
        torch.testing.assert_close(back.layers[key].delta(), layer.delta(), rtol=1e-6, atol=0)


# Hand-written kohya names -> the diffusers module each must land on (tiny UNets: layers_per_block = 1)
KOHYA_SD = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn1_to_out_0": "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0",
    "lora_unet_mid_block_attentions_0_proj_in": "mid_block.attentions.0.proj_in",
    "lora_unet_down_blocks_0_resnets_0_conv1": "down_blocks.0.resnets.0.conv1",
    "lora_unet_up_blocks_0_resnets_1_conv_shortcut": "up_blocks.0.resnets.1.conv_shortcut",
    **{f"lora_te_text_model_encoder_layers_1_self_attn_{p}": f"text_model.encoder.layers.1.self_attn.{p}"
       for p in ("q_proj", "k_proj", "v_proj", "out_proj")},
}
KOHYA_SDXL = {
    "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k": "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
    "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2": "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "lora_unet_output_blocks_1_1_proj_out": "up_blocks.0.attentions.1.proj_out",
    "lora_unet_output_blocks_1_2_conv": "up_blocks.0.upsamplers.0.conv",
    "lora_unet_input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "lora_unet_input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
    "lora_unet_input_blocks_2_0_op": "down_blocks.0.downsamplers.0.conv",
    **{f"lora_te1_text_model_encoder_layers_0_self_attn_{p}": f"text_model.encoder.layers.0.self_attn.{p}"
       for p in ("q_proj", "k_proj", "v_proj", "out_proj")},
    "lora_te2_text_model_encoder_layers_1_mlp_fc1": "text_model.encoder.layers.1.mlp.fc1",
}


def _kohya_by_hand(pipe, names: dict, rank=3, alpha: float | None = 1.0) -> dict:
    """kohya's trainer writes --network_alpha (default 1) for every module; alpha=None writes none."""
    g = torch.Generator().manual_seed(3)
    sd = {}
    for i, (name, module) in enumerate(names.items()):
        component = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}[
            next(p for p in ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_") if name.startswith(p))]
        m = lora_mod.find_module(pipe, component, module)
        if isinstance(m, torch.nn.Conv2d):
            down, up = (rank, m.in_channels, *m.kernel_size), (m.out_channels, rank, 1, 1)
        else:
            down, up = (rank, m.in_features), (m.out_features, rank)
        sd[f"{name}.lora_down.weight"] = torch.randn(down, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(up, generator=g)
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


@pytest.mark.parametrize("alpha", [1.0, None])
@pytest.mark.parametrize("kind,names", [("sd", KOHYA_SD), ("sdxl", KOHYA_SDXL)])
def test_hand_built_kohya_file_gives_diffusers_delta(kind, names, alpha, tmp_path):
    pipe = tiny_pipe(kind)
    path = save_safetensors_atomic(_kohya_by_hand(pipe, names, alpha=alpha), tmp_path / "kohya.safetensors")
    ours = read_lora(path, UNetLayout.from_config(pipe.unet.config))
    assert ours.format == "kohya"
    assert {layer.scale for layer in ours.layers.values()} == {1 / 3 if alpha else 1.0}  # no alpha: alpha = rank
    pipe.load_lora_weights(str(path))
    theirs = _peft_deltas(pipe)
    prefixes = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
    expected = {f"{next(c for p, c in prefixes.items() if n.startswith(p))}.{m}" for n, m in names.items()}
    assert set(ours.layers) == set(theirs) == expected
    for key, layer in ours.layers.items():
        torch.testing.assert_close(layer.delta(), theirs[key], rtol=1e-5, atol=1e-6)


def test_sgm_and_kohya_names_round_trip_on_sdxl_and_clip():
    """Every Linear / Conv2d of a full-size SDXL UNet (meta device) and of CLIP text encoders."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with init_empty_weights():
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        )
        te = CLIPTextModelWithProjection(CLIPTextConfig(num_hidden_layers=2))
    layout = UNetLayout.from_config(unet.config)
    assert layout == lora_mod.SDXL_LAYOUT
    linear = (torch.nn.Linear, torch.nn.Conv2d)
    names = [n for n, m in unet.named_modules() if isinstance(m, linear)]
    for n in names:
        sgm = lora_mod.diffusers_to_sgm(n, layout)
        assert lora_mod.sgm_to_diffusers(sgm, layout.layers_per_block) == n
        assert lora_mod.module_path_from_kohya(lora_mod.kohya_name(sgm)) == sgm
        assert lora_mod.module_path_from_kohya(lora_mod.kohya_name(n)) == n
    assert lora_mod.diffusers_to_sgm("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", layout) == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    for n in (n for n, m in te.named_modules() if isinstance(m, linear)):
        assert lora_mod.module_path_from_kohya(lora_mod.kohya_name(n)) == n


def _synthetic(family: str, fmt: str, rank=1) -> LoraState:
    """Rank-1 layers with the real widths of each family: no weights needed to tell them apart."""
    cross = {"sd1": 768, "sd2": 1024, "sdxl": 2048}[family]
    te = {"sd1": 768, "sd2": 1024, "sdxl": 768}[family]
    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    layers = {f"unet.{attn}": LoraLayer(torch.zeros(rank, cross), torch.zeros(640, rank), 1.0),
              "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": LoraLayer(torch.zeros(rank, te), torch.zeros(te, rank), 1.0)}
    if family == "sdxl":
        layers["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"] = LoraLayer(torch.zeros(rank, 1280), torch.zeros(1280, rank), 1.0)
    return LoraState(layers, fmt)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "peft"])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_family_and_format_detected_from_keys_and_shapes(family, fmt, tmp_path):
    path = save_lora(_synthetic(family, fmt), tmp_path / "x.safetensors", fmt, family=family)
    info = inspect_lora(path)
    assert (info.format, info.family) == (fmt, family)
    assert info.num_layers == (3 if family == "sdxl" else 2) and info.ranks == [1] and info.alphas == [1.0]
    assert "attn2.to_k" in info.target_modules and "self_attn.q_proj" in info.target_modules
    if fmt == "kohya":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            keys, meta = set(f.keys()), f.metadata()
        assert meta["ss_base_model_version"] == {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]
        unet_name = ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" if family == "sdxl"
                     else "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k")
        te_prefix = "lora_te1_" if family == "sdxl" else "lora_te_"
        assert {f"{unet_name}.alpha", f"{te_prefix}text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"} <= keys
    # the UNet alone still tells the family by its cross-attention width
    unet_only = LoraState({k: v for k, v in _synthetic(family, fmt).layers.items() if k.startswith("unet.")})
    assert detect_lora_family(unet_only) == family


def test_wrong_family_refused_naming_both(lora_pipes, tmp_path):
    sd, sdxl = tiny_pipe("sd"), tiny_pipe("sdxl")
    xl_file = save_lora(_synthetic("sdxl", "kohya"), tmp_path / "xl.safetensors", "kohya", family="sdxl")
    with pytest.raises(LoraCompatibilityError, match=r"SDXL.*but the model is SD 1\.x"):
        check_lora_compatible(sd, xl_file)
    sd1_file = save_lora(_synthetic("sd1", "diffusers"), tmp_path / "sd1.safetensors")
    with pytest.raises(LoraCompatibilityError, match=r"SD 1\.x.*but the model is SDXL"):
        check_lora_compatible(sdxl, sd1_file)
    # a LoRA trained on the tiny SDXL (it has text_encoder_2 layers) into the tiny SD, next to a good one:
    # nothing is loaded at all
    tiny_xl = save_lora(lora_pipes["sdxl"][2], tmp_path / "tiny_xl.safetensors")
    good = save_lora(lora_pipes["sd"][2], tmp_path / "good.safetensors")
    with pytest.raises(LoraCompatibilityError, match=r"(?s)SDXL.*SD 1\.x.*text_encoder_2"):
        load_lora_files(sd, [(good, 1.0), (tiny_xl, 1.0)])
    assert not getattr(sd.unet, "peft_config", None)
    check_lora_compatible(sd, good)


def test_conversion_keeps_alpha_and_metadata(tmp_path):
    pipe = tiny_pipe("sd")
    src = save_safetensors_atomic(_kohya_by_hand(pipe, KOHYA_SD, rank=4, alpha=1.0), tmp_path / "k.safetensors",
                                  {"ss_network_alpha": "1", "ss_output_name": "dog", "modelspec.title": "dog"})
    with pytest.raises(FormatError, match="family"):  # tiny widths: kohya names need the family
        convert_lora(src, tmp_path / "never.safetensors", "kohya")
    d = convert_lora(src, tmp_path / "d", "diffusers")
    p = convert_lora(d, tmp_path / "p.safetensors", "peft")
    k = convert_lora(p, tmp_path / "k2.safetensors", "kohya", family="sd1")
    first, last = read_lora(src), read_lora(k)
    assert [read_lora(x).format for x in (d, p, k)] == ["diffusers", "peft", "kohya"]
    for key, layer in first.layers.items():
        assert last.layers[key].alpha == layer.alpha and torch.equal(last.layers[key].delta(), layer.delta())
    meta = last.metadata
    assert meta["ss_output_name"] == "dog" and meta["modelspec.title"] == "dog" and meta["ss_base_model_version"] == "sd_v1"


def test_unusable_lora_files_are_refused(tmp_path):
    dora = save_safetensors_atomic({"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.dora_scale": torch.zeros(1)},
                                   tmp_path / "dora.safetensors")
    with pytest.raises(FormatError, match="DoRA"):
        read_lora(dora)
    model = save_safetensors_atomic({"conv_in.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(FormatError, match="not a LoRA"):
        read_lora(model)
    half = save_safetensors_atomic({"unet.a.to_q.lora_A.weight": torch.zeros(1, 2)}, tmp_path / "half.safetensors")
    with pytest.raises(FormatError, match="no up weight"):
        read_lora(half)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(FormatError, match="corrupt"):
        read_lora(corrupt)


def test_non_finite_weights_are_refused_naming_the_tensor_and_still_inspected(tmp_path):
    import os

    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    up = torch.ones(8, 2)
    up[0, 0], up[1, 1] = float("nan"), float("inf")
    lora = save_lora(LoraState({key: LoraLayer(torch.ones(2, 4), up, 2.0)}), tmp_path / "nan.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert lora.stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' 0600
    with pytest.raises(FormatError, match=rf"{key}\.lora\.up\.weight \(1 NaN, 1 infinite\)"):
        read_lora(lora)
    with pytest.raises(FormatError, match="not finite"):
        convert_lora(lora, tmp_path / "k.safetensors", "kohya", family="sd1")
    assert not (tmp_path / "k.safetensors").exists()
    assert inspect_lora(lora).num_layers == 1  # inspection still describes it
    emb = save_embedding(tmp_path / "emb", "<t>", torch.full((1, 32), float("nan")))[0]
    with pytest.raises(FormatError, match=r"<t> \(32 NaN\)"):
        read_embedding(emb)
    assert read_embedding(emb, finite=False).token == "<t>"
    with pytest.raises(FormatError, match="weight nan is not a finite number"):
        load_lora_files(tiny_pipe("sd"), [(lora, float("nan"))])
    with pytest.raises(FormatError, match="is the input file"):
        convert_lora(lora, lora, "peft")


# ---------------------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------------------


def _vectors(pipe, n=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    out = {"text_encoder": torch.randn(n, pipe.text_encoder.config.hidden_size, generator=g)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        out["text_encoder_2"] = torch.randn(n, pipe.text_encoder_2.config.hidden_size, generator=g)
    return out


def _prompt_embeds(pipe, prompt):
    if getattr(pipe, "text_encoder_2", None) is not None:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        return embeds, pooled
    return pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0], None


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("layout", ["diffusers", "single"])
def test_embedding_round_trip_matches_load_textual_inversion(kind, layout, tmp_path):
    from safetensors.torch import load_file

    ours, theirs = tiny_pipe(kind), tiny_pipe(kind)
    vectors, token = _vectors(ours), "<cat-toy>"
    target = tmp_path / ("emb" if layout == "diffusers" else "cat-toy.safetensors")
    files = save_embedding(target, token, vectors, layout=layout)
    emb = read_embedding(target)
    assert emb.token == token and emb.num_vectors == 2
    assert emb.format == ("sdxl" if kind == "sdxl" and layout == "single" else "diffusers")
    for enc, v in vectors.items():
        assert torch.equal(emb.vectors[enc], v)

    rows_before = ours.text_encoder.get_input_embeddings().weight.detach().clone()
    assert load_embedding_into(ours, target) == [token, f"{token}_1"]
    rows_after = ours.text_encoder.get_input_embeddings().weight
    assert torch.equal(rows_after[: rows_before.shape[0]], rows_before)  # only new rows

    encoders = [(theirs.text_encoder, theirs.tokenizer, "text_encoder")]
    if kind == "sdxl":
        encoders.append((theirs.text_encoder_2, theirs.tokenizer_2, "text_encoder_2"))
    for (te, tok, enc), key in zip(encoders, ("clip_l", "clip_g")):
        if layout == "diffusers":
            source = str(files[0] if enc == "text_encoder" else files[1])
        else:
            source = load_file(files[0])[key if kind == "sdxl" else token]
        theirs.load_textual_inversion(source, token=token, text_encoder=te, tokenizer=tok)
    prompt = f"a photo of {token} on the table"
    mine, pooled = _prompt_embeds(ours, prompt)
    ref, ref_pooled = _prompt_embeds(theirs, prompt)
    torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    if kind == "sdxl":
        torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)
    plain, _ = _prompt_embeds(tiny_pipe(kind), prompt)
    assert not torch.allclose(mine, plain)  # the token was really learned-vector conditioned


def test_a1111_pt_read_and_pickled_objects_refused(tmp_path):
    pipe = tiny_pipe("sd")
    vec = _vectors(pipe, n=3)["text_encoder"]
    pt = tmp_path / "style.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "mystyle", "step": 1500,
                "sd_checkpoint": "a9263745", "sd_checkpoint_name": "v1-5-pruned"}, pt)
    emb = read_embedding(pt)
    assert (emb.token, emb.format) == ("mystyle", "a1111") and torch.equal(emb.vectors["text_encoder"], vec)
    theirs = tiny_pipe("sd")
    theirs.load_textual_inversion(str(pt))
    load_embedding_into(pipe, pt)
    prompt = "a painting in the style of mystyle"
    torch.testing.assert_close(_prompt_embeds(pipe, prompt)[0], _prompt_embeds(theirs, prompt)[0], rtol=0, atol=0)

    evil = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": vec}, "name": "x", "payload": _Payload()}, evil)
    with pytest.raises(FormatError, match="cannot be read safely.*_Payload.*to .safetensors on a machine you trust") as e:
        read_embedding(evil)
    assert "weights_only" not in str(e.value)  # torch's advice to load it anyway is not repeated


class _Payload:
    """Stands in for the arbitrary object a malicious pickle would carry."""


def test_embedding_errors_width_vocabulary_family(tmp_path):
    sd, sdxl = tiny_pipe("sd"), tiny_pipe("sdxl")
    wide = save_embedding(tmp_path / "wide", "<w>", torch.zeros(1, 768))[0]
    with pytest.raises(FormatError, match=r"768 wide.*32 wide"):
        load_embedding_into(sd, wide)
    ok = save_embedding(tmp_path / "ok", "<ok>", _vectors(sd, n=1))[0]
    with pytest.raises(FormatError, match="already in the text_encoder vocabulary"):
        load_embedding_into(sd, ok, token="dog")
    load_embedding_into(sd, ok)
    with pytest.raises(FormatError, match="already in the text_encoder vocabulary"):
        load_embedding_into(sd, ok)
    with pytest.raises(FormatError, match="text_encoder_2"):  # an SD embedding cannot condition SDXL's 2nd encoder
        load_embedding_into(sdxl, ok)
    assert "<ok>" not in sdxl.tokenizer.get_vocab()  # nothing was added before the refusal


def test_diffusers_embedding_layout_accepts_a_folder_with_a_dot_in_its_name(tmp_path):
    """An output folder such as outputs/sd1.5-cat is a folder, not a file with suffix '.5-cat'."""
    vec = torch.randn(2, 32)
    written = save_embedding(tmp_path / "sd1.5-cat", "<cat>", vec)
    assert [p.name for p in written] == ["learned_embeds.safetensors"]
    assert torch.equal(read_embedding(tmp_path / "sd1.5-cat").vectors["text_encoder"], vec)
    with pytest.raises(ValueError, match="folder"):
        save_embedding(tmp_path / "cat.safetensors", "<cat>", vec)


def test_a_file_mixing_both_diffusers_layouts_loads_whole(tmp_path):
    """diffusers' own writer renames attention keys to lora.down but leaves ResNet convolutions as lora_A; on a UNet
    whose first level has no attention (the toy model) load_lora_weights then keeps only the convolutions.
    load_lora_files loads every layer."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    from customize.methods import lora
    from customize.models import load_pipeline
    from customize.toy.experiments import BASE_DIR

    trained = load_pipeline(str(BASE_DIR))
    cfg = lora.LoRAConfig(pretrained_model_name_or_path=str(BASE_DIR), lora_target="attention+conv", rank=2)
    lora.trainable_parameters(trained, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in trained.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    type(trained).save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(trained.unet)),
        unet_lora_adapter_metadata=trained.unet.peft_config["default"].to_dict(),
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert lora_mod._mixed_layouts(path)
    want = {k: layer.delta() for k, layer in lora_state_from_model(trained).layers.items()}

    plain = load_pipeline(str(BASE_DIR))
    plain.load_lora_weights(str(path))
    assert len(lora_state_from_model(plain).layers) < len(want)  # the failure this guards against

    ours = load_pipeline(str(BASE_DIR))
    load_lora_files(ours, [(path, 1.0)])
    got = {k: layer.delta() for k, layer in lora_state_from_model(ours).layers.items()}
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_a_kohya_file_whose_text_encoder_part_diffusers_cannot_read_loads_whole(tmp_path):
    """diffusers tells a kohya text-encoder part's layout by its out_proj / fc layers, so a file adapting q_proj
    alone fails in load_lora_weights; load_lora_files rewrites it first and gives the image of its dW."""
    from customize.formats import load_lora_files
    from tests.lora_helpers import image, image_with_delta, tiny_pipe, trained_state

    state = trained_state("sd", 1, unet_targets=["to_q", "to_k"], te_targets=["q_proj"])
    path = save_lora(state, tmp_path / "q_only.safetensors", "kohya")
    pipe = tiny_pipe("sd")
    load_lora_files(pipe, [(path, 1.0)])
    want = image_with_delta("sd", state)
    np.testing.assert_allclose(image(pipe), want, atol=1e-4)
    assert np.abs(want - image(tiny_pipe("sd"))).max() > 1e-3
