"""The README's main job: `customize demo digits` trains the core DDPM through the engine and writes a grid."""

import numpy as np
from PIL import Image

from customize.cli import main


def test_digits_demo_writes_a_scored_grid(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "digits", "--steps", "4", "--sample_steps", "5", "--output_dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "classifier confidence" in text and "asked-for class drawn" in text
    grid = np.asarray(Image.open(out / "digits_grid.png"))
    assert grid.shape == (400, 400) and grid.std() > 0  # ten columns of drawn samples, not a blank image


def test_unknown_demo_is_refused(capsys):
    assert main(["demo", "flowers"]) == 1
    assert "choose toy or digits" in capsys.readouterr().out
