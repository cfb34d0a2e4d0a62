"""`customize edit` on tiny-sd (3 steps, 32 pixels): the files it writes, the source image is the plain
generation of the source prompt, --overwrite, and one-line refusals of bad input with nothing written."""

import json

import numpy as np
import pytest
from PIL import Image

from customize.cli import main
from tests.bad_input import assert_refused, customize

SOURCE = "a red circle on a blue background"
TARGET = "a red square on a blue background"
EDIT = ["edit", "-m", "tiny-sd", "--steps", "3", "--no-progress", "--prompt", SOURCE]


def _png(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_edit_writes_source_edits_attention_and_grid(tmp_path):
    out = tmp_path / "edit"
    args = [*EDIT, "--target", TARGET, "--target", "a red triangle on a blue background", "--blend", "circle",
            "--blend", "square", "--blend", "triangle", "--reweight", "square=2", "-o", str(out)]
    assert main(args) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["attention.png", "edit.json", "edited-0.png", "edited-1.png", "grid.png", "source.png"]
    record = json.loads((out / "edit.json").read_text())
    assert record["targets"][1].startswith("a red triangle") and record["blend"] == ["circle", "square", "triangle"]
    assert Image.open(out / "grid.png").size == (3 * 32, 32)  # source and the two edits side by side
    assert Image.open(out / "attention.png").width >= len(SOURCE.split()) * 128  # one tile per source word
    # the source is the plain generation of the source prompt from the same seed
    assert main(["generate", "-m", "tiny-sd", "--steps", "3", "--no-progress", "-p", SOURCE, "--guidance", "7.5",
                 "--out", str(tmp_path / "plain")]) == 0
    assert np.abs(_png(out / "source.png") - _png(tmp_path / "plain" / "000-00-seed0.png")).max() <= 1
    # an earlier edit's files are refused unless --overwrite
    assert main(args) == 1
    assert main([*args, "--overwrite"]) == 0
    # LocalBlend's defaults by what the mask marks, recorded as used: generous for the region that changes, tight
    # for the region that is kept
    assert (record["blend_threshold"], record["blend_dilation"], record["blend_invert"]) == (0.3, 1, False)
    assert main([*args, "--overwrite", "--blend-invert"]) == 0
    record = json.loads((out / "edit.json").read_text())
    assert (record["blend_threshold"], record["blend_dilation"], record["blend_invert"]) == (0.4, 0, True)


LONG = " ".join(["a red circle"] * 30)


@pytest.mark.parametrize("case", ["word-count", "too-long", "blend-word", "reweight-word", "no-target",
                                  "image-alone", "image-mode", "blend-dilation"])
def test_edit_refuses_bad_input_and_writes_nothing(case, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(photo)
    args = {
        "word-count": ["--target", "a red square on a light blue background"],
        "too-long": ["--prompt", LONG, "--target", LONG.replace("circle", "square")],
        "blend-word": ["--target", TARGET, "--blend", "triangle"],
        "reweight-word": ["--target", TARGET, "--reweight", "circle=2"],
        "no-target": [],
        "image-alone": ["--target", TARGET, "--image", str(photo)],
        "image-mode": ["--target", TARGET, "--image", str(photo.with_name("rgba.png")), "--inversion", "ddim"],
        "blend-dilation": ["--target", TARGET, "--blend", "circle", "--blend-dilation", "-1"],
    }[case]
    Image.new("RGBA", (32, 32)).save(photo.with_name("rgba.png"))
    out = tmp_path / "out"
    assert main([*EDIT, "-o", str(out), *args]) == 1
    err = capsys.readouterr().err
    expected = {"word-count": "use --refine", "too-long": "tokens long", "blend-word": "--blend 'triangle'",
                "reweight-word": "--reweight 'circle'", "no-target": "no target", "image-alone": "go together",
                "image-mode": "RGBA", "blend-dilation": "--blend-dilation -1"}[case]
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_edit_refusal_as_a_user_sees_it(tmp_path):
    run = customize(*EDIT, "--target", "a red square", "-o", str(tmp_path / "out"))
    assert_refused(run, "--replace swaps words one for one", "--refine")
    assert not (tmp_path / "out").exists()


def test_edit_of_a_real_image_through_direct_inversion(tmp_path):
    """--image --inversion direct: the source is the photo through the VAE (direct inversion reproduces its latent
    exactly), and the target is edited."""
    import torch

    from customize.models import tiny_pipeline

    g = np.random.default_rng(0)
    photo = tmp_path / "photo.png"
    Image.fromarray(g.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "edit"
    assert main([*EDIT, "--target", TARGET, "--image", str(photo), "--inversion", "direct", "-o", str(out)]) == 0
    pipe = tiny_pipeline("sd")
    with torch.no_grad():
        x = torch.from_numpy(_png(photo)).permute(2, 0, 1)[None].float() / 127.5 - 1
        latents = pipe.vae.encode(x).latent_dist.mode()
        back = pipe.image_processor.postprocess(pipe.vae.decode(latents).sample, output_type="pil")[0]
    assert np.abs(_png(out / "source.png") - np.asarray(back).astype(int)).max() <= 1
    assert np.abs(_png(out / "edited-0.png") - _png(out / "source.png")).max() > 0
