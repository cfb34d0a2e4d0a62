"""The shared training configuration and the one argument parser.

`TrainConfig` holds the fields every method shares; a method subclasses it and adds its own. The dataclass is
the single source of truth for defaults: `parse_config` turns it into command-line flags with
`transformers.HfArgumentParser` (the diffusers examples' flag names) and also reads `--config file.yaml|json`,
whose values become the defaults that explicit flags then override.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "all", "none")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the compile modes that record CUDA graphs on a GPU

C = TypeVar("C")


@dataclass
class TrainConfig:
    output_dir: str = field(default="outputs/run", metadata={"help": "Folder for checkpoints, logs and final weights."})
    seed: int = field(default=0, metadata={"help": "Seed of every random stream (data order, augmentation, noise)."})
    max_train_steps: int = field(default=100, metadata={"help": "Number of optimizer steps."})
    train_batch_size: int = field(default=1, metadata={"help": "Examples per process per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = 1e-4
    scale_lr: bool = field(
        default=False,
        metadata={"help": "Multiply the learning rate by batch size x accumulation steps x number of processes."},
    )
    lr_scheduler: str = field(
        default="constant",
        metadata={"help": "diffusers schedule: linear, cosine, cosine_with_restarts, polynomial, constant, "
                          "constant_with_warmup, piecewise_constant."},
    )
    lr_warmup_steps: int = 0
    lr_num_cycles: int = field(default=1, metadata={"help": "Hard restarts of cosine_with_restarts."})
    lr_power: float = field(default=1.0, metadata={"help": "Power of the polynomial schedule."})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = field(default=False, metadata={"help": "bitsandbytes AdamW8bit (pip install bitsandbytes)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm; 0 turns clipping off."})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16 (autocast; trained weights stay fp32)."})
    gradient_checkpointing: bool = False
    allow_tf32: bool = field(default=False, metadata={"help": "TF32 matmuls and convolutions on Ampere+ GPUs."})
    enable_xformers_memory_efficient_attention: bool = field(
        default=False, metadata={"help": "xformers attention instead of PyTorch SDPA (needs pip install xformers)."}
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the trained module(s)."})
    compile_mode: str = field(
        default="default",
        metadata={"help": "torch.compile mode on CUDA: default, reduce-overhead (CUDA graphs: removes the launch-bound "
                          "floor of small steps; needs gradient_accumulation_steps 1), max-autotune (also CUDA "
                          "graphs) or max-autotune-no-cudagraphs."},
    )
    logging_steps: int = field(
        default=1,
        metadata={"help": "Read the loss back to the host every N steps (progress bar, trackers). Above 1 a GPU step "
                          "no longer waits for the host each step; non-finite losses are caught at that interval."},
    )
    checkpointing_steps: int = field(default=500, metadata={"help": "Save a resumable checkpoint every N steps (0: never)."})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep at most this many checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' for the newest one in output_dir."}
    )
    validation_steps: int = field(default=0, metadata={"help": "Run the method's validation every N steps (0: off)."})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard, wandb, all or none."})
    tracker_project_name: str = field(default="customize", metadata={"help": "Run name given to the trackers."})
    use_ema: bool = field(default=False, metadata={"help": "Keep an exponential moving average of the trained weights."})
    ema_decay: float = 0.9999
    dataloader_num_workers: int = 0
    cache_latents: bool = field(
        default=True, metadata={"help": "Let the method precompute per-example features (VAE latents, text states)."}
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"report_to must be one of {REPORT_TO}, got {self.report_to!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpointing_steps", "validation_steps", "lr_warmup_steps", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError("checkpoints_total_limit must be >= 1 (or unset for no limit)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or JSON mapping of field name -> value."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    elif path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        raise ValueError(f"config file {path} must end in .yaml, .yml or .json")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values, got {type(data).__name__}")
    return data


def parse_config(config_cls: type[C], argv: list[str] | None = None) -> C:
    """Build `config_cls` from command-line flags (one flag per dataclass field, `--help` lists them).

    `--config file.yaml` (or .json) supplies values first; flags given explicitly override them. Unknown keys in
    the file and unknown flags are errors, so a typo never silently falls back to a default."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    # No prefix matching: "--lr" must not silently mean "--lr_scheduler".
    parser = HfArgumentParser(config_cls, allow_abbrev=False)
    parser.add_argument("--config", type=str, default=None, help="YAML or JSON file of option values.")
    # The file is read first, by a parser that knows only --config (required flags may come from the file).
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        values = load_config_file(known.config)
        fields = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(
                f"{known.config}: unknown option(s) {', '.join(unknown)} for {config_cls.__name__}; "
                f"run with --help to list the valid ones"
            )
        # A value from the file satisfies a required flag; explicit flags still override it.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
        parser.set_defaults(**values)
    outputs = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=False)
    return outputs[0]

