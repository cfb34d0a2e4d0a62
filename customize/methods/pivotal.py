"""Pivotal tuning: new tokens and a LoRA trained together (as in diffusers' advanced SDXL DreamBooth-LoRA
script, after Roich et al.'s "pivotal tuning" of a GAN around an inverted code).

The subject word in the prompts (`token_abstraction`, e.g. "a photo of TOK dog") is replaced by new tokens
S* = `<s0>`, `<s0>_1`, ... (`num_new_tokens_per_abstraction`), whose embeddings are textual-inversion
parameters; the UNet (and optionally the text encoders) get LoRA adapters; both minimise the DreamBooth loss

    L = E || eps - eps_{theta + BA}(z_t, t, c(y(v))) ||^2  (+ prior preservation, DreamBooth eq. 2)

over v (the new rows) and the LoRA matrices (B, A) at once. With `train_text_encoder_ti_frac` < 1 the
embeddings stop after that fraction of the steps and the LoRA goes on alone around the now fixed "pivot" v.

Everything is reused: LoRA's adapters, data, loss and file (customize.methods.lora), textual inversion's tokens,
frozen-row guard and embedding files (customize.methods.textual_inversion). The output folder holds
pytorch_lora_weights.safetensors beside learned_embeds.safetensors (+ _2 for SDXL) and the single-file embedding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from torch.utils.data import Dataset

from customize.data import PairedDataset
from customize.formats.embeddings import EMBEDDING_WEIGHT_NAME, EMBEDDING_WEIGHT_NAME_2
from customize.methods import lora
from customize.methods import textual_inversion as ti
from customize.training.config import check_learning_rate


@dataclass
class PivotalConfig(lora.LoRAConfig):
    instance_prompt: str = field(default="a photo of TOK", metadata={"help": "Prompt with the token abstraction."})
    train_text_encoder_ti: bool = field(
        default=True, metadata={"help": "Learn new token embeddings for token_abstraction (off: a plain LoRA)."}
    )
    token_abstraction: str = field(
        default="TOK", metadata={"help": "The word in the instance prompt / captions that the new tokens replace."}
    )
    num_new_tokens_per_abstraction: int = field(default=2, metadata={"help": "Vectors of the new word."})
    placeholder_token: str = field(
        default="<s0>", metadata={"help": "Name of the new word: tokens <s0>, <s0>_1, ...; write it in prompts later."}
    )
    initializer_token: str | None = field(
        default=None,
        metadata={"help": "One existing word to start the new vectors from; default: random, scaled to the vocabulary."},
    )
    train_text_encoder_ti_frac: float = field(
        default=0.5, metadata={"help": "Fraction of the steps during which the embeddings train (then only the LoRA)."}
    )
    text_encoder_lr: float | None = field(
        default=None, metadata={"help": "Learning rate (> 0) of the embeddings and text-encoder LoRA; unset: "
                                        "learning_rate. (Not training them is --train_text_encoder_ti false and "
                                        "no --train_text_encoder, not a rate of 0.)"}
    )

    def __post_init__(self):
        super().__post_init__()
        check_learning_rate("text_encoder_lr", self.text_encoder_lr, unset="the same as learning_rate "
                            "(to freeze the new tokens: --train_text_encoder_ti false)")
        if not self.train_text_encoder_ti:
            return
        ti.check_placeholder(self.placeholder_token)
        if self.num_new_tokens_per_abstraction < 1:
            raise ValueError(f"num_new_tokens_per_abstraction must be >= 1, got {self.num_new_tokens_per_abstraction}")
        if not 0.0 < self.train_text_encoder_ti_frac <= 1.0:
            raise ValueError(f"train_text_encoder_ti_frac must be in (0, 1], got {self.train_text_encoder_ti_frac}")
        if not self.token_abstraction or any(c.isspace() for c in self.token_abstraction):
            raise ValueError(f"token_abstraction must be one word (e.g. TOK), got {self.token_abstraction!r}")
        if not self.use_captions and not ti.contains_word(self.instance_prompt, self.token_abstraction):
            raise ValueError(
                f"instance_prompt {self.instance_prompt!r} does not contain the token abstraction "
                f"{self.token_abstraction!r}: the new tokens would never be trained (e.g. 'a photo of {self.token_abstraction} dog')"
            )

    @property
    def embedding_steps(self) -> int:
        """Optimizer steps during which the embeddings train (at least one)."""
        return max(1, int(self.train_text_encoder_ti_frac * self.max_train_steps))

    FILE_SETTINGS: ClassVar[tuple[str, ...]] = lora.LoRAConfig.FILE_SETTINGS + (
        "text_encoder_lr", "train_text_encoder_ti", "token_abstraction", "placeholder_token",
        "num_new_tokens_per_abstraction", "train_text_encoder_ti_frac",
    )

    def lora_file_name(self) -> str:
        """LoRA's, unless a kohya file would take the name of an embedding file written beside it."""
        name = super().lora_file_name()
        embeddings = {EMBEDDING_WEIGHT_NAME, EMBEDDING_WEIGHT_NAME_2, f"{ti.single_file_name(self.placeholder_token)}.safetensors"}
        return f"{Path(name).stem}_lora.safetensors" if name in embeddings else name

    def trigger_words(self) -> tuple[str, ...]:
        """The new word, as prompts write it (the pipeline expands it to its vectors); without it, LoRA's."""
        return (self.placeholder_token,) if self.train_text_encoder_ti else super().trigger_words()


class AbstractionPrompts(Dataset):
    """The training set with `token_abstraction` replaced by S* in every prompt (instance and class parts)."""

    def __init__(self, dataset, abstraction: str, placeholder_text: str):
        self.dataset, self.abstraction, self.placeholder_text = dataset, abstraction, placeholder_text

    def __len__(self) -> int:
        return len(self.dataset)

    def _rewrite(self, example: dict) -> dict:
        return {**example, "prompt": ti.replace_word(example["prompt"], self.abstraction, self.placeholder_text)}

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        if "instance" in item:  # a DreamBooth pair
            return {part: self._rewrite(example) for part, example in item.items()}
        return self._rewrite(item)


def _instance_prompts(dataset) -> list[str]:
    instance = dataset.instance if isinstance(dataset, PairedDataset) else dataset
    return [instance.prompt(i) for i in range(len(instance))] if hasattr(instance, "prompt") else []


class PivotalTuning:
    """The engine's hooks: LoRA's, plus textual inversion's tokens when `train_text_encoder_ti` is on."""

    def __init__(self):
        self.tokens: ti.PlaceholderTokens | None = None
        # Optimizer steps done (the engine's global step), to stop the embeddings after `embedding_steps`; kept
        # with the checkpoints (state_dict), so a resumed run knows whether they had stopped.
        self.step = 0

    def trainable_parameters(self, pipe, cfg: PivotalConfig):
        """LoRA's matrices (UNet at learning_rate; text encoders at text_encoder_lr) and the embedding matrices
        (text_encoder_lr), as two param groups."""
        adapters = lora.trainable_parameters(pipe, cfg)
        unet_ids = {id(p) for p in pipe.unet.parameters()}
        groups = [{"params": [p for p in adapters if id(p) in unet_ids], "lr": cfg.learning_rate},
                  {"params": [p for p in adapters if id(p) not in unet_ids], "lr": cfg.learning_rate if cfg.text_encoder_lr is None else cfg.text_encoder_lr}]
        if cfg.train_text_encoder_ti:
            if self.tokens is None:
                self.tokens = ti.PlaceholderTokens(
                    pipe, cfg.placeholder_token, cfg.num_new_tokens_per_abstraction, cfg.initializer_token,
                )
            groups[1]["params"] += self.tokens.parameters()
        return [g for g in groups if g["params"]]

    def prepare(self, pipe, dataset, cfg: PivotalConfig, accelerator=None):
        if not cfg.train_text_encoder_ti:
            return lora.prepare(pipe, dataset, cfg, accelerator)
        if cfg.use_captions and not any(ti.contains_word(p, cfg.token_abstraction) for p in _instance_prompts(dataset)):
            raise ValueError(f"no caption contains the token abstraction {cfg.token_abstraction!r}: put it in the "
                             "captions where the subject is named (e.g. 'a photo of TOK on a beach')")
        if cfg.cache_latents:
            # Only the images: the prompts go through the text encoders every step, since S* is trained.
            if isinstance(dataset, PairedDataset):
                class_data = dataset.class_data
                dataset = PairedDataset(ti.cache_latents(pipe, dataset.instance, cfg),
                                        ti.cache_latents(pipe, class_data, cfg) if class_data is not None else None)
            else:
                dataset = ti.cache_latents(pipe, dataset, cfg)
        return AbstractionPrompts(dataset, cfg.token_abstraction, self.tokens.prompt_text)

    collate = staticmethod(lora.collate)

    def loss(self, pipe, batch: dict, cfg: PivotalConfig):
        if self.tokens is not None and self.step >= cfg.embedding_steps and not self.tokens.frozen_all:
            # Snapshot now, before this step's update: after a resume the rows are the checkpoint's.
            self.tokens.freeze()
        return lora.loss(pipe, batch, cfg)

    def after_step(self, pipe, cfg: PivotalConfig, step: int) -> None:
        self.step = step
        if self.tokens is not None:
            self.tokens.restore_frozen_rows()

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """A resumed run: the checkpoint's step count decides whether the embeddings had already stopped."""
        self.step = int(state["step"])

    def validate(self, pipe, cfg: PivotalConfig, step: int):
        if cfg.validation_prompt and cfg.train_text_encoder_ti:
            # S* by its first token: the pipeline expands multi-vector tokens in prompts itself.
            cfg = dataclasses.replace(
                cfg, validation_prompt=ti.replace_word(cfg.validation_prompt, cfg.token_abstraction, cfg.placeholder_token)
            )
        return lora.validate(pipe, cfg, step)

    def save(self, pipe, cfg: PivotalConfig, out_dir) -> None:
        lora.save(pipe, cfg, out_dir)
        if self.tokens is not None:
            ti.save_embeddings(self.tokens, out_dir)

    def model_card(self, cfg: PivotalConfig) -> str:
        card = lora.model_card(cfg)
        if not cfg.train_text_encoder_ti:
            return card
        weight_name = f", weight_name=\"{cfg.lora_file_name()}\"" if cfg.lora_format == "kohya" else ""
        return card + (
            f"\n## Pivotal tuning\n\nThe subject is the new word `{cfg.placeholder_token}` "
            f"({cfg.num_new_tokens_per_abstraction} vectors; it replaced `{cfg.token_abstraction}` in the training "
            f"prompts, and trained for {cfg.embedding_steps} of {cfg.max_train_steps} steps). Load both files:\n\n"
            f"```python\npipe.load_lora_weights(folder{weight_name})\n"
            f"pipe.load_textual_inversion(folder, token=\"{cfg.placeholder_token}\")\n"
            "# SDXL, second encoder:\n"
            f"pipe.load_textual_inversion(folder, weight_name=\"learned_embeds_2.safetensors\", token=\"{cfg.placeholder_token}\",\n"
            "                            text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)\n```\n\n"
            f"then write `{cfg.placeholder_token}` where the prompt names the subject.\n"
        )
