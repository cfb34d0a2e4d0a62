"""Exponential moving average of the trained parameters.

    shadow <- d_n * shadow + (1 - d_n) * param,   d_n = min(ema_decay, (1 + n) / (10 + n))

where n counts the updates made so far. The warm-up term (1 + n)/(10 + n) is the default of diffusers'
`EMAModel` (and of the original DDPM code): early shadows follow the fast-moving weights instead of staying
anchored at the random or pretrained start for ~1/(1 - ema_decay) steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch


class EMA:
    """Shadow copies (float32) of a fixed, ordered list of parameters."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float):
        self.parameters = list(parameters)
        self.decay = decay
        self.num_updates = 0
        self.shadow = [p.detach().to(torch.float32).clone() for p in self.parameters]

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def step(self) -> None:
        weight = 1.0 - self.current_decay()
        current = [p.detach().to(torch.float32) for p in self.parameters]
        torch._foreach_lerp_(self.shadow, current, weight)  # shadow += (1 - d) (param - shadow)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter] | None = None) -> None:
        targets = self.parameters if parameters is None else list(parameters)
        for p, s in zip(targets, self.shadow, strict=True):
            p.copy_(s.to(p.dtype))

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily load the averaged weights into the live parameters (for saving or validation)."""
        backup = [p.detach().clone() for p in self.parameters]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.parameters, backup):
                    p.copy_(b)

    def state_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        return dict(zip(names, self.shadow, strict=True))

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], names: list[str], num_updates: int) -> None:
        missing = [n for n in names if n not in tensors]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} trained tensor(s), e.g. {missing[0]}; "
                           "was the checkpoint written by a run that trained different parameters?")
        self.shadow = [tensors[n].to(device=s.device, dtype=torch.float32) for n, s in zip(names, self.shadow)]
        self.num_updates = num_updates
