"""Bad weight files, data files and arguments, run as a user runs them (real `customize` and recipe processes):
each is refused with exit status 1 and one `error:` line naming the problem, no traceback, and nothing written
(tests/bad_input.py). NaN / infinite weights, pickles that would run code, conversions over their own input or
an existing file, metadata.jsonl lines naming files outside the data folder, generate sizes and numbers."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bad_input import TOY, assert_refused, customize, listing, recipe
from customize.formats import LoraLayer, LoraState, save_embedding, save_lora
from customize.utils import save_safetensors_atomic

KEY = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"


class Payload:
    """Stands in for the object a malicious pickle carries (torch.load(weights_only=True) refuses it)."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_files")
    up = torch.ones(8, 2)
    up[:3, 0] = float("nan")
    nan_lora = save_safetensors_atomic({f"{KEY}.lora_A.weight": torch.ones(2, 4), f"{KEY}.lora_B.weight": up},
                                       d / "nan_lora.safetensors")
    ok = save_lora(LoraState({KEY: LoraLayer(torch.ones(2, 4), torch.ones(8, 2), 2.0)}), d / "ok.safetensors")
    nan_emb = save_embedding(d / "nan_emb.safetensors", "<t>", torch.full((1, 32), float("inf")), layout="single")[0]
    evil = d / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": "x", "payload": Payload()}, evil)
    return {"dir": d, "nan_lora": nan_lora, "ok": ok, "nan_emb": nan_emb, "evil": evil}


def _generate(tmp_path, *args):
    out = tmp_path / "out"
    run = customize("generate", "-m", "tiny-sd", "--steps", "1", "--no-progress", "--out", out, "-p", "x", *args)
    return run, out


# (more generate cases, in-process: tests/test_cli.py::test_generate_refuses_bad_input_and_writes_nothing)
@pytest.mark.parametrize("case", ["nan-lora", "lora-weight-nan", "pickle", "width-0"])
def test_generate_refuses(case, files, tmp_path):
    args, needles = {
        "nan-lora": (["--lora", files["nan_lora"]], [f"{KEY}.lora_B.weight (3 NaN)", "not finite"]),
        "lora-weight-nan": (["--lora", f"{files['ok']}:nan"], ["--lora weight", "'nan'"]),
        "pickle": (["--embedding", f"{files['evil']}:<x>"], ["evil.pt", "cannot be read safely", "Payload",
                                                          "to .safetensors on a machine you trust"]),
        "width-0": (["--width", "0"], ["--width 0", "positive multiple of 8"]),
    }[case]
    run, out = _generate(tmp_path, *args)
    line = assert_refused(run, *needles)
    assert "weights_only" not in line  # torch's advice to load an untrusted pickle anyway is not repeated
    assert listing(out) == {}


def test_generate_refuses_a_lora_made_for_another_model(tmp_path):
    """A LoRA whose layers have another model's widths (here the tiny SDXL's) loads nothing into this one."""
    from customize.models import tiny_pipeline

    layer = tiny_pipeline("sdxl").unet.get_submodule(KEY.removeprefix("unet."))
    other = LoraState({KEY: LoraLayer(torch.randn(2, layer.in_features), torch.randn(layer.out_features, 2), 2.0)})
    path = save_lora(other, tmp_path / "xl_lora.safetensors")
    run, out = _generate(tmp_path, "--lora", path)
    assert_refused(run, "xl_lora.safetensors", "this LoRA was made for", "do not fit")
    assert listing(out) == {}


def test_inspect_reports_non_finite_values_and_convert_refuses_them(files, tmp_path):
    run = customize("inspect", files["nan_lora"], "--json")
    assert run.returncode == 0, run.output
    assert json.loads(run.stdout)["nonfinite"] == {f"{KEY}.lora_B.weight": {"nan": 3, "inf": 0}}
    run = customize("inspect", files["nan_emb"])
    assert run.returncode == 0 and "non-finite:" in run.stdout and "<t> (32 infinite)" in run.stdout, run.output

    before = listing(files["dir"])
    assert_refused(customize("convert", files["nan_lora"], tmp_path / "k.safetensors", "--to", "kohya"),
                   "nan_lora.safetensors", "not finite")
    assert listing(tmp_path) == {}
    assert listing(files["dir"]) == before


def test_convert_never_writes_over_its_input_nor_an_existing_file_unasked(files, tmp_path):
    src = tmp_path / "lora.safetensors"
    src.write_bytes(files["ok"].read_bytes())
    folder = tmp_path / "dog"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(files["ok"].read_bytes())
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"mine")
    before = listing(tmp_path)
    for args in ([src, src, "--to", "kohya"], [folder, folder, "--to", "peft", "--overwrite"]):
        assert_refused(customize("convert", *args), "is the input file")
    assert_refused(customize("convert", src, taken, "--to", "peft"), "taken.safetensors already exists", "--overwrite")
    assert listing(tmp_path) == before

    done = customize("convert", src, taken, "--to", "peft", "--overwrite")
    assert done.returncode == 0, done.output
    assert taken.read_bytes() != b"mine" and set(listing(tmp_path)) == set(before)


def _data(folder, lines):
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(folder / name)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


# (another folder's image, an absolute path, a number: tests/test_data.py::test_metadata_image_columns_stay_inside_the_folder)
@pytest.mark.parametrize("case", ["etc-passwd", "null", "duplicate"])
def test_metadata_jsonl_names_only_images_inside_the_folder(case, tmp_path):
    name, needles = {
        "etc-passwd": ("../../../../etc/passwd", ["line 2", "'../../../../etc/passwd' is outside"]),
        "null": (None, ["line 2", '"file_name" must be the name of an image file', "null"]),
        "duplicate": ("a.png", ["line 2", "'a.png' again (line 1", "one line per image"]),
    }[case]
    data = _data(tmp_path / "data", [{"file_name": "a.png", "text": "one"}, {"file_name": name, "text": "two"}])
    out = tmp_path / "out"
    run = recipe("train_dreambooth_lora", *TOY, "--instance_data_dir", data, "--output_dir", out,
                 "--use_captions", "--max_train_steps", "1")
    assert_refused(run, "metadata.jsonl", *needles)
    assert listing(out) == {}
