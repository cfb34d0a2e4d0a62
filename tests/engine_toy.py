"""A toy method and recipe for the engine tests (imported by them, and run as a script in subprocesses).

A frozen input layer and a small trained MLP regress a fixed linear target. Unless `--deterministic`, every
random stream the engine must reproduce on resume is in play: the data order, a per-example augmentation
(python `random` sign flip + torch noise), noise drawn inside the loss and dropout.

    python tests/engine_toy.py --output_dir OUT [TrainConfig / ToyConfig flags]
writes OUT/toy.safetensors and OUT/hash-<rank>.txt (sha256 of the final trained weights); a user error exits 1
with one `engine_toy.py: error: ...` line, as the recipes do.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image

from customize.training import TrainConfig, parse_config, train
from customize.utils import save_safetensors_atomic

TARGET = torch.tensor([[1.0], [2.0], [-1.0], [0.5]])  # (4, 1)


@dataclass
class ToyConfig(TrainConfig):
    n_examples: int = 8
    deterministic: bool = False
    slow: float = 0.0  # seconds slept after each optimizer step, so a test can kill the run midway
    poison_after: int = 0  # make a trained weight NaN after this process's N-th optimizer step (0: never)
    report_to: str = "none"
    progress: bool = False

    RESUME_FREE: ClassVar[frozenset[str]] = TrainConfig.RESUME_FREE | {"slow", "poison_after"}


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n: int, deterministic: bool):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, 4, generator=g)  # (n, 4)
        self.deterministic = deterministic

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        if not self.deterministic:
            x = x * (1.0 if random.random() < 0.5 else -1.0) + 0.05 * torch.randn(4)
        return {"x": x, "y": x @ TARGET}


class ToyModel(torch.nn.Module):
    def __init__(self, deterministic: bool = False):
        super().__init__()
        self.frozen = torch.nn.Linear(4, 4)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.Dropout(0.0 if deterministic else 0.1), torch.nn.Tanh(),
            torch.nn.Linear(16, 1),
        )
        with torch.no_grad():  # a frozen layer near the identity keeps the regression easy
            self.frozen.weight.copy_(torch.eye(4) + 0.1 * self.frozen.weight)


class ToyMethod:
    """The hooks of a method (customize.training.method); `calls` records what the engine invoked (for tests)."""

    def __init__(self, validate_images: bool = False):
        self.calls: list[str] = []
        self.validate_images = validate_images

    def trainable_parameters(self, model, cfg):
        model.frozen.requires_grad_(False)
        return list(model.body.parameters())

    def loss(self, model, batch, cfg):
        h = model.frozen(batch["x"])  # (B, 4)
        if not getattr(cfg, "deterministic", True):
            h = h + 0.01 * torch.randn_like(h)
        pred = model.body(h)  # (B, 1)
        loss = torch.nn.functional.mse_loss(pred.float(), batch["y"].float())
        return {"loss": loss, "pred_mean": pred.detach().mean()}

    def after_step(self, model, cfg, step):
        self.calls.append("after_step")
        if getattr(cfg, "slow", 0):
            time.sleep(cfg.slow)
        if getattr(cfg, "poison_after", 0) and self.calls.count("after_step") == cfg.poison_after:
            with torch.no_grad():
                model.body[0].weight[0, 0] = float("nan")

    def validate(self, model, cfg, step):
        self.calls.append(f"validate:{step}")
        if not self.validate_images:
            return []
        torch.randn(100)  # validation may draw from the RNGs; the engine must shield training from it
        value = int(model.body[0].weight.abs().sum().item() * 10) % 256
        return [Image.new("RGB", (8, 8), (value, 0, 0)), Image.new("RGB", (8, 8), (0, value, 0))]

    def save(self, model, cfg, out_dir):
        self.calls.append("save")
        save_safetensors_atomic(dict(model.body.state_dict()), Path(out_dir) / "toy.safetensors")

    def model_card(self, cfg):
        return f"# toy\n\nsteps: {cfg.max_train_steps}\n"


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.body.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(cfg: ToyConfig, method: ToyMethod | None = None):
    torch.manual_seed(cfg.seed)
    model = ToyModel(cfg.deterministic)
    result = train(method or ToyMethod(), model, ToyData(cfg.n_examples, cfg.deterministic), cfg)
    return model, result


def main(argv=None):
    torch.set_num_threads(1)  # the same float summation order in every process that is compared
    cfg = parse_config(ToyConfig, argv)
    model, _ = run(cfg)
    from accelerate import PartialState

    rank = PartialState().process_index
    (Path(cfg.output_dir) / f"hash-{rank}.txt").write_text(weights_hash(model))


if __name__ == "__main__":
    from customize.cli import run_recipe

    sys.exit(run_recipe(main, sys.argv[1:]))
