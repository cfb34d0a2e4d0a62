"""Textual inversion (Gal et al., 2022, "An Image is Worth One Word").

A new pseudo-word S* with embedding v* is added to the text encoder's vocabulary and learned with everything
else frozen (eq. 2):

    v* = argmin_v E_{z ~ E(x), y, eps ~ N(0, I), t} || eps - eps_theta(z_t, t, c_theta(y(v))) ||^2

where y(v) is a prompt that contains S* ("a photo of a S*", or a caption of the training image) and c_theta is
the frozen text encoder. S* may span several vectors (`num_vectors`): tokens `<tok>`, `<tok>_1`, ...,
`<tok>_{n-1}`, which is the multi-vector layout diffusers' `load_textual_inversion` expands at inference.
SDXL has two tokenizer / text-encoder pairs: S* gets one embedding in each (of each encoder's width).

Only the placeholder rows of the input-embedding matrices may change. The optimizer sees the whole matrix
(an embedding row cannot be a parameter of its own), so two guards keep every other row bitwise frozen:
a gradient mask (so gradient clipping and Adam see only the placeholder rows) and, after every optimizer step,
a restore of every other row from a snapshot (decoupled weight decay moves rows even with zero gradient).
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from customize.data import ImageCaptionDataset, cache_features, collate_examples
from customize.formats import placeholder_tokens, save_embedding
from customize.methods import dreambooth
from customize.models import model_info
from customize.training import TrainConfig, sd

# Prompt templates of the textual-inversion paper's training code, as used by diffusers' example; "{}" is S*.
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}

# (text encoder, tokenizer) attribute names of a pipeline, in the order of the embedding files they feed.
ENCODER_SLOTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


@dataclass
class TextualInversionConfig(TrainConfig):
    pretrained_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model: hub id, diffusers folder or single file (SD 1.x/2.x, SDXL)."}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) of the base model."})
    variant: str | None = field(default=None, metadata={"help": "Weight variant to load, e.g. fp16."})
    train_data_dir: str | None = field(default=None, metadata={"help": "Folder of the concept's images."})
    placeholder_token: str = field(default="<concept>", metadata={"help": "The new word S*, e.g. '<cat-toy>'."})
    initializer_token: str = field(
        default="object", metadata={"help": "One existing word whose embedding starts every new vector."}
    )
    num_vectors: int = field(default=1, metadata={"help": "Vectors per placeholder: <tok>, <tok>_1, ..."})
    learnable_property: str = field(default="object", metadata={"help": "object or style: the prompt templates."})
    use_captions: bool = field(
        default=False, metadata={"help": "Train on per-image captions (metadata.jsonl / .txt) instead of templates."}
    )
    caption_token: str | None = field(
        default=None, metadata={"help": "With captions: the word S* replaces; captions without it get S* appended."}
    )
    resolution: int | None = field(
        default=None, metadata={"help": "Training image size in pixels, a multiple of the VAE's factor (8 for SD); "
                                        "unset: the model's native size."}
    )
    center_crop: bool = field(default=False, metadata={"help": "Crop the centre of each image (else a random crop)."})
    random_flip: bool = field(default=False, metadata={"help": "Flip images horizontally at random."})
    snr_gamma: float | None = field(default=None, metadata={"help": "min-SNR-gamma loss weighting; 5.0 is recommended."})
    noise_offset: float = field(default=0.0, metadata={"help": "Noise offset scale (e.g. 0.05)."})
    validation_prompt: str | None = field(
        default=None, metadata={"help": "Prompt for validation images; '{}' marks S* (e.g. 'a {} on the beach')."}
    )
    num_validation_images: int = field(default=4, metadata={"help": "Images per validation."})
    validation_inference_steps: int = field(default=25, metadata={"help": "Denoising steps of each validation image."})
    # diffusers' textual-inversion README: lr 5e-4 scaled by batch x accumulation x processes, 3000 steps.
    learning_rate: float = 5e-4
    scale_lr: bool = True
    gradient_accumulation_steps: int = 4
    max_train_steps: int = 3000

    def __post_init__(self):
        super().__post_init__()
        check_placeholder(self.placeholder_token)
        if self.num_vectors < 1:
            raise ValueError(f"num_vectors must be >= 1, got {self.num_vectors}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0 (or unset), got {self.snr_gamma}")
        if self.learnable_property not in TEMPLATES:
            raise ValueError(f"learnable_property must be one of {sorted(TEMPLATES)}, got {self.learnable_property!r}")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, a multiple of the VAE's downsampling "
                             f"factor (8 for Stable Diffusion), got {self.resolution}: e.g. 512 (SD 1.x), 1024 "
                             "(SDXL), or leave it out for the model's native size")


def check_placeholder(placeholder: str) -> None:
    """Refuse a placeholder that prompts could not spell back to the same token (spaces, upper case)."""
    if not placeholder or placeholder != placeholder.strip() or any(c.isspace() for c in placeholder):
        raise ValueError(f"placeholder token {placeholder!r} must be one word without spaces, e.g. '<my-concept>'")
    if placeholder != placeholder.lower():
        # CLIP lower-cases prompts before matching, so diffusers could not expand a multi-vector '<Tok>' later.
        raise ValueError(f"placeholder token {placeholder!r} must be lower case (CLIP lower-cases prompts): use {placeholder.lower()!r}")


def in_vocabulary(tokenizer, word: str) -> bool:
    """True when the tokenizer already reads `word` as one token of its own (CLIP stores whole words as
    'dog</w>', so 'dog' is taken although no key is 'dog'): adding it again would hijack that word."""
    return word in tokenizer.get_vocab() or len(tokenizer.encode(word, add_special_tokens=False)) == 1


def single_token_id(tokenizer, word: str, what: str = "initializer token") -> int:
    """The id of `word` when the tokenizer keeps it as exactly one token; a clear error otherwise."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(
            f"{what} {word!r} must be a single token, but the tokenizer splits it into {len(ids)}: {pieces}; "
            "choose one common word (e.g. 'dog', 'toy', 'painting')"
        )
    return ids[0]


@dataclass
class _EncoderSlot:
    """The placeholder rows of one text encoder, with the snapshot the other rows are restored from."""

    name: str  # pipeline attribute of the text encoder ("text_encoder" | "text_encoder_2")
    text_encoder: torch.nn.Module
    token_ids: list[int]
    frozen: torch.Tensor  # (V, D) every row as it must stay; placeholder rows updated by `freeze`
    trainable_rows: torch.Tensor  # (V,) bool, True on the placeholder rows that still train
    hook: object = field(default=None, repr=False)  # the gradient mask; stays on the weight (inert at inference)

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.text_encoder.get_input_embeddings().weight  # (V, D)


class PlaceholderTokens:
    """S* added to every tokenizer / text encoder of a pipeline, and the bookkeeping that trains only its rows.

    initializer_token=None starts the rows from N(0, std^2) with std the standard deviation of the existing
    embeddings (the initialisation of diffusers' advanced pivotal-tuning script); otherwise each new row is a
    copy of the initializer's row, so at init S* encodes exactly like the initializer word."""

    def __init__(
        self,
        pipe,
        placeholder: str,
        num_vectors: int = 1,
        initializer_token: str | None = None,
        generator: torch.Generator | None = None,
    ):
        if num_vectors < 1:
            raise ValueError(f"num_vectors must be >= 1, got {num_vectors}")
        self.placeholder = placeholder
        self.tokens = placeholder_tokens(placeholder, num_vectors)
        pairs = [(te_name, getattr(pipe, te_name, None), getattr(pipe, tok_name, None)) for te_name, tok_name in ENCODER_SLOTS]
        pairs = [(name, te, tok) for name, te, tok in pairs if te is not None and tok is not None]
        if not pairs:
            raise ValueError("textual inversion needs a pipeline with a tokenizer and a text encoder")
        check_placeholder(placeholder)
        # Validate every pair before touching any, so an error leaves the pipeline as it was.
        init_ids = []
        for name, _, tok in pairs:
            taken = [t for t in self.tokens if in_vocabulary(tok, t)]
            if taken:
                raise ValueError(
                    f"placeholder token(s) {taken} already in the vocabulary of {name}'s tokenizer; "
                    "choose a new --placeholder_token (e.g. '<my-concept>') or load the model without that embedding"
                )
            init_ids.append(None if initializer_token is None else single_token_id(tok, initializer_token))
        self.slots = [self._add(name, te, tok, init_id, generator) for (name, te, tok), init_id in zip(pairs, init_ids)]

    def _add(self, name, text_encoder, tokenizer, init_id, generator) -> _EncoderSlot:
        tokenizer.add_tokens(self.tokens)
        ids = tokenizer.convert_tokens_to_ids(self.tokens)
        rows = text_encoder.get_input_embeddings().weight.shape[0]
        # A checkpoint may carry more rows than its tokenizer has words: grow only, never cut existing rows.
        # The new rows are overwritten below, so skip transformers' mean/covariance initialisation of them.
        text_encoder.resize_token_embeddings(max(rows, max(ids) + 1), mean_resizing=False)
        weight = text_encoder.get_input_embeddings().weight  # (V', D)
        with torch.no_grad():
            if init_id is not None:
                weight[ids] = weight[init_id].expand(len(ids), -1).clone()  # (n, D)
            else:
                std = weight[:rows].float().std()
                noise = torch.randn((len(ids), weight.shape[1]), generator=generator, dtype=torch.float32)  # (n, D)
                weight[ids] = (noise * std).to(device=weight.device, dtype=weight.dtype)
        trainable = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)  # (V',)
        trainable[ids] = True
        return _EncoderSlot(name, text_encoder, ids, weight.detach().clone(), trainable)

    @property
    def prompt_text(self) -> str:
        """What S* is written as in a training prompt: every vector's token, as diffusers expands it later."""
        return " ".join(self.tokens)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The input-embedding matrices (made trainable, with the gradient masked to the placeholder rows)."""
        params = []
        for slot in self.slots:
            weight = slot.weight
            weight.requires_grad_(True)
            if slot.hook is None:
                # Mask the gradient so clipping and Adam's moments see only S*: the padding and template words
                # get large gradients that would otherwise dominate the clipped norm.
                slot.hook = weight.register_hook(lambda g, s=slot: g * s.trainable_rows.to(g.device)[:, None].to(g.dtype))
            params.append(weight)
        return params

    @torch.no_grad()
    def restore_frozen_rows(self) -> None:
        """Copy every non-trainable row back from the snapshot (call after each optimizer step)."""
        for slot in self.slots:
            weight = slot.weight  # (V, D)
            if slot.frozen.device != weight.device or slot.frozen.dtype != weight.dtype:
                slot.frozen = slot.frozen.to(device=weight.device, dtype=weight.dtype)
                slot.trainable_rows = slot.trainable_rows.to(weight.device)
            keep = ~slot.trainable_rows  # (V,)
            weight[keep] = slot.frozen[keep]

    @torch.no_grad()
    def freeze(self) -> None:
        """Stop training S*: its current rows join the snapshot, so every later restore keeps them as they are."""
        for slot in self.slots:
            slot.frozen = slot.weight.detach().clone()
            slot.trainable_rows = torch.zeros_like(slot.trainable_rows)
            slot.weight.requires_grad_(False)

    @property
    def frozen_all(self) -> bool:
        return not any(bool(slot.trainable_rows.any()) for slot in self.slots)

    def embeddings(self) -> dict[str, torch.Tensor]:
        """{text encoder name: (num_vectors, D)} the learned rows, detached, float32, on the CPU."""
        return {slot.name: slot.weight.detach()[slot.token_ids].float().cpu().clone() for slot in self.slots}


def _word_pattern(word: str) -> str:
    return rf"(?<!\w){re.escape(word)}(?!\w)"


def contains_word(text: str, word: str) -> bool:
    return re.search(_word_pattern(word), text) is not None


def replace_word(text: str, word: str, replacement: str) -> str:
    """Every whole-word occurrence of `word` in `text` replaced (case-sensitive: prompts are raw text here)."""
    return re.sub(_word_pattern(word), lambda _: replacement, text)


def insert_placeholder(text: str, placeholder_text: str, caption_token: str | None = None) -> str:
    """Put S* into a caption: replace `caption_token` (as a whole word) where it occurs, else append S*."""
    if caption_token and contains_word(text, caption_token):
        return replace_word(text, caption_token, placeholder_text)
    return f"{text.rstrip()} {placeholder_text}" if text.strip() else placeholder_text


def training_prompt(
    placeholder_text: str,
    learnable_property: str = "object",
    caption: str | None = None,
    caption_token: str | None = None,
    rng: random.Random | None = None,
) -> str:
    """y(v) of eq. 2: the image's caption with S* in it when there is one, else a random template."""
    if caption:
        return insert_placeholder(caption, placeholder_text, caption_token)
    if learnable_property not in TEMPLATES:
        raise ValueError(f"learnable_property must be one of {sorted(TEMPLATES)}, got {learnable_property!r}")
    return (rng or random).choice(TEMPLATES[learnable_property]).format(placeholder_text)


class PlaceholderPrompts(Dataset):
    """A training set whose prompts become y(v): each example's caption with S* inserted, or (no caption: an
    empty prompt) a template drawn per example and step. Drawn with python's `random`, which the engine seeds
    per (seed, epoch, index), so the prompt stream is reproducible and resumes exactly."""

    def __init__(self, dataset, placeholder_text: str, learnable_property: str = "object",
                 caption_token: str | None = None):
        self.dataset = dataset
        self.placeholder_text = placeholder_text
        self.learnable_property = learnable_property
        self.caption_token = caption_token

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        example = dict(self.dataset[i])
        example["prompt"] = training_prompt(
            self.placeholder_text, self.learnable_property, example.get("prompt") or None, self.caption_token
        )
        return example


def build_dataset(pipe, cfg: TextualInversionConfig) -> ImageCaptionDataset:
    """The concept's images at the training resolution (default: the model's native size). Images without a
    caption (all of them unless use_captions) get the empty prompt, which `PlaceholderPrompts` fills with a
    template."""
    if not cfg.train_data_dir:
        raise ValueError("textual inversion needs --train_data_dir (a folder with a few images of the concept)")
    if cfg.resolution is None:
        cfg.resolution = model_info(pipe).resolution
    sd.check_resolution(pipe, cfg.resolution)
    return ImageCaptionDataset.from_folder(
        cfg.train_data_dir, cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip, prompt="",
        use_captions=cfg.use_captions, warn_uncaptioned=True,
    )


def cache_latents(pipe, dataset, cfg, accelerator=None):
    """VAE moments of every image computed once (the VAE is frozen): training samples z ~ q(z|x) from them."""
    return cache_features(
        dataset, lambda batch: {"latent_moments": sd.image_moments(pipe.vae, batch["pixel_values"])},
        batch_size=cfg.train_batch_size, seed=cfg.seed, accelerator=accelerator,
    )


class TextualInversion:
    """The engine's hooks for textual inversion (the module docstring has the objective)."""

    def __init__(self):
        self.tokens: PlaceholderTokens | None = None

    def _require_tokens(self) -> PlaceholderTokens:
        if self.tokens is None:
            raise RuntimeError("the placeholder tokens are not added yet: trainable_parameters(pipe, cfg) comes first")
        return self.tokens

    def trainable_parameters(self, pipe, cfg: TextualInversionConfig):
        """Freeze the VAE, the UNet and the text encoders, add S*, return the input-embedding matrices."""
        for module in [pipe.vae, pipe.unet] + sd.text_encoders(pipe):
            module.requires_grad_(False)
        if self.tokens is None:
            self.tokens = PlaceholderTokens(pipe, cfg.placeholder_token, cfg.num_vectors, cfg.initializer_token)
        return self.tokens.parameters()

    def prepare(self, pipe, dataset, cfg: TextualInversionConfig, accelerator=None):
        if cfg.cache_latents:
            dataset = cache_latents(pipe, dataset, cfg, accelerator)
        return PlaceholderPrompts(dataset, self._require_tokens().prompt_text, cfg.learnable_property, cfg.caption_token)

    def collate(self, examples: list[dict]) -> dict:
        return collate_examples(examples)

    def loss(self, pipe, batch: dict, cfg: TextualInversionConfig):
        """Eq. 2 for one batch: the text encoders run with gradients (S* is inside them), the rest is frozen."""
        return sd.batch_loss(pipe, batch, cfg)

    def after_step(self, pipe, cfg: TextualInversionConfig, step: int) -> None:
        self._require_tokens().restore_frozen_rows()

    def validate(self, pipe, cfg: TextualInversionConfig, step: int):
        """DreamBooth's validation images (image i from the seed cfg.seed + i, under the training autocast) of the
        prompt with S* filled in."""
        if not cfg.validation_prompt:
            return []
        prompt = validation_prompt(cfg.validation_prompt, cfg.placeholder_token)
        return dreambooth.validate(pipe, dataclasses.replace(cfg, validation_prompt=prompt), step)

    def save(self, pipe, cfg: TextualInversionConfig, out_dir) -> dict[str, str]:
        return save_embeddings(self._require_tokens(), out_dir)

    def model_card(self, cfg: TextualInversionConfig) -> str:
        return model_card(cfg)


def validation_prompt(prompt: str, placeholder: str) -> str:
    """'{}' in a user prompt stands for S* (its first token: the pipeline expands multi-vector tokens itself)."""
    return prompt.replace("{}", placeholder)


def single_file_name(placeholder: str) -> str:
    """File name of the one-file embedding: A1111 and ComfyUI use the file name as the prompt word."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", placeholder.strip("<>")).strip("_") or "embedding"


def save_embeddings(tokens: PlaceholderTokens, out_dir) -> dict[str, str]:
    """Write S* through customize.formats: the diffusers folder layout (learned_embeds.safetensors, plus
    learned_embeds_2.safetensors for SDXL) and the single file ({token} for SD, {"clip_l", "clip_g"} for SDXL).
    Returns {layout: path}."""
    out_dir = Path(out_dir)
    vectors = tokens.embeddings()  # {encoder: (n, D)}
    written = save_embedding(out_dir, tokens.placeholder, vectors, layout="diffusers")
    single = save_embedding(out_dir / f"{single_file_name(tokens.placeholder)}.safetensors", tokens.placeholder,
                            vectors, layout="single")
    return {"diffusers": str(written[0]), "single": str(single[0])}


def model_card(cfg: TextualInversionConfig) -> str:
    from customize.training.tracking import model_card_text, run_settings

    settings = {
        "base model": cfg.pretrained_model_name_or_path,
        "placeholder": f"`{cfg.placeholder_token}` ({cfg.num_vectors} vector(s), initialised from `{cfg.initializer_token}`)",
        "prompts": "per-image captions" if cfg.use_captions else f"{cfg.learnable_property} templates",
        **run_settings(cfg),
        "learning rate": f"{cfg.learning_rate}{' (scaled)' if cfg.scale_lr else ''} ({cfg.lr_scheduler})",
    }
    return model_card_text(
        f"Textual inversion: {cfg.placeholder_token}",
        f"Trained with `customize` on `{cfg.pretrained_model_name_or_path}`. Load with "
        f"`pipe.load_textual_inversion(<this folder>)` (SDXL: once per encoder, `weight_name=\"learned_embeds_2.safetensors\"` "
        f"with `text_encoder_2` / `tokenizer_2` for the second) or `customize generate --embedding <file>`, then "
        f"write `{cfg.placeholder_token}` in the prompt.",
        settings,
    )
