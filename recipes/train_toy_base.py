"""Train the toy base model from scratch on the procedural toy world (customize.toy), with the shared engine:
stage 1 the VAE, stage 2 the CLIP text encoder and the UNet; then save a StableDiffusionPipeline folder.

    python recipes/train_toy_base.py --output_dir outputs/toy_base --pipeline_dir data/toy/base

About 40 minutes on two idle CPU cores with the defaults (VAE 4 min; text encoder + UNet 5500 steps of batch 64
with the token-grounding loss, 37 min at about 3 steps/s); a busy machine is better served by OMP_NUM_THREADS=1
(spinning OpenMP threads cost more than they give on tiny tensors); minutes on a GPU. `--help` lists every option.
"""

from __future__ import annotations

import sys

from customize.cli import run_recipe
from customize.toy.base import ToyBaseConfig, train_toy_base
from customize.training import parse_config
from customize.training.checkpoint import check_writable


def main(argv: list[str] | None = None):
    cfg = parse_config(ToyBaseConfig, argv)
    check_writable(cfg.output_dir)  # before hours of training, not at the first save
    result = train_toy_base(cfg)
    times = ", ".join(f"{k} {v / 60:.1f} min" for k, v in result.seconds.items())
    print(f"toy base model saved to {result.pipeline_dir} ({times})")
    return result


if __name__ == "__main__":
    sys.exit(run_recipe(main))
