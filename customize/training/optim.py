"""Optimizer and learning-rate schedule from a TrainConfig."""

from __future__ import annotations

import importlib.util

import torch


def param_groups(trainable, base_lr: float) -> list[dict]:
    """Normalise a method's `trainable_parameters` answer (Parameters or param-group dicts) to param groups,
    each with its own "params" list and "lr" (a group without "lr" gets the base one)."""
    items = list(trainable)
    if not items:
        raise ValueError("the method's trainable_parameters returned nothing: there is nothing to train")
    groups: list[dict] = []
    loose: list[torch.nn.Parameter] = []
    for item in items:
        if isinstance(item, dict):
            if "params" not in item:
                raise ValueError("a param-group dict from trainable_parameters needs a 'params' entry")
            group = dict(item)
            group["params"] = list(group["params"])
            group.setdefault("lr", base_lr)
            groups.append(group)
        elif isinstance(item, torch.Tensor):
            loose.append(item)
        else:
            raise TypeError(f"trainable_parameters must yield Parameters or dicts, got {type(item).__name__}")
    if loose:
        groups.insert(0, {"params": loose, "lr": base_lr})
    seen: set[int] = set()
    for group in groups:
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError("a parameter appears twice in trainable_parameters; list each one once")
            seen.add(id(p))
            if not p.is_floating_point():
                raise TypeError(f"cannot train a {p.dtype} tensor; trainable parameters must be floating point")
    return groups


def build_optimizer(groups: list[dict], cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW: bitsandbytes' 8-bit version on request, else PyTorch's fused kernel whenever every tensor lives on
    one CPU or CUDA device (on a LoRA's hundreds of small tensors it is ~8x faster than the per-tensor loop)."""
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    lr = groups[0]["lr"]
    if cfg.use_8bit_adam:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA only), "
                              "or drop --use_8bit_adam")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=lr, **kwargs)
    devices = {p.device.type for g in groups for p in g["params"]}
    fusable = len(devices) == 1 and devices <= {"cpu", "cuda"} and all(
        p.dtype in (torch.float32, torch.float16, torch.bfloat16) for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, fused=True if fusable else None, **kwargs)


def build_lr_scheduler(optimizer, cfg):
    """A diffusers schedule (`diffusers.optimization.get_scheduler`) counted in optimizer steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=cfg.max_train_steps,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )
