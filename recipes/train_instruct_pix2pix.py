"""InstructPix2Pix (Brooks et al.) for SD 1.x/2.x and SDXL: fine-tune the UNet, its conv_in widened to read the
input image's latent, on (input image, instruction, edited image) triplets, with conditioning dropout for the
two guidance scales.

    accelerate launch recipes/train_instruct_pix2pix.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset_name fusing/instructpix2pix-1000-samples --resolution 256 --random_flip \
        --train_batch_size 4 --gradient_accumulation_steps 4 --max_train_steps 15000 \
        --learning_rate 5e-05 --conditioning_dropout_prob 0.05 --use_ema \
        --validation_prompt "make the mountains snowy" --validation_image ./mountain.png \
        --output_dir outputs/instruct-pix2pix

Data: a datasets-library set (--dataset_name) with the columns --original_image_column (input_image),
--edit_prompt_column (edit_prompt) and --edited_image_column (edited_image), as diffusers'
train_instruct_pix2pix.py; or --train_data_dir, a folder whose metadata.jsonl names per line
"input_image_file_name", "edited_image_file_name" and "edit_prompt" (what `customize.toy.world.export("edits",
...)` and recipes/make_ip2p_pairs.py write). VAE moments of both images and the instructions' text states are
cached once (--no_cache_latents: every step). Writes a diffusers InstructPix2Pix pipeline folder into
--output_dir (`DiffusionPipeline.from_pretrained(output_dir)`; `customize.inference.instruct_edit`) and a
README.md model card; `--help` lists every option.
"""

from __future__ import annotations

import sys

from customize.cli import run_recipe
from customize.methods import instruct_pix2pix
from customize.models import load_base_pipeline
from customize.training import check_run_folder, parse_config, train


def main(argv: list[str] | None = None):
    cfg = parse_config(instruct_pix2pix.InstructPix2PixConfig, argv)
    cfg.check_inputs()
    check_run_folder(cfg)  # a bad output_dir or resume is refused before anything loads
    pipe = load_base_pipeline(cfg)
    dataset = instruct_pix2pix.build_dataset(pipe, cfg)
    model = instruct_pix2pix.build_model(pipe, cfg)
    return train(instruct_pix2pix.InstructPix2PixMethod(), model, dataset, cfg)


if __name__ == "__main__":
    sys.exit(run_recipe(main))
