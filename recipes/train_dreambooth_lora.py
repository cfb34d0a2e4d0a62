"""DreamBooth-LoRA and style LoRA (Hu et al.; Ruiz et al.) for SD 1.x/2.x and SDXL: train low-rank adapters on
the UNet attention projections (optionally all transformer-block linears and the text encoders).

    accelerate launch recipes/train_dreambooth_lora.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --instance_data_dir ./dog --instance_prompt "a photo of sks dog" \
        --resolution 1024 --rank 16 --learning_rate 1e-4 --max_train_steps 500 --output_dir outputs/sks-dog-lora

A style LoRA is the same command on style images, with a style prompt ("a painting in the style of sks") or
per-image captions (--use_captions: metadata.jsonl or .txt files beside the images). Prior preservation works
as in train_dreambooth.py. Writes pytorch_lora_weights.safetensors (load with `pipe.load_lora_weights(dir)`;
--lora_format kohya: <output folder name>.safetensors for A1111 / ComfyUI)
and a README.md model card; `--help` lists every option.
"""

from __future__ import annotations

import sys

from customize.cli import run_recipe
from customize.methods import lora
from customize.models import load_base_pipeline
from customize.training import check_run_folder, parse_config, train


def main(argv: list[str] | None = None):
    cfg = parse_config(lora.LoRAConfig, argv)
    check_run_folder(cfg)  # a bad output_dir or resume is refused before anything loads
    pipe = load_base_pipeline(cfg)
    dataset = lora.build_dataset(pipe, cfg)
    return train(lora, pipe, dataset, cfg)


if __name__ == "__main__":
    sys.exit(run_recipe(main))
