"""The `customize` command, run in-process through customize.cli.main on the tiny models."""

import json
import re
import sys
import types

import numpy as np
import pytest
import torch
from peft import LoraConfig
from PIL import Image

from customize.cli import build_parser, main, parse_embedding_spec, parse_lora_spec
from customize.formats import load_embedding_into, lora_state_from_model, read_lora, save_embedding, save_lora
from customize.models import tiny_pipeline


def _lora_state(kind):
    pipe = tiny_pipeline(kind)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if kind == "sdxl":
        pipe.text_encoder_2.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    g = torch.Generator().manual_seed(7)
    for comp in (pipe.unet, getattr(pipe, "text_encoder_2", None)):
        for name, p in comp.named_parameters() if comp is not None else ():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.3
    return lora_state_from_model(pipe)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_files")
    emb_vectors = torch.randn(1, 32, generator=torch.Generator().manual_seed(4))
    return {
        "kohya": save_lora(_lora_state("sd"), d / "dog_kohya.safetensors", "kohya"),
        "diffusers": save_lora(_lora_state("sd"), d / "dog"),
        "sdxl": save_lora(_lora_state("sdxl"), d / "xl.safetensors"),
        "embedding": save_embedding(d / "emb", "<tok>", emb_vectors)[0],
    }


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_tiny_sd_with_lora_and_embedding_matches_the_pipeline(files, tmp_path):
    out = tmp_path / "out"
    prompt = "a photo of <tok> on the table"
    rc = main(["generate", "-m", "tiny-sd", "-p", prompt, "--steps", "2", "--num-images", "2", "--seed", "3",
               "--lora", f"{files['kohya']}:0.5", "--embedding", str(files["embedding"]), "--out", str(out), "--no-progress"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["000-00-seed3.png", "000-01-seed4.png", "generation.json", "grid.png"]
    assert Image.open(out / "grid.png").size == (2 * 32, 32)
    record = json.loads((out / "generation.json").read_text())
    assert record["loras"] == [{"file": str(files["kohya"]), "weight": 0.5}] and record["seed"] == 3

    pipe = tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    load_embedding_into(pipe, files["embedding"])

    def run():
        gens = [torch.Generator().manual_seed(3 + j) for j in range(2)]
        return [np.asarray(im) for im in pipe(prompt, num_inference_steps=2, num_images_per_prompt=2, generator=gens).images]

    plain = run()
    pipe.load_lora_weights(str(files["kohya"]), adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.5])
    ref = run()
    for j, seed in enumerate((3, 4)):
        got = _png(out / f"000-{j:02d}-seed{seed}.png")
        np.testing.assert_array_equal(got, ref[j])
        assert np.abs(got.astype(int) - plain[j].astype(int)).max() > 0  # the LoRA at 0.5 did change it


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_generate_fuse_gives_the_unfused_images(files, tmp_path, kind):
    """--fuse folds two LoRAs at their weights into the base weights (text-encoder layers too, for the SDXL one):
    the images equal the unfused ones up to float rounding, and differ from the base model's."""
    loras = ["--lora", f"{files['kohya']}:0.5", "--lora", f"{files['diffusers']}:0.8"] if kind == "sd" else \
        ["--lora", f"{files['sdxl']}:0.7"]
    common = ["generate", "-m", f"tiny-{kind}", "-p", "a photo of a dog", "--steps", "2", "--seed", "5",
              "--no-progress"]
    images = {}
    for name, extra in (("base", []), ("unfused", loras), ("fused", [*loras, "--fuse"])):
        assert main([*common, *extra, "--out", str(tmp_path / name)]) == 0
        images[name] = _png(tmp_path / name / "000-00-seed5.png").astype(int)
    assert np.abs(images["fused"] - images["unfused"]).max() <= 2
    assert np.abs(images["unfused"] - images["base"]).max() > 10
    assert json.loads((tmp_path / "fused" / "generation.json").read_text())["fused"] is True


def test_generate_tiny_sdxl_prompts_file_and_scheduler(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\na red circle\n\na blue square\n")
    out = tmp_path / "out"
    assert main(["generate", "-m", "tiny-sdxl", "--prompts-file", str(prompts), "--steps", "2", "--scheduler", "euler",
                 "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "generation.json").read_text())
    assert record["prompts"] == ["a red circle", "a blue square"] and record["scheduler"] == "EulerDiscreteScheduler"
    assert Image.open(out / "grid.png").size == (32, 2 * 32)  # one row per prompt
    assert not np.array_equal(_png(out / "000-00-seed0.png"), _png(out / "001-00-seed0.png"))


@pytest.mark.parametrize("case", ["corrupt", "wrong-family", "bad-size", "no-prompt", "missing-file", "width-0",
                                  "guidance-nan", "lora-weight-inf", "inf-embedding"])
def test_generate_refuses_bad_input_and_writes_nothing(case, files, tmp_path, capsys):
    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"\x00" * 40)
    out = tmp_path / "out"
    args = {
        "corrupt": ["-p", "x", "--lora", str(corrupt)],
        "wrong-family": ["-p", "x", "--lora", f"{files['sdxl']}:1.0"],
        "bad-size": ["-p", "x", "--width", "36"],
        "no-prompt": [],
        "missing-file": ["-p", "x", "--embedding", str(tmp_path / "nope.pt:<t>")],
        "width-0": ["-p", "x", "--height", "0"],
        "guidance-nan": ["-p", "x", "--guidance", "nan"],
        "lora-weight-inf": ["-p", "x", "--lora", f"{files['kohya']}:inf"],
        "inf-embedding": ["-p", "x", "--embedding", str(save_embedding(tmp_path / "e", "<i>", torch.full((1, 32), float("inf")))[0])],
    }[case]
    assert main(["generate", "-m", "tiny-sd", "--steps", "1", "--out", str(out), "--no-progress", *args]) == 1
    err = capsys.readouterr().err
    expected = {"corrupt": r"broken\.safetensors.*corrupt", "wrong-family": r"SDXL.*but the model is SD 1\.x",
                "bad-size": r"--width 36: must be a positive multiple of 8.*try 32 or 40", "no-prompt": "no prompt",
                "missing-file": r"nope\.pt: no such file", "width-0": r"--height 0: must be a positive multiple of 8",
                "guidance-nan": r"--guidance nan: must be a finite number", "lora-weight-inf": r"--lora weight .*'inf'",
                "inf-embedding": r"tensor <i> \(32 infinite\)"}[case]
    assert re.search(expected, err, flags=re.S), err
    assert not out.exists()


def test_inspect_lora_embedding_and_plain_tensors(files, tmp_path, capsys):
    def inspect(path):
        assert main(["inspect", str(path), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    lora = inspect(files["kohya"])
    assert (lora["kind"], lora["format"], lora["ranks"], lora["alphas"]) == ("lora", "kohya", [4], [2.0])
    assert lora["parts"] == {"unet": 32} and "attn2.to_k" in lora["target_modules"]
    assert inspect(files["diffusers"].parent)["format"] == "diffusers"  # a folder
    emb = inspect(files["embedding"])
    assert (emb["kind"], emb["token"], emb["vectors"]) == ("embedding", "<tok>", {"text_encoder": [1, 32]})
    from customize.utils import save_safetensors_atomic

    plain = save_safetensors_atomic({"conv.weight": torch.zeros(2, 3), "conv.bias": torch.zeros(2)}, tmp_path / "m.safetensors", {"k": "v"})
    listing = inspect(plain)
    assert listing["kind"] == "tensors" and listing["tensors"]["conv.weight"] == {"shape": [2, 3], "dtype": "F32"}
    assert listing["metadata"] == {"k": "v"}
    assert main(["inspect", str(files["kohya"])]) == 0
    assert "kohya format" in capsys.readouterr().out


def test_convert_command_keeps_every_delta(files, tmp_path, capsys):
    assert main(["convert", str(files["diffusers"]), str(tmp_path), "--to", "kohya", "--model", "tiny-sd"]) == 0
    kohya = tmp_path / "dog.safetensors"  # a folder OUT takes the input folder's name for kohya
    assert "kohya format" in capsys.readouterr().out
    assert main(["convert", str(kohya), str(tmp_path / "p.safetensors"), "--to", "peft"]) == 0
    src, k, p = read_lora(files["diffusers"]), read_lora(kohya), read_lora(tmp_path / "p.safetensors")
    assert (k.format, p.format, k.metadata["ss_base_model_version"]) == ("kohya", "peft", "sd_v1")
    for key, layer in src.layers.items():
        assert torch.equal(k.layers[key].delta(), layer.delta()) and torch.equal(p.layers[key].delta(), layer.delta())
    assert main(["convert", str(files["sdxl"]), str(tmp_path / "x.safetensors"), "--to", "kohya", "--model", "tiny-sd"]) == 1
    assert "but the model is SD 1.x" in capsys.readouterr().err


def test_demo_and_bench_are_passed_through_or_explained(monkeypatch, capsys):
    seen = []
    demo = types.ModuleType("customize.demo")
    demo.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "customize.demo", demo)
    assert main(["demo", "--steps", "3", "--help"]) == 0 and seen == [["--steps", "3", "--help"]]
    monkeypatch.setitem(sys.modules, "customize.bench", None)  # as if not installed
    assert main(["bench"]) == 1 and "not available" in capsys.readouterr().err


def test_generate_device_is_checked_before_anything_loads(monkeypatch):
    from customize.cli import generate_device

    assert generate_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'gpu' is not a device name: use cuda, cuda:1, mps or cpu"):
        generate_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda:1: .*; use --device (cpu|mps), or leave --device out"):
        generate_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="has 1 CUDA GPU"):
        generate_device("cuda:1")
    loaded = []
    monkeypatch.setattr("customize.models.load_pipeline", lambda *a, **k: loaded.append(a))
    with pytest.raises(ValueError, match="has 1 CUDA GPU"):
        from customize.cli import cmd_generate, build_parser

        cmd_generate(build_parser().parse_args(["generate", "-m", "tiny-sd", "-p", "x", "--device", "cuda:3"]))
    assert not loaded


def test_specs_and_help():
    assert parse_lora_spec("a/b.safetensors:0.75") == ("a/b.safetensors", 0.75)
    assert parse_lora_spec("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_embedding_spec("e.pt:<my-style>") == ("e.pt", "<my-style>")
    with pytest.raises(ValueError, match="after ':'"):
        parse_lora_spec("a.safetensors:strong")
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    assert set(sub) == {"generate", "edit", "inspect", "convert", "merge", "env", "demo", "bench"}
    for name in ("generate", "edit", "inspect", "convert", "merge", "env"):
        assert "examples:" in sub[name].format_help()
