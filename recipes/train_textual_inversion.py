"""Textual inversion (Gal et al.) for SD 1.x/2.x and SDXL: learn a new word for a concept from a few images.

    accelerate launch recipes/train_textual_inversion.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_data_dir ./cat_toy --placeholder_token "<cat-toy>" --initializer_token toy \
        --learnable_property object --output_dir outputs/cat-toy

Writes learned_embeds.safetensors (+ learned_embeds_2.safetensors for SDXL) and a single-file embedding
into --output_dir; `--help` lists every option (defaults follow diffusers' textual-inversion README).
"""

from __future__ import annotations

import sys

from customize.cli import run_recipe
from customize.methods.textual_inversion import TextualInversion, TextualInversionConfig, build_dataset
from customize.models import load_base_pipeline
from customize.training import check_run_folder, parse_config, train


def main(argv: list[str] | None = None):
    cfg = parse_config(TextualInversionConfig, argv)
    check_run_folder(cfg)  # a bad output_dir or resume is refused before anything loads
    pipe = load_base_pipeline(cfg)
    dataset = build_dataset(pipe, cfg)
    result = train(TextualInversion(), pipe, dataset, cfg)
    return pipe, result


if __name__ == "__main__":
    sys.exit(run_recipe(main))
