"""Bad options and environment, as a user meets them: each recipe or `customize` process ends with exit status 1,
one `error:` line that names the problem and the fix, no traceback, and nothing written. All but the image case
are refused while the options are parsed, before the model loads."""

from __future__ import annotations

import importlib.util
import struct
import zlib

import pytest
import torch
from bad_input import TOY, USAGE_ERROR, assert_refused, customize, listing, recipe
from PIL import Image


def _images(folder, n=2):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (200, 40 * i, 30)).save(folder / f"{i}.png")
    return folder


def _refused(tmp_path, name, *args, needles, config_text=None):
    """Run recipe `name` with the toy flags, an instance folder and an output folder under tmp_path; check the
    refusal and that tmp_path holds the same files afterwards (no output folder, no log, no cache)."""
    data = _images(tmp_path / "data")
    extra = []
    if config_text is not None:
        (tmp_path / "settings.yaml").write_text(config_text)
        extra = ["--config", str(tmp_path / "settings.yaml")]
    data_flag = "--train_data_dir" if name == "train_textual_inversion" else "--instance_data_dir"
    before = listing(tmp_path)
    run = recipe(name, *TOY, data_flag, data, "--output_dir", tmp_path / "out", "--max_train_steps", "1", *extra,
                 *args)
    line = assert_refused(run, *needles)
    assert listing(tmp_path) == before, "the refused run wrote files"
    return line


def test_text_encoder_lr_zero_is_refused(tmp_path):
    # unset is learning_rate; 0 used to mean learning_rate too (`text_encoder_lr or learning_rate`). Negative
    # rates: tests/test_pivotal.py
    _refused(tmp_path, "train_pivotal", "--text_encoder_lr", "0", needles=("text_encoder_lr", "> 0", "got 0"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast is allowed on a GPU")
def test_fp16_without_a_gpu(tmp_path):
    _refused(tmp_path, "train_dreambooth_lora", "--mixed_precision", "fp16",
             needles=("mixed_precision fp16", "GPU", "bf16"))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_8bit_adam_without_bitsandbytes(tmp_path):
    _refused(tmp_path, "train_dreambooth_lora", "--use_8bit_adam", needles=("bitsandbytes", "pip install"))


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_without_xformers(tmp_path):
    _refused(tmp_path, "train_dreambooth", "--enable_xformers_memory_efficient_attention",
             needles=("xformers", "pip install"))


def test_yaml_syntax_error(tmp_path):
    _refused(tmp_path, "train_dreambooth_lora", config_text="rank: 8\nlearning_rate: [1e-4\n",
             needles=("settings.yaml", "not valid YAML", "line 3"))


@pytest.mark.parametrize("text, needles", [
    ("rank: 2.7\n", ("rank", "2.7", "not an integer")),
    ("max_train_steps: 2.9\n", ("max_train_steps", "2.9", "not an integer")),
])
def test_yaml_values_of_the_wrong_type(tmp_path, text, needles):
    _refused(tmp_path, "train_dreambooth_lora", config_text=text, needles=("settings.yaml", *needles))


def test_resolution_zero_says_what_is_allowed(tmp_path):
    line = _refused(tmp_path, "train_textual_inversion", "--resolution", "0",
                    needles=("resolution", "positive", "multiple", "got 0"))
    assert "or 2" not in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_generate_on_cuda_without_cuda(tmp_path):
    before = listing(tmp_path)
    run = customize("generate", "-m", "tiny-sd", "-p", "a red circle", "--steps", "1", "--device", "cuda",
                    "--out", tmp_path / "out", "--no-progress")
    assert_refused(run, "--device cuda", "--device cpu")
    assert listing(tmp_path) == before


def _png_declaring(path, width, height):
    """A few-byte PNG whose header declares width x height pixels (PIL refuses it before decoding)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))


def test_decompression_bomb_png_names_the_file(tmp_path):
    data = _images(tmp_path / "data")
    _png_declaring(data / "huge.png", 30000, 30000)
    before = listing(tmp_path)
    run = recipe("train_dreambooth_lora", *TOY, "--instance_data_dir", data, "--output_dir", tmp_path / "out",
                 "--max_train_steps", "1")
    assert_refused(run, "huge.png", "too large", "downscale")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("args, needles, status", [
    (["--max_train_steps", "many"], ("--max_train_steps", "invalid int value", "'many'"), USAGE_ERROR),
    (["--learning_rat", "1e-4"], ("not used", "--learning_rat"), 1),
], ids=["wrong-type", "misspelt-flag"])
def test_a_bad_command_line_is_refused(tmp_path, args, needles, status):
    """A flag's value of the wrong type (argparse's usage line and status) or a misspelt flag (never a prefix
    match of another), before anything loads."""
    data = _images(tmp_path / "data")
    before = listing(tmp_path)
    run = recipe("train_dreambooth_lora", *TOY, "--instance_data_dir", data, "--output_dir", tmp_path / "out", *args)
    assert_refused(run, *needles, status=status)
    assert listing(tmp_path) == before


def test_a_corrupt_image_names_the_file(tmp_path):
    data = _images(tmp_path / "data")
    good = (data / "0.png").read_bytes()
    (data / "cut.png").write_bytes(good[: len(good) // 2])  # a download cut off midway
    before = listing(tmp_path)
    run = recipe("train_dreambooth_lora", *TOY, "--instance_data_dir", data, "--output_dir", tmp_path / "out",
                 "--max_train_steps", "1")
    assert_refused(run, "cut.png")
    assert listing(tmp_path) == before
