"""Training-free LoRA merges (customize.formats.lora_merge, `customize merge`): concat is the exact weighted sum,
SVD at full rank is exact and its energy grows with the rank, TIES / DARE are seeded, modules merge over the
union, sources are left as they were, merged files load in diffusers with the image of the merged dW, and bad
input to the command is refused in one line with nothing written."""

import numpy as np
import pytest
import torch

import customize
from customize.formats import (
    FormatError,
    LoraLayer,
    LoraState,
    UNetLayout,
    block_weights,
    merge_loras,
    read_lora,
    save_lora,
    scale_lora,
)
from customize.formats.lora_merge import SD_LAYOUT, SDXL_LAYOUT, lbw_block
from customize.utils import save_safetensors_atomic
from tests.lora_helpers import image as _image, image_with_delta as _image_with_delta, random_layer, tiny_pipe
from tests.lora_helpers import trained_state as _trained_state
from tests.bad_input import assert_refused, customize as run_customize, listing



def _pair():
    """Two small LoRAs sharing one module, each with one of its own (one a convolution)."""
    g = torch.Generator().manual_seed(0)
    shared = "unet.down_blocks.0.attentions.0.proj_in"
    a = LoraState({shared: random_layer(g, 2), "unet.down_blocks.0.resnets.0.conv1": random_layer(g, 3, conv=True)})
    b = LoraState({shared: random_layer(g, 4, alpha=1.0), "unet.mid_block.attentions.0.proj_out": random_layer(g, 1)})
    return a, b


def _want(states, weights):
    keys = set().union(*(s.layers for s in states))
    return {k: sum(w * s.layers[k].delta() for s, w in zip(states, weights) if k in s.layers) for k in keys}


@pytest.mark.parametrize("method", ["concat", "linear"])
def test_concat_and_linear_are_the_exact_weighted_sum_over_the_union(method):
    a, b = _pair()
    merged, report = merge_loras([a, b], weights=[0.7, -1.3], method=method)
    want = _want([a, b], [0.7, -1.3])
    assert set(merged.layers) == set(want) and len(want) == 3  # the union; absent modules count as zero
    for key, dw in want.items():
        assert (merged.layers[key].delta() - dw).abs().max() <= 1e-5, key
    assert merged.layers["unet.down_blocks.0.attentions.0.proj_in"].rank == 6  # ranks add
    assert report.energy == 1.0
    # linear's default weights are 1/n, concat's 1
    for m, w in (("linear", 0.5), ("concat", 1.0)):
        merged, _ = merge_loras([a, b], method=m)
        for key, dw in _want([a, b], [w, w]).items():
            assert (merged.layers[key].delta() - dw).abs().max() <= 1e-5


def test_scale_folds_into_up():
    a, _ = _pair()
    scaled = scale_lora(a, -0.4)
    for key, layer in a.layers.items():
        assert scaled.layers[key].alpha == layer.alpha and torch.equal(scaled.layers[key].down, layer.down)
        torch.testing.assert_close(scaled.layers[key].delta(), -0.4 * layer.delta())


def test_svd_full_rank_exact_and_energy_monotone():
    a, b = _pair()
    want = _want([a, b], [1.0, 0.5])
    full, report = merge_loras([a, b], weights=[1, 0.5], method="svd", rank=10_000)
    for key, dw in want.items():
        assert (full.layers[key].delta() - dw).abs().max() <= 1e-5, key
        assert full.layers[key].alpha == full.layers[key].rank
    assert report.energy == pytest.approx(1.0, abs=1e-9)
    energies = [merge_loras([a, b], weights=[1, 0.5], method="svd", rank=k)[1].energy for k in range(1, 7)]
    assert all(x <= y + 1e-12 for x, y in zip(energies, energies[1:])) and energies[0] < 0.99
    assert energies[-1] == pytest.approx(1.0, abs=1e-9)
    # an energy target: the least rank reaching it, per module
    merged, report = merge_loras([a, b], method="svd", energy=0.8)
    assert all(e >= 0.8 - 1e-9 for _, e in report.modules.values())
    assert "energy kept" in report.summary()
    # default rank: the largest source rank of each module
    merged, _ = merge_loras([a, b], method="svd")
    assert merged.layers["unet.down_blocks.0.attentions.0.proj_in"].rank == 4
    assert merged.layers["unet.down_blocks.0.resnets.0.conv1"].down.shape == (3, 10, 3, 3)


def test_ties_and_dare_seeded_and_dare_without_drop_is_svd():
    a, b = _pair()
    kw = dict(weights=[1.0, 0.8], rank=10_000)
    d1, _ = merge_loras([a, b], method="dare", drop=0.5, seed=1, **kw)
    d1b, _ = merge_loras([a, b], method="dare", drop=0.5, seed=1, **kw)
    d2, _ = merge_loras([a, b], method="dare", drop=0.5, seed=2, **kw)
    key = "unet.down_blocks.0.attentions.0.proj_in"
    assert all(torch.equal(d1.layers[k].delta(), d1b.layers[k].delta()) for k in d1.layers)
    assert not torch.allclose(d1.layers[key].delta(), d2.layers[key].delta())
    zero, _ = merge_loras([a, b], method="dare", drop=0.0, **kw)
    for k, dw in _want([a, b], [1.0, 0.8]).items():  # drop 0 = the linear sum
        assert (zero.layers[k].delta() - dw).abs().max() <= 1e-5
    t1, _ = merge_loras([a, b], method="ties", density=0.3, **kw)
    t1b, _ = merge_loras([a, b], method="ties", density=0.3, **kw)
    assert all(torch.equal(t1.layers[k].delta(), t1b.layers[k].delta()) for k in t1.layers)
    # TIES by hand on the shared module: trim to 30 %, elect signs, mean of the agreeing kept entries
    da, db = a.layers[key].delta().double(), 0.8 * b.layers[key].delta().double()
    trimmed = []
    for d in (da, db):
        k = int(np.ceil(0.3 * d.numel()))
        thresh = d.abs().flatten().topk(k).values[-1]
        trimmed.append(torch.where(d.abs() >= thresh, d, torch.zeros_like(d)))
    t = torch.stack(trimmed)
    sign = torch.sign(t.sum(0))
    agree = (torch.sign(t) == sign) & (t != 0)
    want = (t * agree).sum(0) / agree.sum(0).clamp(min=1)
    assert (t1.layers[key].delta().double() - want).abs().max() <= 1e-5


def test_sources_unchanged_and_families_refused():
    a, b = _pair()
    before = [{k: (l.down.clone(), l.up.clone(), l.alpha) for k, l in s.layers.items()} for s in (a, b)]
    for method in ("concat", "linear", "svd", "ties", "dare"):
        merge_loras([a, b], method=method, weights=[2.0, 0.5], blocks="*=0.5")
    for s, saved in zip((a, b), before):
        for k, (down, up, alpha) in saved.items():
            assert torch.equal(s.layers[k].down, down) and torch.equal(s.layers[k].up, up) and s.layers[k].alpha == alpha
    sd1 = LoraState({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k":
                     LoraLayer(torch.zeros(1, 768), torch.zeros(320, 1), 1.0)})
    xl = LoraState({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k":
                    LoraLayer(torch.zeros(1, 2048), torch.zeros(640, 1), 1.0)})
    with pytest.raises(FormatError, match=r"sd1\.safetensors is for SD 1\.x, xl\.safetensors for SDXL"):
        merge_loras([sd1, xl], names=["sd1.safetensors", "xl.safetensors"])


def test_block_weights_lbw_mapping_presets_and_diffusers_names():
    sd = {"IN01": "down_blocks.0.attentions.0.proj_in", "IN02": "down_blocks.0.resnets.1.conv1",
          "IN03": "down_blocks.0.downsamplers.0.conv", "IN11": "down_blocks.3.resnets.1.conv1",
          "MID": "mid_block.attentions.0.proj_in", "OUT00": "up_blocks.0.resnets.0.conv1",
          "OUT05": "up_blocks.1.attentions.2.proj_in", "OUT11": "up_blocks.3.attentions.2.proj_out"}
    for block, module in sd.items():
        assert lbw_block(f"unet.{module}", SD_LAYOUT) == block
    xl = {"IN04": "down_blocks.1.attentions.0.proj_in", "IN08": "down_blocks.2.attentions.1.proj_in",
          "OUT00": "up_blocks.0.attentions.0.proj_in", "OUT01": "up_blocks.0.attentions.1.proj_in",
          "OUT08": "up_blocks.2.resnets.2.conv1"}
    for block, module in xl.items():
        assert lbw_block(f"unet.{module}", SDXL_LAYOUT) == block
    assert lbw_block("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", SD_LAYOUT) == "BASE"
    assert lbw_block("unet.time_embedding.linear_1", SD_LAYOUT) is None
    keys = [f"unet.{m}" for m in sd.values()] + ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    # the 17-weight SD list: BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03..OUT11
    w = block_weights("0.1,1,2,0,0,0,0,3,0,0,5,0,0,0,0,0,11", keys, "sd1")
    assert w["unet.down_blocks.0.attentions.0.proj_in"] == 1 and w["unet.down_blocks.0.resnets.1.conv1"] == 2
    assert w["unet.mid_block.attentions.0.proj_in"] == 3 and w["unet.up_blocks.1.attentions.2.proj_in"] == 5
    assert w["unet.up_blocks.3.attentions.2.proj_out"] == 11 and w[keys[-1]] == 0.1
    assert w["unet.up_blocks.0.resnets.0.conv1"] == 1  # OUT00 is not in the 17-weight list: kept
    w = block_weights("*=0,down_blocks.0=0.5,down_blocks.0.attentions=2,MID=3", keys)
    assert w["unet.down_blocks.0.attentions.0.proj_in"] == 2 and w["unet.down_blocks.0.resnets.1.conv1"] == 0.5
    assert w["unet.mid_block.attentions.0.proj_in"] == 3 and w[keys[-1]] == 0
    xl_keys = [f"unet.{m}" for m in xl.values()]
    content = block_weights("BLORA_CONTENT", xl_keys, "sdxl")
    style = block_weights("blora_style", xl_keys, "sdxl")
    assert [k for k, v in content.items() if v] == ["unet.up_blocks.0.attentions.0.proj_in"]
    assert [k for k, v in style.items() if v] == ["unet.up_blocks.0.attentions.1.proj_in"]
    with pytest.raises(ValueError, match="unknown block 'up_blokcs.0'"):
        block_weights("up_blokcs.0=1", keys)
    with pytest.raises(ValueError, match="12 numbers are an SDXL list"):
        block_weights(",".join(["1"] * 12), keys, "sd1")
    # per-LoRA block weights in a merge: content of one, style of the other
    g = torch.Generator().manual_seed(3)
    a = LoraState({k: random_layer(g, 2) for k in xl_keys})
    b = LoraState({k: random_layer(g, 2) for k in xl_keys})
    merged, _ = merge_loras([a, b], blocks=["BLORA_CONTENT", "BLORA_STYLE"])
    c, s = "unet.up_blocks.0.attentions.0.proj_in", "unet.up_blocks.0.attentions.1.proj_in"
    assert (merged.layers[c].delta() - a.layers[c].delta()).abs().max() <= 1e-5
    assert (merged.layers[s].delta() - b.layers[s].delta()).abs().max() <= 1e-5
    assert merged.layers["unet.down_blocks.1.attentions.0.proj_in"].delta().abs().max() == 0


def test_api_is_reexported():
    assert customize.merge_loras is merge_loras and "merge_loras" in dir(customize)
    assert "customize.merge_loras(" in merge_loras.__doc__


# ---------------------------------------------------------------------------------------------------------------
# merged files in a plain diffusers pipeline
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,method,formats", [("sd", "concat", ("diffusers", "peft", "kohya")),
                                                 ("sdxl", "svd", ("diffusers", "kohya"))])
def test_merged_file_loads_in_diffusers_with_the_image_of_the_merged_delta(kind, method, formats, tmp_path):
    a, b = _trained_state(kind, 1), _trained_state(kind, 2)
    merged, _ = merge_loras([a, b], weights=[0.8, 0.6], method=method, **({"rank": 3} if method == "svd" else {}))
    ref = _image_with_delta(kind, merged)
    assert np.abs(ref - _image(tiny_pipe(kind))).max() > 1e-3, "the merge must change the image for the test to mean anything"
    layout = UNetLayout.from_config(tiny_pipe(kind).unet.config)
    for fmt in formats:
        path = save_lora(merged, tmp_path / f"{fmt}.safetensors", fmt, layout=layout,
                         family="sd1" if kind == "sd" else "sdxl")
        back = read_lora(path, layout)
        assert set(back.layers) == set(merged.layers)
        fresh = tiny_pipe(kind)
        fresh.load_lora_weights(str(path))
        np.testing.assert_allclose(_image(fresh), ref, atol=1e-4, err_msg=f"{fmt} file gives another image")


# ---------------------------------------------------------------------------------------------------------------
# `customize merge`: one run that works, and bad input refused
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge")
    a, b = _pair()
    out = {"a": save_lora(a, folder / "a.safetensors"), "b": save_lora(b, folder / "b.safetensors", "peft")}
    sd1 = LoraState({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k":
                     LoraLayer(torch.randn(1, 768), torch.randn(320, 1), 1.0)})
    xl = LoraState({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k":
                    LoraLayer(torch.randn(1, 2048), torch.randn(640, 1), 1.0)})
    out["sd1"] = save_lora(sd1, folder / "sd1.safetensors", "kohya", family="sd1")
    out["xl"] = save_lora(xl, folder / "xl.safetensors", "kohya", family="sdxl")
    out["plain"] = save_safetensors_atomic({"weight": torch.zeros(3, 3)}, folder / "plain.safetensors")
    bad = torch.randn(2, 10)
    bad[0, 0] = float("nan")
    out["nan"] = save_safetensors_atomic({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": bad,
                                          "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(12, 2)},
                                         folder / "nan.safetensors")
    return folder, out


def test_merge_command_writes_the_merge_and_prints_energy(files, tmp_path):
    folder, f = files
    out = tmp_path / "m.safetensors"
    run = run_customize("merge", f["a"], f"{f['b']}:0.5", "--method", "svd", "--rank", "2", "--format", "kohya",
                        "--family", "sd1", "-o", out)
    assert run.returncode == 0, run.output
    assert "energy kept" in run.stdout and "wrote" in run.stdout
    want, _ = merge_loras([f["a"], f["b"]], weights=[1.0, 0.5], method="svd", rank=2)
    back = read_lora(out)
    assert back.format == "kohya" and set(back.layers) == set(want.layers)
    for key, layer in want.layers.items():
        torch.testing.assert_close(back.layers[key].delta(), layer.delta())


@pytest.mark.parametrize("case", ["families", "not_lora", "nan", "block", "rank", "exists", "input"])
def test_merge_command_refuses_bad_input(case, files, tmp_path):
    folder, f = files
    out = tmp_path / "out.safetensors"
    args, needles = {
        "families": ([f["sd1"], f["xl"]], ["sd1.safetensors", "SD 1.x", "xl.safetensors", "SDXL"]),
        "not_lora": ([f["a"], f["plain"]], ["plain.safetensors", "not a LoRA"]),
        "nan": ([f["a"], f["nan"]], ["nan.safetensors", "lora_A"]),
        "block": ([f["a"], f["b"], "--blocks", "up_blokcs.1=0.5"], ["unknown block", "up_blokcs.1"]),
        "rank": ([f["a"], f["b"], "--method", "svd", "--rank", "0"], ["--rank 0"]),
        "exists": ([f["a"], f["b"]], ["already exists", "--overwrite"]),
        "input": ([f["a"], f["b"], "--overwrite"], ["input file"]),
    }[case]
    if case == "exists":
        out.write_bytes(b"keep me")
    if case == "input":
        out = f["a"]
    before, before_inputs = listing(tmp_path), listing(folder)
    assert_refused(run_customize("merge", *args, "-o", out), *needles)
    assert listing(tmp_path) == before and listing(folder) == before_inputs
