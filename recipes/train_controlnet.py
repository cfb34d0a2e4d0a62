"""ControlNet (Zhang et al., 2023) for SD 1.x/2.x and SDXL: train a copy of the UNet's encoder, joined to the frozen
UNet by zero convolutions, on (conditioning image, image, caption) triples.

    accelerate launch recipes/train_controlnet.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_data_dir ./fill50k --resolution 512 --learning_rate 1e-5 --train_batch_size 4 \
        --proportion_empty_prompts 0.5 --validation_prompt "red circle with blue background" \
        --validation_image ./conditioning.png --validation_steps 500 --output_dir outputs/controlnet

Data: a folder whose metadata.jsonl names, per line, the image ("file_name"), its conditioning image
("conditioning_image_file_name", or --conditioning_image_column X: "X_file_name") and its caption ("text"); or
--dataset_name with --image_column / --conditioning_image_column / --caption_column (as diffusers'
train_controlnet.py). --controlnet_model_name_or_path continues from an existing ControlNet. VAE latents and text
states are cached once (--no_cache_latents: every step). Writes a diffusers ControlNet folder into --output_dir
(`ControlNetModel.from_pretrained(output_dir)`; `customize generate --controlnet output_dir --control-image IMG`)
and a README.md model card; `--help` lists every option.
"""

from __future__ import annotations

import sys

from customize.cli import run_recipe
from customize.methods import controlnet
from customize.models import load_base_pipeline
from customize.training import check_run_folder, parse_config, train


def main(argv: list[str] | None = None):
    cfg = parse_config(controlnet.ControlNetConfig, argv)
    cfg.check_inputs()
    check_run_folder(cfg)  # a bad output_dir or resume is refused before anything loads
    pipe = load_base_pipeline(cfg)
    dataset = controlnet.build_dataset(pipe, cfg)
    model = controlnet.build_model(pipe, cfg)
    return train(controlnet.ControlNetMethod(), model, dataset, cfg)


if __name__ == "__main__":
    sys.exit(run_recipe(main))
