"""DreamBooth (Ruiz et al.): full fine-tune of the UNet (optionally the text encoders) on a few images of a
subject, with optional prior preservation. SD 1.x/2.x and SDXL.

    accelerate launch recipes/train_dreambooth.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --instance_data_dir ./dog --instance_prompt "a photo of sks dog" \
        --with_prior_preservation --class_data_dir ./class-dog --class_prompt "a photo of dog" \
        --resolution 512 --learning_rate 5e-6 --max_train_steps 800 --output_dir outputs/sks-dog

Missing class images are generated into --class_data_dir first (resumable). The output folder is a diffusers
pipeline (`DiffusionPipeline.from_pretrained(output_dir)`) with a README.md model card; `--help` lists every
option. `--pretrained_model_name_or_path tiny-sd` (or tiny-sdxl) runs on a seeded few-MB model, no download.
"""

from __future__ import annotations

import sys

from customize.cli import run_recipe
from customize.methods import dreambooth
from customize.models import load_base_pipeline
from customize.training import check_run_folder, parse_config, train


def main(argv: list[str] | None = None):
    cfg = parse_config(dreambooth.DreamBoothConfig, argv)
    check_run_folder(cfg)  # a bad output_dir or resume is refused before anything loads
    pipe = load_base_pipeline(cfg)
    dataset = dreambooth.build_dataset(pipe, cfg)
    return train(dreambooth, pipe, dataset, cfg)


if __name__ == "__main__":
    sys.exit(run_recipe(main))
