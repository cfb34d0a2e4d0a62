"""ZipLoRA (Shah et al., 2023): merge a content (subject) LoRA and a style LoRA into one LoRA that draws the subject
in the style, by learning one merger vector per LoRA and layer (only the vectors train; 100 steps is typical).

    accelerate launch recipes/train_ziplora.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --content_lora outputs/sks-dog-lora --content_prompt "a sks dog" \
        --style_lora outputs/zwx-style-lora --style_prompt "a cat in zwx style" \
        --resolution 1024 --max_train_steps 100 --learning_rate 5e-5 --output_dir outputs/dog-in-zwx

By default each LoRA first generates --num_images images of its own prompt, which the merged model is then trained
to reproduce (the paper's recipe); --content_data_dir / --style_data_dir train on the LoRAs' own images instead.
Writes the merged LoRA (pytorch_lora_weights.safetensors, or <output folder name>.safetensors with
--lora_format kohya), the vectors (ziplora_vectors.safetensors), their per-layer chart (ziplora_vectors.png) and a
README.md model card; checkpoints every --checkpointing_steps, --resume_from_checkpoint latest resumes.
`--help` lists every option.
"""

from __future__ import annotations

import sys

from customize.cli import run_recipe
from customize.methods import ziplora
from customize.models import load_base_pipeline
from customize.training import check_run_folder, parse_config, train


def main(argv: list[str] | None = None):
    cfg = parse_config(ziplora.ZipLoRAConfig, argv)
    cfg.check_inputs()
    check_run_folder(cfg)  # a bad output_dir or resume is refused before anything loads
    pipe = load_base_pipeline(cfg)
    dataset = ziplora.build_dataset(pipe, cfg)
    return train(ziplora, pipe, dataset, cfg)


if __name__ == "__main__":
    sys.exit(run_recipe(main))
