"""The customization methods run on the toy world: the shared recipes' building blocks (the methods' configs,
`build_dataset`, `customize.training.train`) applied to the committed toy model and data, so the bench, the
demo and the tests train exactly what a user's `recipes/train_dreambooth_lora.py` run would.

Data in the checkout (written by `export_data`):
    data/toy/base      the toy base model (recipes/train_toy_base.py)
    data/toy/subject   5 images of the held-out subject (captions in metadata.jsonl)
    data/toy/style     8 images in the held-out style, all of `world.STYLE.shapes` (captions in metadata.jsonl)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from customize.toy import quality, world

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "toy"
BASE_DIR = DATA_DIR / "base"
SUBJECT_DIR = DATA_DIR / "subject"
STYLE_DIR = DATA_DIR / "style"
NUM_SUBJECT_IMAGES = 5
NUM_STYLE_IMAGES = 8


def base_available(path: str | Path = BASE_DIR) -> bool:
    return (Path(path) / "model_index.json").is_file()


def export_data(folder: str | Path = DATA_DIR, seed: int = 0) -> None:
    """Write the subject and style image folders (PNG + metadata.jsonl) that the recipes train on."""
    folder = Path(folder)
    world.export("subject", folder / "subject", NUM_SUBJECT_IMAGES, seed)
    world.export("style", folder / "style", NUM_STYLE_IMAGES, seed)


def load_base(path: str | Path = BASE_DIR):
    from customize.models import load_pipeline

    if not base_available(path):
        raise FileNotFoundError(f"no toy base model in {path}: train one with recipes/train_toy_base.py "
                                f"--pipeline_dir {path}")
    return load_pipeline(str(path))


@dataclass
class Run:
    """A trained pipeline (adapters attached) and what it cost."""

    pipe: object
    seconds: float
    trained_parameters: int
    output_dir: str
    losses: list[float] = field(default_factory=list)
    # How a prompt written with the subject's identifier ("a sks shape ...") is asked of this model: the
    # identity for DreamBooth, the identifier swapped for the learned word S* for textual inversion.
    prompt_for: Callable[[str], str] = field(default=lambda prompt: prompt)


def _run(method, cfg, base, build_dataset=None, prompt_for=None) -> Run:
    """Load the base, build the method's dataset, train with the shared engine; `trained_parameters` counts the
    parameters that require grad in the UNet and text encoder."""
    from customize.training import train

    start = time.perf_counter()
    pipe = load_base(base)
    dataset = (build_dataset or method.build_dataset)(pipe, cfg)
    result = train(method, pipe, dataset, cfg)
    seconds = time.perf_counter() - start
    trained = sum(p.numel() for m in (pipe.unet, pipe.text_encoder) for p in m.parameters() if p.requires_grad)
    for m in (pipe.unet, pipe.text_encoder):
        m.eval()
    return Run(pipe, seconds, trained, cfg.output_dir, list(result.losses), prompt_for or (lambda prompt: prompt))


# Settings measured on the toy model (bench/toy_quality.py, 16 images per setting). The toy UNet has no attention
# at 16x16, where the cross's thin arms and the stripes are drawn, so an attention-only LoRA cannot reach them
# (rank 8, 300 steps: subject fidelity 0%, style 17%); adapting the ResNet convolutions too does (subject 88%,
# style 67%). Stronger settings trade prompt fidelity for subject fidelity: rank 16 / 3e-3 / 600 steps with the
# text-encoder LoRA gave subject 100% but prompt 25%; without prior preservation every setting tried kept the
# instance images' white background for most unseen-background prompts.
# With prior preservation the subject is learned but only together with the instance backgrounds: after an
# all-linear LoRA (1000 steps) with class images captioned "a shape on a <bg> background", "a sks shape on a white
# background" gives the subject in 15/16 images and "a sks shape on a red background" in 0/16 (a red background with
# a class shape). No variant tried separated the two (32 images each, subject / prompt fidelity): prior weight 0.3
# 0% / 100%; text-encoder LoRA 3% / 50%; cross-attention K/V only (Custom Diffusion) 0% / 100%; loss masked to the
# subject 3% / 100% (9% / 100% on captions "a sks shape on a <bg> background" alone); instance images on three
# backgrounds 0% / 100%, on white + black 0% / 94%. Without the prior the same variants trade the other way
# (conv-only LoRA 88% / 3%, all-linear 94% / 3%, masked loss 50% / 19%, white + black 50% / 47%).
# The background is most of what the loss sees (the subject covers 13-17% of the latent), and it is the first
# thing a LoRA binds to the identifier: even a subject the base can draw, a green triangle, is not learned apart
# from its two backgrounds (subject / prompt fidelity 17% / 46% without prior preservation, 0% / 88% with; 300
# steps at lr 1e-3, attention only: 17% / 4%), and a loss restricted to the subject's pixels leaves the background
# free to follow the identifier instead (9% / 44%: magenta everywhere). 2000 steps with prior preservation: 0% / 100%.
# Class images only on the instance backgrounds: 62% / 31% in one run, 0% / 84% with other class-image seeds (at
# this size a run swings by tens of points with the seeds); a quarter to a half of them on the other backgrounds:
# 0% / 100%. Instance images with the subject large: 88% / 0% without prior preservation, 0% / 100% with.
# bench/toy_background_study.py reruns the main variants, scoring seen and unseen backgrounds apart.
# Where the background is decided (no prior, 32 images each): training on t < 500 only keeps every unseen background
# (prompt 100%) but the subject forms on 25% of them (a magenta circle on red, a red cross on blue), t < 650 / 750
# bring the binding back (72% / 38% prompt); min-SNR weighting (gamma 5 / 1, which for v-prediction mutes t > 600)
# gives 9% / 84% and 25% / 75%; switching the default LoRA off for the sampling steps above t = 900 / 800 / 600 gives
# 47% / 72%, 38% / 75%, 25% / 75%. Subject and background together stay at 19-25% of images in every one of these,
# as in the default run: per background it is all or nothing (green 16/16, red, blue, black 0/16). A base retrained
# with cross-attention at 16x16 as well (recipes/train_toy_base.py --attention_at_full_res true, 44 min on 2 cores;
# base colour / shape / background 98% / 94% / 100%) does no better: subject 84%, prompt 0% on the unseen backgrounds;
# nor does one trained with 30% two-shape scenes (--pair_fraction 0.3, 29 min; 96% / 95% / 100%): 94% / 0%, nor a
# 12-minute pilot whose text encoder has no layers (each word's state only its own embedding): 56% / 62%, again
# green alone (7/8). Green is the unseen background whose VAE latent lies nearest an instance one (1.9 from yellow;
# red, blue, black 2.8-3.1): the fine-tune carries over to backgrounds that look alike in latent space.
# bench/toy_attention.py shows why none of these bases separates them: its words' cross-attention is close to uniform
# over the image (shape words 0.9-2.0x as much on the drawn shape as off it, background words 0.8-1.1x), so "sks" is
# read as part of one pooled prompt vector. A base trained with the token-grounding loss (--grounding_loss_weight 0.1,
# customize.toy.grounding; 37 min) localises (shape words >800x, background words 0.00-0.17x; base 100/100/100%):
# there the default LoRA gives subject / prompt 50% / 97% (green 8/8, blue 5/8, red 2/8, black 0/8 subject on the asked
# background), all-linear 1000 steps 56% / 50%, 1500 steps 53% / 66%, text-encoder LoRA 50% / 94%, rank 8 / 32
# 47% / 100%, 62% / 56%, prior preservation 0% / 100%. Subject shown on white + black instead (unseen: red, green,
# blue, yellow; 16 seeds per background, two seed sets): 64-69% / 100% (600 steps), 72% / 100% (900), 70% / 75% (1200),
# but with training seed 1: 34-41%, 53-55%, 50-58% (prompt 100%). A magenta cross on red stays a faint smudge in all
# of them (the VAE reconstructs it; the UNet fades it). Style LoRA on that base: 69%.
# Grounded with cross-attention at 16x16 too (--attention_at_full_res true, 49 min; 100/98.5/100%): default LoRA 53% / 78%
# (white + yellow), unseen subject on the asked background 66% with white + black; attention-only LoRA (ckpt 3000) 22% / 56%,
# cross-attention K/V only 9% / 31%: a LoRA on a projection changes every token's keys or values, background words' too.
LORA_DEFAULTS = dict(rank=16, learning_rate=3e-3, max_train_steps=600, train_batch_size=4, lora_target="attention+conv")
FULL_DEFAULTS = dict(learning_rate=2e-4, max_train_steps=300, train_batch_size=4)


def _subject_config(config_cls, output_dir, *, base, with_prior: bool, num_class_images: int, instance_dir,
                    seed: int, progress: bool, **overrides):
    subject = world.SUBJECT
    return config_cls(
        pretrained_model_name_or_path=str(base), instance_data_dir=str(instance_dir),
        instance_prompt=subject.instance_prompt, use_captions=True,  # captions name the background the image shows
        with_prior_preservation=with_prior, class_prompt=subject.class_prompt if with_prior else None,
        class_data_dir=str(Path(output_dir) / "class_images") if with_prior else None,
        num_class_images=num_class_images, sample_batch_size=32, class_inference_steps=quality.EVAL_STEPS,
        resolution=world.IMAGE_SIZE, output_dir=str(output_dir), seed=seed, checkpointing_steps=0,
        report_to="none", progress=progress, lr_warmup_steps=0, **overrides,
    )


def captioned_class_images(folder, backgrounds, n: int, *, base=BASE_DIR, seed: int = 0) -> Path:
    """Class images named by their background: image i is the base model's "a shape on a <bg> background" for
    bg = backgrounds[i % len(backgrounds)], its caption in a .txt beside it (the shared class-image generator,
    which writes only the missing ones; the DreamBooth dataset reads the captions with use_captions)."""
    from customize.methods.class_images import generate_class_images

    prompts = [f"{world.SUBJECT.class_prompt} on a {bg} background" for bg in backgrounds]
    generate_class_images(load_base(base), folder, prompts, n, sample_batch_size=32, seed=seed,
                          num_inference_steps=quality.EVAL_STEPS, progress=False)
    return Path(folder)


def _dreambooth(method, config_cls, defaults: dict, output_dir, *, base, instance_dir, with_prior: bool,
                num_class_images: int, seed: int, progress: bool, overrides: dict,
                class_backgrounds: tuple[str, ...] | None = None) -> Run:
    cfg = _subject_config(config_cls, output_dir, base=base, with_prior=with_prior, num_class_images=num_class_images,
                          instance_dir=instance_dir, seed=seed, progress=progress, **{**defaults, **overrides})
    if with_prior and class_backgrounds:
        captioned_class_images(cfg.class_data_dir, class_backgrounds, num_class_images, base=base, seed=seed)
    return _run(method, cfg, base)


def dreambooth_lora(output_dir, *, base=BASE_DIR, instance_dir=SUBJECT_DIR, with_prior: bool = False,
                    num_class_images: int = 50, seed: int = 0, progress: bool = False,
                    class_backgrounds: tuple[str, ...] | None = None, **overrides) -> Run:
    """DreamBooth-LoRA on the held-out subject ("a sks shape"), optionally with prior preservation; with
    `class_backgrounds` the class images are "a shape on a <bg> background" for those backgrounds, so captioned."""
    from customize.methods import lora

    return _dreambooth(lora, lora.LoRAConfig, LORA_DEFAULTS, output_dir, base=base, instance_dir=instance_dir,
                       with_prior=with_prior, num_class_images=num_class_images, seed=seed, progress=progress,
                       overrides=overrides, class_backgrounds=class_backgrounds)


def dreambooth_full(output_dir, *, base=BASE_DIR, instance_dir=SUBJECT_DIR, with_prior: bool = False,
                    num_class_images: int = 50, seed: int = 0, progress: bool = False, **overrides) -> Run:
    """DreamBooth, full UNet fine-tune, on the held-out subject."""
    from customize.methods import dreambooth

    return _dreambooth(dreambooth, dreambooth.DreamBoothConfig, FULL_DEFAULTS, output_dir, base=base,
                       instance_dir=instance_dir, with_prior=with_prior, num_class_images=num_class_images, seed=seed,
                       progress=progress, overrides=overrides)


# A texture over 8 images takes longer than a subject: stripes on unseen shapes 62% after 600 steps, 90% after 1000
# (48 images each; rank 32 at 600 steps: 69%).
STYLE_OVERRIDES = dict(max_train_steps=1000)


def style_lora(output_dir, *, base=BASE_DIR, style_dir=STYLE_DIR, seed: int = 0, progress: bool = False,
               **overrides) -> Run:
    """A style LoRA on the held-out style's images, each with its own caption ("... in zwx style")."""
    from customize.methods import lora

    settings = {**LORA_DEFAULTS, **STYLE_OVERRIDES, **overrides}
    cfg = lora.LoRAConfig(
        pretrained_model_name_or_path=str(base), instance_data_dir=str(style_dir),
        instance_prompt=f"a {world.SUBJECT.class_word} {world.STYLE.trigger}", use_captions=True,
        resolution=world.IMAGE_SIZE, output_dir=str(output_dir), seed=seed, checkpointing_steps=0, report_to="none",
        progress=progress, lr_warmup_steps=0, **settings,
    )
    return _run(lora, cfg, base)


# Textual inversion learns one word, so it gets a larger step size and more steps than a LoRA (the embedding is
# 64 numbers); pivotal tuning uses the LoRA settings plus the embedding's step size.
TI_DEFAULTS = dict(learning_rate=5e-3, max_train_steps=400, train_batch_size=4, num_vectors=1)
PIVOTAL_DEFAULTS = dict(**LORA_DEFAULTS, text_encoder_lr=5e-3, num_new_tokens_per_abstraction=1)


def _word_vectors(pipe, num_vectors: int) -> int:
    """Numbers in `num_vectors` rows of the token-embedding matrix (a new word's trained parameters)."""
    return num_vectors * pipe.text_encoder.get_input_embeddings().weight.shape[1]


def _placeholder_prompts(identifier: str, placeholder: str) -> Callable[[str], str]:
    from customize.methods.textual_inversion import replace_word

    return lambda prompt: replace_word(prompt, identifier, placeholder)


def textual_inversion(output_dir, *, base=BASE_DIR, instance_dir=SUBJECT_DIR, seed: int = 0, progress: bool = False,
                      **overrides) -> Run:
    """Textual inversion of the held-out subject: a new word S* = "<sks>" initialised from the class word, trained
    on the same captions as DreamBooth ("a sks shape on a white background") with S* in the identifier's place."""
    from customize.methods import textual_inversion as ti

    subject = world.SUBJECT
    settings = {**TI_DEFAULTS, **overrides}
    placeholder = f"<{subject.identifier}>"
    cfg = ti.TextualInversionConfig(
        pretrained_model_name_or_path=str(base), train_data_dir=str(instance_dir), placeholder_token=placeholder,
        initializer_token=subject.class_word, use_captions=True, caption_token=subject.identifier,
        resolution=world.IMAGE_SIZE, output_dir=str(output_dir), seed=seed, checkpointing_steps=0,
        report_to="none", progress=progress, lr_warmup_steps=0, scale_lr=False, gradient_accumulation_steps=1,
        **settings,
    )
    run = _run(ti.TextualInversion(), cfg, base, build_dataset=ti.build_dataset,
               prompt_for=_placeholder_prompts(subject.identifier, placeholder))
    run.trained_parameters = _word_vectors(run.pipe, cfg.num_vectors)  # not the whole matrix that requires grad
    return run


def pivotal(output_dir, *, base=BASE_DIR, instance_dir=SUBJECT_DIR, seed: int = 0, progress: bool = False,
            **overrides) -> Run:
    """Pivotal tuning of the held-out subject: a new word "<sks>" (initialised from the class word) and a UNet
    LoRA trained together on DreamBooth's captions."""
    from customize.methods import pivotal as pt

    subject = world.SUBJECT
    settings = {**PIVOTAL_DEFAULTS, **overrides}
    placeholder = f"<{subject.identifier}>"
    cfg = _subject_config(pt.PivotalConfig, output_dir, base=base, with_prior=False, num_class_images=0,
                          instance_dir=instance_dir, seed=seed, progress=progress, token_abstraction=subject.identifier,
                          placeholder_token=placeholder, initializer_token=subject.class_word, **settings)
    from customize.methods import lora

    run = _run(pt.PivotalTuning(), cfg, base, build_dataset=lora.build_dataset,
               prompt_for=_placeholder_prompts(subject.identifier, placeholder))
    # the LoRA (counted by _run) plus the new word's vectors, which live in rows of the frozen embedding matrix
    run.trained_parameters += _word_vectors(run.pipe, cfg.num_new_tokens_per_abstraction)
    return run
