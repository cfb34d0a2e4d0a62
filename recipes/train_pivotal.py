"""Pivotal tuning (diffusers' advanced SDXL DreamBooth-LoRA recipe): new tokens for the subject and a LoRA,
trained together. SD 1.x/2.x and SDXL.

    accelerate launch recipes/train_pivotal.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --instance_data_dir ./dog --instance_prompt "a photo of TOK dog" \
        --token_abstraction TOK --num_new_tokens_per_abstraction 2 --train_text_encoder_ti_frac 0.5 \
        --rank 16 --learning_rate 1e-4 --text_encoder_lr 5e-4 --max_train_steps 1000 --output_dir outputs/tok-dog

Writes pytorch_lora_weights.safetensors beside learned_embeds.safetensors (+ learned_embeds_2.safetensors for
SDXL) and s0.safetensors; then prompt with the placeholder ("a photo of <s0> dog"). `--help` lists every option.
"""

from __future__ import annotations

import sys

from customize.cli import run_recipe
from customize.methods import lora
from customize.methods.pivotal import PivotalConfig, PivotalTuning
from customize.models import load_base_pipeline
from customize.training import check_run_folder, parse_config, train


def main(argv: list[str] | None = None):
    cfg = parse_config(PivotalConfig, argv)
    check_run_folder(cfg)  # a bad output_dir or resume is refused before anything loads
    pipe = load_base_pipeline(cfg)
    dataset = lora.build_dataset(pipe, cfg)
    result = train(PivotalTuning(), pipe, dataset, cfg)
    return pipe, result


if __name__ == "__main__":
    sys.exit(run_recipe(main))
