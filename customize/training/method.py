"""What a training method is: the hooks `customize.training.train(method, model, dataset, cfg)` calls.

A method is any object with these hooks as attributes: a class instance (`PivotalTuning()`), or a module of
functions (`customize.methods.lora`). `Method` lists the three required hooks, `OptionalHooks` the others; both
are `typing.Protocol`s, so nothing needs to inherit from them, and their signatures are the contract: the engine
checks a method against them once, before anything is built (`check_method`), and refuses one that lacks a
required hook or whose hook cannot be called with the arguments below, naming the hook. Every hook is called
with positional arguments in this order.

When the engine calls what, in one run:

    trainable_parameters(model, cfg)          once, first: freeze what stays frozen, add adapters / tokens
    prepare(model, dataset, cfg, accelerator)   once, modules on the device, before the optimizer exists
    load_state_dict(state)                    once, on a resume, after the trained weights are restored
    loop, per micro-batch:
        collate(examples)                     in the DataLoader (a worker process when num_workers > 0)
        loss(model, batch, cfg)               under autocast; the engine does backward, clipping and the step
    per optimizer step (step = the global step just completed, 1..max_train_steps):
        after_step(model, cfg, step)          right after the optimizer step, before EMA and the checkpoint
        state_dict()                          when checkpoint-<step> is written (every checkpointing_steps)
        validate(model, cfg, step)            every validation_steps, and once at the end (images, scalars)
    save(model, cfg, out_dir)                 once, at the end, main process only, EMA weights swapped in
    model_card(cfg)                           right after save, main process only: written as out_dir/README.md

Method state. The engine restores the trained parameters, the optimizer, the schedule, EMA and the RNGs; what a
method keeps beside them (a counter, a phase, a running statistic) it hands to the engine through `state_dict` /
`load_state_dict` (both or neither). The engine writes the state into the checkpoint folder (tensor values into
`method_state.safetensors`, every other value into `method_state.json`) and gives the same dict back on resume,
so no method ever reads a checkpoint itself. The engine is the only code that knows where checkpoints are.

A minimal method:

    class Regression:
        def trainable_parameters(self, model, cfg):
            return list(model.parameters())            # or param-group dicts {"params": [...], "lr": ...}
        def loss(self, model, batch, cfg):
            return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])   # or {"loss": ..., extras}
        def save(self, model, cfg, out_dir):
            save_safetensors_atomic(model.state_dict(), Path(out_dir) / "model.safetensors")

    train(Regression(), model, dataset, cfg)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

# The file names of a method's state in a checkpoint folder (written and read by customize.training.checkpoint).
METHOD_STATE_FILE = "method_state.json"
METHOD_TENSORS_FILE = "method_state.safetensors"


class Method(Protocol):
    """The required hooks: which weights train, the loss of one batch, the final files."""

    def trainable_parameters(self, model, cfg) -> list:
        """Called once, before anything else. Freeze the weights that stay frozen, add what trains (adapters, new
        token rows) and return the trained tensors: Parameters, or param-group dicts `{"params": [...], "lr": x,
        ...}` (a group without "lr" gets cfg.learning_rate). The engine moves the model's modules to the device,
        switches the trained ones to train mode, and restores the checkpoint's values into these tensors on a
        resume. A resumed run calls this on a fresh model, so it must be safe to call once per model."""
        ...

    def loss(self, model, batch, cfg) -> torch.Tensor | dict:
        """Called for every micro-batch, under the run's autocast, with `batch` on the device. Return the scalar
        loss (mean over the batch), or a dict with "loss" and extra scalars to log (detached tensors or floats).
        The engine divides by the accumulation count, runs backward, averages gradients over processes, clips and
        steps. Draw noise from the global RNGs (`torch.randn`): the engine seeds and checkpoints them."""
        ...

    def save(self, model, cfg, out_dir: str) -> Any:
        """Called once, at the end, on the main process only, with the EMA weights swapped in when use_ema: write
        the final files into `out_dir` (atomically: customize.utils.atomic_path). The return value is ignored."""
        ...


class OptionalHooks(Protocol):
    """The optional hooks; a method without one gets the behaviour each docstring names."""

    def prepare(self, model, dataset, cfg, accelerator):
        """Called once, after trainable_parameters, with the modules on `accelerator.device`, before the optimizer
        and the data loader are built. Cache features, cast frozen weights, wrap the dataset. Return the dataset
        to train on (None: the one given). Absent: the dataset as given."""
        ...

    def collate(self, examples: list) -> Any:
        """Turn a list of dataset items into a batch (in a DataLoader worker when num_workers > 0). Absent:
        torch's default_collate."""
        ...

    def after_step(self, model, cfg, step: int) -> None:
        """Called after every optimizer step, before the EMA update and the checkpoint of that step; `step` is the
        global step just completed (1 after the first; a resumed run goes on from the checkpoint's). Restore
        frozen rows, advance a phase. Absent: nothing."""
        ...

    def validate(self, model, cfg, step: int) -> list | dict:
        """Called every cfg.validation_steps steps and once at the end (step = the global step), on the main process
        only, under no_grad, with the trained modules in eval mode, the EMA weights swapped in and the RNGs saved
        and restored around it (validation never changes what trains). Return PIL images to log and tile into
        validation/step-<step>.png, or []; or a dict {"images": [...], "logs": {name: float}}: the images as
        before, the scalars (a score of the samples: ControlNet's controllability) logged to the trackers at this
        step, kept in TrainResult.validation_logs, appended to validation/scores.jsonl and drawn, one curve per
        name over the steps, into validation/scores.png (the file survives a resume: rows at or past the resumed
        step are replaced). Absent: no validation."""
        ...

    def model_card(self, cfg) -> str | None:
        """Called right after save, on the main process: markdown written as out_dir/README.md (None: none).
        Absent: no model card."""
        ...

    def state_dict(self) -> dict:
        """Called on every process when a checkpoint is written (after after_step of that step); the main
        process's answer is saved. Return a flat dict: tensor values are stored in method_state.safetensors,
        every other value must be JSON (numbers, strings, lists, dicts). Only with load_state_dict. Absent: the
        method keeps nothing beyond the trained tensors."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Called once on a resume, on every process, after the trained tensors are restored and before the first
        step, with what state_dict returned when the checkpoint was written (tensors on the CPU). It must not
        draw random numbers: the RNG streams are already the checkpoint's. Only with state_dict."""
        ...


def _hook_args(protocol: type) -> dict[str, tuple[str, ...]]:
    """{hook name: its positional arguments (without self)}, read off a Protocol's own functions."""
    out = {}
    for name, fn in vars(protocol).items():
        if inspect.isfunction(fn) and not name.startswith("_"):
            out[name] = tuple(p for p in inspect.signature(fn).parameters if p != "self")
    return out


REQUIRED_HOOKS = _hook_args(Method)
OPTIONAL_HOOKS = _hook_args(OptionalHooks)


def method_name(method) -> str:
    """How messages name a method: its module's or its class's name."""
    return getattr(method, "__name__", None) or type(method).__name__


def _describe(name: str, args: tuple[str, ...]) -> str:
    return f"{name}({', '.join(args)})"


@dataclass(frozen=True)
class MethodHooks:
    """A method checked against the protocol: each hook as a callable, None for an optional one it lacks."""

    method: Any
    trainable_parameters: Callable
    loss: Callable
    save: Callable
    prepare: Callable | None = None
    collate: Callable | None = None
    after_step: Callable | None = None
    validate: Callable | None = None
    model_card: Callable | None = None
    state_dict: Callable | None = None
    load_state_dict: Callable | None = None

    @property
    def has_state(self) -> bool:
        return self.state_dict is not None


def _callable_with(fn: Callable, n: int) -> bool:
    """Whether `fn` accepts `n` positional arguments (True when its signature cannot be read)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind(*range(n))
    except TypeError:
        return False
    return True


def check_method(method) -> MethodHooks:
    """Check `method` against the protocol once and return its hooks. Raises TypeError naming the hook when a
    required one is missing, an attribute named like a hook is not callable, a hook cannot be called with the
    engine's arguments (e.g. an `after_step(model, cfg)` written before hooks got the step), or only one of
    state_dict / load_state_dict is there."""
    found: dict[str, Callable] = {}
    who = f"the method {method_name(method)}"
    for name, args in {**REQUIRED_HOOKS, **OPTIONAL_HOOKS}.items():
        fn = getattr(method, name, None)
        if fn is None:
            if name in REQUIRED_HOOKS:
                raise TypeError(f"{who} lacks the required hook {_describe(name, args)} "
                                "(see customize.training.method.Method)")
            continue
        if not callable(fn):
            raise TypeError(f"{who} has {name} = {fn!r}, which is not callable: the engine calls the hook "
                            f"{_describe(name, args)}")
        if not _callable_with(fn, len(args)):
            raise TypeError(f"{who} has the hook {name}{inspect.signature(fn)}, but the engine calls "
                            f"{_describe(name, args)} (see customize.training.method)")
        found[name] = fn
    if ("state_dict" in found) != ("load_state_dict" in found):
        have, lack = ("state_dict", "load_state_dict") if "state_dict" in found else ("load_state_dict", "state_dict")
        raise TypeError(f"{who} has {have} but lacks the hook {_describe(lack, OPTIONAL_HOOKS[lack])}: method "
                        "state is saved with the checkpoint and given back on resume, so both are needed")
    return MethodHooks(method=method, **found)
