"""The shared training configuration and the one argument parser.

`TrainConfig` holds the fields every method shares; a method subclasses it and adds its own. The dataclass is
the single source of truth for defaults: `parse_config` turns it into command-line flags with
`transformers.HfArgumentParser` (the diffusers examples' flag names) and also reads `--config file.yaml|json`,
whose values become the defaults that explicit flags then override.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

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
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate of the trained weights (> 0)."})
    scale_lr: bool = field(
        default=False,
        metadata={"help": "Multiply the learning rate by batch size x accumulation steps x number of processes."},
    )
    lr_scheduler: str = field(
        default="constant",
        metadata={"help": "diffusers schedule: linear, cosine, cosine_with_restarts, polynomial, constant, "
                          "constant_with_warmup, piecewise_constant."},
    )
    lr_warmup_steps: int = field(default=0, metadata={"help": "Steps of linear warmup from 0 to learning_rate."})
    lr_num_cycles: int = field(default=1, metadata={"help": "Hard restarts of cosine_with_restarts."})
    lr_power: float = field(default=1.0, metadata={"help": "Power of the polynomial schedule."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (decay of the gradient mean), in [0, 1)."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 (decay of the squared gradient), in [0, 1)."})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW decoupled weight decay (>= 0)."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon, added to the denominator (> 0)."})
    use_8bit_adam: bool = field(default=False, metadata={"help": "bitsandbytes AdamW8bit (pip install bitsandbytes)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm; 0 turns clipping off."})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16 (autocast; trained weights stay fp32)."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass: less memory, slower steps."}
    )
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
        default=None, metadata={"help": "A checkpoint folder, or 'latest' for the newest one in output_dir. The "
                                        "run's settings must match the checkpoint's (those in RESUME_FREE may differ)."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over in an output_dir that holds another run's checkpoints: they "
                                         "are removed first (without it such a folder is refused)."}
    )
    validation_steps: int = field(default=0, metadata={"help": "Run the method's validation every N steps (0: off)."})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard, wandb, all or none."})
    tracker_project_name: str = field(default="customize", metadata={"help": "Run name given to the trackers."})
    use_ema: bool = field(default=False, metadata={"help": "Keep an exponential moving average of the trained weights."})
    ema_decay: float = field(default=0.9999, metadata={"help": "Decay of the moving average (use_ema), in [0, 1)."})
    dataloader_num_workers: int = field(
        default=0, metadata={"help": "Worker processes loading the data (0: in the training process)."}
    )
    cache_latents: bool = field(
        default=True, metadata={"help": "Let the method precompute per-example features (VAE latents, text states)."}
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    # The fields that do not change what a run trains (where it writes, how often it logs, checkpoints or validates,
    # speed switches, how long it runs): a resumed run may change them; every other field must equal the value
    # saved in the checkpoint. The batch geometry may change too (the engine warns: the data order then differs).
    # A method config adds its own: RESUME_FREE = TrainConfig.RESUME_FREE | {"my_field"}. Fields whose name holds
    # "validation" count as resume-free as well.
    RESUME_FREE: ClassVar[frozenset[str]] = frozenset({
        "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "max_train_steps", "checkpointing_steps",
        "checkpoints_total_limit", "validation_steps", "logging_steps", "report_to", "tracker_project_name",
        "progress", "dataloader_num_workers", "cache_latents", "compile", "compile_mode", "gradient_checkpointing",
        "enable_xformers_memory_efficient_attention", "allow_tf32", "train_batch_size", "gradient_accumulation_steps",
        "sample_batch_size", "pipeline_dir", "vae_train_steps", "unet_train_steps",
    })

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
        check_learning_rate("learning_rate", self.learning_rate)

    def check_runtime(self) -> None:
        """Refuse, before any model is loaded, the options this machine cannot run: fp16 autocast without a GPU
        (accelerate would silently train in fp32, or the LoRA's fp16 base weights would fail at the first step),
        8-bit Adam without bitsandbytes, xformers attention without xformers. Called by `parse_config` (so at
        a recipe's start) and by the engine."""
        if self.mixed_precision == "fp16" and not _fp16_device_available():
            raise ValueError("mixed_precision fp16 needs a GPU (CUDA, MPS or XPU) and this machine has none: "
                             "use --mixed_precision bf16 (CPU autocast) or --mixed_precision no")
        if self.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
            raise MissingDependencyError("--use_8bit_adam needs bitsandbytes, which is not installed: "
                                         "pip install bitsandbytes (CUDA only), or drop --use_8bit_adam")
        if self.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
            raise MissingDependencyError(
                "--enable_xformers_memory_efficient_attention needs xformers, which is not installed: pip install "
                "xformers, or drop the flag (PyTorch's scaled_dot_product_attention is the default)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SDTrainConfig(TrainConfig):
    """The fields of every method that trains on a Stable Diffusion pipeline: which base model, the image size,
    and the validation images (DreamBooth, LoRA, pivotal tuning, ZipLoRA subclass it)."""

    pretrained_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model: hub id, diffusers folder, single file, or tiny-sd / tiny-sdxl."}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) of the base model."})
    variant: str | None = field(default=None, metadata={"help": "Weight variant to load, e.g. fp16."})
    resolution: int | None = field(
        default=None, metadata={"help": "Training image size in pixels, a multiple of the VAE's factor (8 for SD); "
                                        "unset: the model's native size."}
    )
    validation_prompt: str | None = field(
        default=None, metadata={"help": "Prompt of the validation images (every validation_steps); unset: none."}
    )
    num_validation_images: int = field(default=4, metadata={"help": "Images per validation."})
    validation_inference_steps: int = field(default=25, metadata={"help": "Denoising steps of each validation image."})

    def __post_init__(self):
        super().__post_init__()
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, a multiple of the VAE's downsampling "
                             f"factor (8 for Stable Diffusion), got {self.resolution}: e.g. 512 (SD 1.x), 1024 "
                             "(SDXL), or leave it out for the model's native size")



@dataclass
class PairedDataConfig(SDTrainConfig):
    """The fields of the SD methods that train on image pairs (ControlNet, InstructPix2Pix): a folder with
    metadata.jsonl (`train_data_dir`, its image columns named by the method) or a datasets-library set, the crop and
    flip every image of a pair shares, and the loss options."""

    train_data_dir: str | None = field(
        default=None, metadata={"help": "Folder with a metadata.jsonl naming per line each image of the pair "
                                        "(<column>_file_name, columns below) and the caption."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "A datasets-library set instead: a hub name or a save_to_disk folder."})
    dataset_split: str = field(default="train", metadata={"help": "Split of --dataset_name."})
    center_crop: bool = field(default=True, metadata={"help": "Crop the centre of each image (else a random crop)."})
    random_flip: bool = field(default=False, metadata={"help": "Flip the images of a pair together at random."})
    snr_gamma: float | None = field(default=None, metadata={"help": "min-SNR-gamma loss weighting; 5.0 is recommended."})
    noise_offset: float = field(default=0.0, metadata={"help": "Noise offset scale (e.g. 0.05)."})
    timestep_sampling: str = field(
        default="uniform", metadata={"help": "How training draws t: uniform, or cubic (t = (1 - u^3) T, mostly "
                                             "noisy steps, where a new spatial input must first be learned; "
                                             "T2I-Adapter)."})

    def __post_init__(self):
        super().__post_init__()
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0 (or unset), got {self.snr_gamma}")
        from customize.core.losses import TIMESTEP_SAMPLINGS

        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}, got "
                             f"{self.timestep_sampling!r}")

    def check_data_source(self, method: str) -> None:
        """Exactly one of train_data_dir / dataset_name (checked when a run starts, so `--help` needs neither)."""
        if bool(self.train_data_dir) == bool(self.dataset_name):
            raise ValueError(f"{method} training needs exactly one of --train_data_dir (a folder with metadata.jsonl) "
                             "or --dataset_name (a datasets-library set)")

class MissingDependencyError(ImportError, ValueError):
    """An option that needs a package this install lacks; the message names the package and the fix. Also a
    ValueError, so the recipes and the `customize` command report it in one line (customize.cli.USER_ERRORS)."""


def check_learning_rate(name: str, value: float | None, unset: str | None = None) -> None:
    """A learning rate must be > 0; None is allowed where `unset` says what None means."""
    if value is None and unset is not None:
        return
    if value is None or not value > 0:  # also refuses NaN
        hint = f"; leave it out for {unset}" if unset else ""
        raise ValueError(f"{name} must be > 0, got {value}{hint}")


def _fp16_device_available() -> bool:
    import torch

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return False
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or (mps is not None and mps.is_available())
            or (xpu is not None and xpu.is_available()))


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or JSON mapping of field name -> value. A syntax error is a ValueError naming the file, the
    line and the column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; "
                             "fix the file") from None
    elif path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"config file {path}: not valid YAML: {problem}{where}; fix the file (one "
                             "'option: value' a line)") from None
    else:
        raise ValueError(f"config file {path} must end in .yaml, .yml or .json")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values, got {type(data).__name__}")
    return data


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _describe(tp) -> str:
    """An annotation as the words of an error message: int -> 'an integer', list[int] -> 'a list of integers'."""
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s" if args else "a list"
    if len(args) == 1 and type(None) in typing.get_args(tp):
        return f"{_describe(args[0])} or null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _file_value(key: str, value: Any, tp, where: str) -> Any:
    """A value read from a config file as the field's type `tp` wants it, or a ValueError naming the key, the
    value and the expected type. YAML reads `1e-4` as a string: a string is accepted where the flag would accept
    it (float('1e-4')); a float for an integer, a list for a scalar, a scalar for a list are refused."""
    import types
    import typing

    def refuse(hint: str = ""):
        if value is None:
            raise ValueError(f"{where}: {key}: null is not {_describe(tp)}{hint}")
        got = "a list" if isinstance(value, list) else "a mapping" if isinstance(value, dict) else type(value).__name__
        raise ValueError(f"{where}: {key}: {value!r} ({got}) is not {_describe(tp)}{hint}")

    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None and len(inner) < len(args):
            return None
        if len(inner) != 1:
            return value  # a union this parser does not model: as given
        base = inner[0]
    else:
        base = tp
    if value is None:
        refuse("; give a value or leave the key out for the default")
    if typing.get_origin(base) is list:
        if not isinstance(value, list):
            refuse(f"; write it as a list, e.g. [{value}]")
        item = (typing.get_args(base) or (Any,))[0]
        return [_file_value(f"{key}[{i}]", v, item, where) for i, v in enumerate(value)]
    if isinstance(value, (list, dict)):
        refuse()
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        refuse()
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        whole = isinstance(value, float) and math.isfinite(value)
        refuse(f"; write a whole number, e.g. {round(value)}" if whole else "")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        refuse()
    if base is str:
        if isinstance(value, str):
            return value
        # YAML reads unquoted no / yes / on / off as booleans and 1 as a number
        if isinstance(value, bool):
            refuse(f"; put the word in quotes, e.g. {key}: '{'yes' if value else 'no'}' (YAML reads unquoted "
                   "yes / no / on / off / true / false as a boolean)")
        refuse(f"; put it in quotes, e.g. {key}: '{value}'")
    return value


def check_file_values(config_cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Every value of a config file as its field's type, or a ValueError naming the key, value and type."""
    import typing

    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # an annotation that cannot be resolved: leave the values to the dataclass
        return dict(values)
    return {k: _file_value(k, v, hints[k], where) if k in hints else v for k, v in values.items()}


def field_help(config_cls: type, name: str) -> str | None:
    """A field's help text, from the nearest class in the MRO that gives one (a method config that only changes
    a default, `max_train_steps: int = 800`, keeps TrainConfig's help)."""
    for klass in config_cls.__mro__:
        for f in dataclasses.fields(klass) if dataclasses.is_dataclass(klass) else ():
            if f.name == name and f.metadata.get("help"):
                return f.metadata["help"]
    return None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option with its default, except the --no_<flag> switches (their default is the flag's)."""

    def _get_help_string(self, action):
        if isinstance(action, argparse._StoreFalseAction):
            return action.help
        return super()._get_help_string(action)


def build_config_parser(config_cls: type):
    """The HfArgumentParser of `config_cls`: one flag per field, each with its help text and default."""
    from transformers import HfArgumentParser

    # No prefix matching: "--lr" must not silently mean "--lr_scheduler".
    parser = HfArgumentParser(config_cls, allow_abbrev=False, formatter_class=_HelpFormatter)
    for action in parser._actions:
        if isinstance(action, argparse._StoreFalseAction):
            action.help = f"Turn {action.dest} off (the same as --{action.dest} false)."
        elif action.dest != "help" and not action.help:
            action.help = field_help(config_cls, action.dest)
    parser.add_argument("--config", type=str, default=None, help="YAML or JSON file of option values.")
    return parser


def parse_config(config_cls: type[C], argv: list[str] | None = None) -> C:
    """Build `config_cls` from command-line flags (one flag per dataclass field, `--help` lists them).

    `--config file.yaml` (or .json) supplies values first; flags given explicitly override them. Unknown keys in
    the file and unknown flags are errors, so a typo never silently falls back to a default."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_config_parser(config_cls)
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
        values = check_file_values(config_cls, values, f"config file {known.config}")
        # A value from the file satisfies a required flag; explicit flags still override it.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
        parser.set_defaults(**values)
    outputs = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=False)
    check_runtime = getattr(outputs[0], "check_runtime", None)
    if callable(check_runtime):
        check_runtime()
    return outputs[0]

