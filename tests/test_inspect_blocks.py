"""Where a LoRA acts (customize.formats.lora_blocks, `customize inspect`'s per-block table and --plot) and the PIL
charts behind it (customize.plots): a block's norm is the norm of its modules' dense updates stacked, the Gram
form equals the dense norm, rows come in UNet order with their LBW ids, and --plot writes a PNG atomically and
refuses what it should in one line."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from customize import cli
from customize.formats import (
    LoraLayer,
    LoraState,
    block_norms,
    inspect_lora,
    lora_state_from_model,
    save_embedding,
    save_lora,
)
from customize.formats.lora_blocks import block_of, update_norm
from customize.plots import PALETTE, bar_chart, range_chart
from customize.utils import save_safetensors_atomic
from tests.bad_input import Run, assert_refused, listing
from tests.lora_helpers import add_lora, random_layer, tiny_pipe

XL_CROSS = 2048  # SDXL's cross-attention width: a LoRA with attn2.to_k of this width is SDXL
STYLE = "up_blocks.0.attentions.1"


@pytest.fixture(scope="module")
def tiny_states():
    """{kind: LoraState}: peft adapters with random B on every component of the tiny SD / SDXL pipelines."""
    return {kind: lora_state_from_model(add_lora(tiny_pipe(kind))) for kind in ("sd", "sdxl")}


def _style_only(zero_elsewhere: bool = False) -> LoraState:
    """An SDXL-shaped LoRA adapting up_blocks.0.attentions.1 (B-LoRA's style block) only; with `zero_elsewhere`,
    zero updates (B = 0, as a LoRA starts training) in two other blocks too."""
    g = torch.Generator().manual_seed(4)
    attn = f"unet.{STYLE}.transformer_blocks.0"
    layers = {f"{attn}.attn1.to_q": random_layer(g, 4, out=64, inn=64),
              f"{attn}.attn2.to_k": random_layer(g, 4, out=64, inn=XL_CROSS),
              f"unet.{STYLE}.proj_in": random_layer(g, 2, out=64, inn=64)}
    if zero_elsewhere:
        for key in ("unet.up_blocks.0.attentions.0.proj_in", "unet.mid_block.attentions.0.proj_in"):
            layer = random_layer(g, 4, out=64, inn=64)
            layers[key] = LoraLayer(layer.down, torch.zeros_like(layer.up), layer.alpha)
    return LoraState(layers)


# ---------------------------------------------------------------------------------------------------------------
# block norms
# ---------------------------------------------------------------------------------------------------------------


def test_update_norm_gram_form_equals_dense_norm():
    g = torch.Generator().manual_seed(0)
    layers = [random_layer(g, 4, out=48, inn=40), random_layer(g, 3, out=8, inn=6, conv=True),
              random_layer(g, 16, out=6, inn=5),  # rank above both widths: the dense product is the cheaper one
              random_layer(g, 2, out=32, inn=32, alpha=-3.0)]
    for layer in layers:
        assert update_norm(layer) == pytest.approx(float(layer.delta().norm()), rel=1e-5)
    half = LoraLayer(layers[0].down.half(), layers[0].up.half(), 2.0)
    assert update_norm(half) == pytest.approx(float(half.delta().norm()), rel=1e-3)
    assert update_norm(LoraLayer(torch.randn(4, 40), torch.zeros(48, 4), 4.0)) == 0.0


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_block_norm_is_the_norm_of_the_blocks_stacked_deltas(kind, tiny_states):
    state = tiny_states[kind]
    rows = block_norms(state)
    assert sum(r.modules for r in rows) == len(state.layers)
    for row in rows:
        keys = [k for k in state.layers if block_of(k) == row.block]
        stacked = torch.cat([state.layers[k].delta().flatten() for k in keys])
        assert row.modules == len(keys) and row.norm == pytest.approx(float(stacked.norm()), rel=1e-5), row.block
    assert sum(r.percent for r in rows) == pytest.approx(100.0, abs=1e-9)
    total = sum(r.norm ** 2 for r in rows)
    assert all(r.percent == pytest.approx(100 * r.norm ** 2 / total) for r in rows)
    encoders = ["text_encoder", "text_encoder_2"] if kind == "sdxl" else ["text_encoder"]
    assert [r.block for r in rows[: len(encoders)]] == encoders and all(r.lbw == "BASE" for r in rows[:len(encoders)])
    unet = [r.block for r in rows[len(encoders):]]
    assert {b.split(".")[0] for b in unet} == {"down_blocks", "mid_block", "up_blocks"}
    sides = [("down_blocks", "mid_block", "up_blocks").index(b.split(".")[0]) for b in unet]
    assert sides == sorted(sides)


def test_rows_follow_the_unet_forward_order():
    g = torch.Generator().manual_seed(1)
    keys = {  # block: one module in it
        "text_encoder": "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2": "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
        "time_embedding": "unet.time_embedding.linear_1",
        "conv_in": "unet.conv_in",
        "down_blocks.0.resnets.0": "unet.down_blocks.0.resnets.0.conv1",
        "down_blocks.0.attentions.0": "unet.down_blocks.0.attentions.0.proj_in",
        "down_blocks.0.resnets.1": "unet.down_blocks.0.resnets.1.conv1",
        "down_blocks.0.downsamplers": "unet.down_blocks.0.downsamplers.0.conv",
        "down_blocks.2.resnets.0": "unet.down_blocks.2.resnets.0.conv1",
        "mid_block.resnets.0": "unet.mid_block.resnets.0.conv1",
        "mid_block.attentions.0": "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
        "mid_block.resnets.1": "unet.mid_block.resnets.1.time_emb_proj",
        "up_blocks.0.resnets.2": "unet.up_blocks.0.resnets.2.conv2",
        "up_blocks.0.upsamplers": "unet.up_blocks.0.upsamplers.0.conv",
        "up_blocks.2.attentions.0": "unet.up_blocks.2.attentions.0.proj_out",
        "up_blocks.10.resnets.0": "unet.up_blocks.10.resnets.0.conv1",  # 10 after 2: numbers, not text
        "conv_out": "unet.conv_out",
    }
    want = list(keys)
    layers = {k: random_layer(g, 1, out=4, inn=4) for k in reversed(keys.values())}
    rows = block_norms(LoraState(layers))
    assert [r.block for r in rows] == want
    ids = {r.block: r.lbw for r in rows}  # SD layout (no family told by these shapes)
    assert (ids["conv_in"], ids["time_embedding"], ids["conv_out"]) == ("IN00", None, None)
    assert (ids["down_blocks.0.downsamplers"], ids["mid_block.resnets.1"], ids["up_blocks.0.upsamplers"]) == \
        ("IN03", "MID", "OUT02")


@pytest.mark.parametrize("zero_elsewhere", [False, True])
def test_a_style_only_lora_is_nonzero_in_that_block_only(zero_elsewhere):
    state = _style_only(zero_elsewhere)
    rows = {r.block: r for r in block_norms(state)}
    assert rows[STYLE].lbw == "OUT01" and rows[STYLE].modules == 3  # SDXL's layout: told by the 2048 width
    assert rows[STYLE].norm > 0 and rows[STYLE].percent == pytest.approx(100.0)
    others = [r for b, r in rows.items() if b != STYLE]
    assert len(others) == (2 if zero_elsewhere else 0)
    assert all(r.norm == 0 and r.percent == 0 for r in others)
    # an all-zero LoRA (B = 0): every norm and share is 0, no division by zero
    zero = LoraState({k: LoraLayer(v.down, torch.zeros_like(v.up), v.alpha) for k, v in state.layers.items()})
    assert all(r.norm == 0 and r.percent == 0 for r in block_norms(zero))


def test_kohya_sgm_names_are_grouped_as_diffusers_blocks(tmp_path):
    path = save_lora(_style_only(), tmp_path / "style.safetensors", "kohya", family="sdxl")
    info = inspect_lora(path, blocks=True)
    assert [(r.block, r.lbw, r.modules) for r in info.blocks] == [(STYLE, "OUT01", 3)]
    assert "blocks:" in info.summary() and STYLE in info.summary()
    assert inspect_lora(path).blocks is None  # only when asked: convert / merge do not pay for it


# ---------------------------------------------------------------------------------------------------------------
# `customize inspect`
# ---------------------------------------------------------------------------------------------------------------


def _inspect(capsys, *args) -> Run:
    """`customize inspect ARGS` in this process (the command's own error handling, without a subprocess)."""
    status = cli.main(["inspect", *map(str, args)])
    out = capsys.readouterr()
    return Run(status, out.out, out.err)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_states):
    folder = tmp_path_factory.mktemp("inspect")
    return {
        "sdxl": save_lora(tiny_states["sdxl"], folder / "sdxl.safetensors"),
        "style": save_lora(_style_only(), folder / "style.safetensors", "kohya", family="sdxl"),
        "embedding": save_embedding(folder / "emb", "<t>", torch.randn(2, 32))[0],
        "plain": save_safetensors_atomic({"weight": torch.zeros(3, 3)}, folder / "plain.safetensors"),
    }


def test_summary_lists_the_blocks_in_unet_order_and_json_has_them(capsys, files, tiny_states):
    run = _inspect(capsys, files["sdxl"])
    assert run.returncode == 0, run.output
    lines = run.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("blocks:"))
    header, *table = lines[at + 1:]
    assert header.split() == ["block", "LBW", "modules", "||dW||_F", "share"]
    want = block_norms(tiny_states["sdxl"])
    assert [line.split()[0] for line in table] == [r.block for r in want]
    assert sum(float(line.split()[-1].rstrip("%")) for line in table) == pytest.approx(100, abs=0.1 * len(table))
    run = _inspect(capsys, files["sdxl"], "--json")
    blocks = json.loads(run.stdout)["blocks"]
    assert [b["block"] for b in blocks] == [r.block for r in want]
    assert set(blocks[0]) == {"block", "lbw", "modules", "norm", "percent"}
    assert all(math.isclose(b["norm"], r.norm, rel_tol=1e-5) for b, r in zip(blocks, want))


def test_plot_writes_a_png_that_grows_with_the_rows(capsys, files, tiny_states, tmp_path):
    sizes = {}
    for name in ("sdxl", "style"):
        out = tmp_path / f"{name}.png"
        run = _inspect(capsys, files[name], "--plot", out)
        assert run.returncode == 0, run.output
        assert f"wrote {out}" in run.stdout
        with Image.open(out) as image:
            assert image.format == "PNG"
            sizes[name] = image.size
    assert len(block_norms(tiny_states["sdxl"])) > 1 and sizes["sdxl"][1] > sizes["style"][1]
    assert sorted(listing(tmp_path)) == ["sdxl.png", "style.png"]  # no temporary file left
    run = _inspect(capsys, files["style"], "--json", "--plot", tmp_path / "j.png")
    assert json.loads(run.stdout)["plot"] == str(tmp_path / "j.png")


def test_plot_refuses_an_existing_file_unless_overwrite(capsys, files, tmp_path):
    out = tmp_path / "blocks.png"
    out.write_bytes(b"keep me")
    assert_refused(_inspect(capsys, files["style"], "--plot", out), "already exists", "--overwrite")
    assert out.read_bytes() == b"keep me"
    assert _inspect(capsys, files["style"], "--plot", out, "--overwrite").returncode == 0
    with Image.open(out) as image:
        assert image.format == "PNG"


@pytest.mark.parametrize("case", ["embedding", "plain", "suffix", "input"])
def test_plot_refuses_what_it_cannot_draw_in_one_line(case, capsys, files, tmp_path):
    args, needles = {
        "embedding": ([files["embedding"], "--plot", tmp_path / "e.png"], ["--plot", "embedding", "not a LoRA"]),
        "plain": ([files["plain"], "--plot", tmp_path / "p.png"], ["--plot", "plain.safetensors", "not a LoRA"]),
        "suffix": ([files["style"], "--plot", tmp_path / "blocks.txt"], ["--plot", ".png"]),
        "input": ([files["style"], "--plot", files["style"], "--overwrite"], ["--plot", ".png"]),  # never the input
    }[case]
    before, inputs = listing(tmp_path), {k: v.read_bytes() for k, v in files.items()}
    assert_refused(_inspect(capsys, *args), *needles)
    assert listing(tmp_path) == before and {k: v.read_bytes() for k, v in files.items()} == inputs


# ---------------------------------------------------------------------------------------------------------------
# charts
# ---------------------------------------------------------------------------------------------------------------


def _has_colour(image, colour) -> bool:
    return bool((np.asarray(image.convert("RGB")) == np.array(colour, dtype=np.uint8)).all(-1).any())


def test_bar_chart_grows_with_rows_and_takes_zero_empty_and_long_input():
    short = bar_chart(["a", "b"], [1.0, 0.0], title="t", value_label="norm")
    tall = bar_chart([f"row {i}" for i in range(30)], list(range(30)), title="t")
    assert short.size[0] == tall.size[0] and tall.size[1] > short.size[1]
    assert _has_colour(short, PALETTE[0])
    assert not _has_colour(bar_chart(["a", "b"], [0.0, 0.0], title="t"), PALETTE[0])  # no bars at all
    empty = bar_chart([], [], title="nothing")
    assert empty.size[1] < short.size[1]
    long = bar_chart(["x" * 500, "y"], [2.0, float("nan")], title="t", width=400)
    assert long.size[0] == 400
    with pytest.raises(ValueError, match="2 labels for 1 values"):
        bar_chart(["a", "b"], [1.0], title="t")


def test_range_chart_draws_each_series_in_its_colour():
    r = np.random.default_rng(0)
    labels = ["layer 0", "layer 1", "a constant row"]
    series = {"content": [r.normal(0, 1, 200), r.normal(2, 0.5, 50), np.full(7, 1.5)],
              "style": [r.normal(1, 2, 200), np.array([]), np.full(3, 1.5)]}
    image = range_chart(labels, series, title="merger vectors", extra={"|cos|": [0.1, 0.9, 1.0]})
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert _has_colour(image, PALETTE[0]) and _has_colour(image, PALETTE[1]) and not _has_colour(image, PALETTE[2])
    # only the content series: the style colour is gone
    assert not _has_colour(range_chart(labels, {"content": series["content"]}, title="t"), PALETTE[1])
    # every row constant (one value): the axis still has a span, the dots are drawn
    flat = range_chart(["a", "b"], {"content": [np.ones(4), np.ones(9)]}, title="t")
    assert _has_colour(flat, PALETTE[0])
    more = range_chart([f"l{i}" for i in range(12)], {"content": [np.arange(5.0)] * 12}, title="t")
    assert more.size[1] > flat.size[1]
    with pytest.raises(ValueError, match="style.*2 rows for 3 labels"):
        range_chart(labels, {**series, "style": series["style"][:2]}, title="t")
