"""Train a pixel-space DDPM with the from-scratch core (customize.core) on the shared engine.

    accelerate launch recipes/train_ddpm.py --dataset_name digits --class_conditional --output_dir outputs/digits
    python recipes/train_ddpm.py --train_data_dir ./flowers --resolution 32 --block_out_channels 64 128 256 \
        --output_dir outputs/flowers --resume_from_checkpoint latest

EMA, checkpoints every --checkpointing_steps, exact resume (--resume_from_checkpoint latest), DDIM sample grids
under OUTPUT_DIR/validation/ every --validation_steps and a progress bar come from the engine. The output folder
is a diffusers DDPMPipeline; `--help` lists every option.
"""

from __future__ import annotations

import sys

from customize.cli import run_recipe
from customize.methods.ddpm import DDPM, DDPMConfig, build_dataset, build_model
from customize.training import check_run_folder, parse_config, train


def main(argv: list[str] | None = None):
    cfg = parse_config(DDPMConfig, argv)
    check_run_folder(cfg)  # a bad output_dir or resume is refused before anything loads
    dataset = build_dataset(cfg)
    model = build_model(cfg, channels=dataset.channels, classes=dataset.classes)
    result = train(DDPM(), model, dataset, cfg)
    return model, result


if __name__ == "__main__":
    sys.exit(run_recipe(main))
