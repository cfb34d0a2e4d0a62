"""The customization methods run on the toy world: the shared recipes' building blocks (the methods' configs,
`build_dataset`, `customize.training.train`) applied to the committed toy model and data, so the bench, the
demo and the tests train exactly what a user's `recipes/train_dreambooth_lora.py` run would.

Data in the checkout (written by `export_data`):
    data/toy/base      the toy base model (recipes/train_toy_base.py)
    data/toy/subject   5 images of the held-out subject, each twice: with its full caption and with the subject
                       prompt alone (10 files; captions in metadata.jsonl; world._subject_rows says why)
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
    data: dict = field(default_factory=dict)  # what the training data cost, where a runner makes it (ip2p_pairs)


def _run(method, cfg, base, build_dataset=None, prompt_for=None, build_model=None) -> Run:
    """Load the base, build the method's dataset (and with `build_model` the model it trains from the base),
    train with the shared engine; `trained_parameters` counts the parameters that require grad in the UNet and
    text encoder."""
    from customize.training import train

    start = time.perf_counter()
    pipe = load_base(base)
    dataset = (build_dataset or method.build_dataset)(pipe, cfg)
    if build_model is not None:
        pipe = build_model(pipe, cfg)
    result = train(method, pipe, dataset, cfg)
    seconds = time.perf_counter() - start
    trained = sum(p.numel() for m in (pipe.unet, pipe.text_encoder) for p in m.parameters() if p.requires_grad)
    for m in (pipe.unet, pipe.text_encoder):
        m.eval()
    return Run(pipe, seconds, trained, cfg.output_dir, list(result.losses), prompt_for or (lambda prompt: prompt))


# Settings measured on the toy model (bench/toy_quality.py, bench/toy_background_study.py; figures in
# docs/findings.md). The toy UNet has no attention at 16x16, where the cross's thin arms and the stripes are
# drawn, so the LoRA adapts the ResNet convolutions too ("attention+conv";
# docs/findings.md, 'LoRA targets on the toy UNet').
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


def captioned_class_images(folder, backgrounds, n: int, *, base=BASE_DIR, seed: int = 0,
                           guidance_scale: float | None = None) -> Path:
    """Class images named by their background: image i is the base model's "a shape on a <bg> background" for
    bg = backgrounds[i % len(backgrounds)], its caption in a .txt beside it (the shared class-image generator,
    which writes only the missing ones; the DreamBooth dataset reads the captions with use_captions)."""
    from customize.methods.class_images import generate_class_images

    prompts = [f"{world.SUBJECT.class_prompt} on a {bg} background" for bg in backgrounds]
    generate_class_images(load_base(base), folder, prompts, n, sample_batch_size=32, seed=seed,
                          num_inference_steps=quality.EVAL_STEPS, guidance_scale=guidance_scale, progress=False)
    return Path(folder)


def _dreambooth(method, config_cls, defaults: dict, output_dir, *, base, instance_dir, with_prior: bool,
                num_class_images: int, seed: int, progress: bool, overrides: dict,
                class_backgrounds: tuple[str, ...] | None = None, **run_options) -> Run:
    cfg = _subject_config(config_cls, output_dir, base=base, with_prior=with_prior, num_class_images=num_class_images,
                          instance_dir=instance_dir, seed=seed, progress=progress, **{**defaults, **overrides})
    if with_prior and class_backgrounds:
        captioned_class_images(cfg.class_data_dir, class_backgrounds, num_class_images, base=base, seed=seed,
                               guidance_scale=cfg.class_guidance_scale)
    return _run(method, cfg, base, **run_options)


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
                    num_class_images: int = 50, seed: int = 0, progress: bool = False,
                    class_backgrounds: tuple[str, ...] | None = None, **overrides) -> Run:
    """DreamBooth, full UNet fine-tune, on the held-out subject (class images as in dreambooth_lora)."""
    from customize.methods import dreambooth

    return _dreambooth(dreambooth, dreambooth.DreamBoothConfig, FULL_DEFAULTS, output_dir, base=base,
                       instance_dir=instance_dir, with_prior=with_prior, num_class_images=num_class_images, seed=seed,
                       progress=progress, overrides=overrides, class_backgrounds=class_backgrounds)


# A texture over 8 images takes longer than a subject (docs/findings.md, 'Style LoRA steps').
STYLE_OVERRIDES = dict(max_train_steps=1500)


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


def pivotal(output_dir, *, base=BASE_DIR, instance_dir=SUBJECT_DIR, with_prior: bool = False,
            num_class_images: int = 50, seed: int = 0, progress: bool = False,
            class_backgrounds: tuple[str, ...] | None = None, **overrides) -> Run:
    """Pivotal tuning of the held-out subject: a new word "<sks>" (initialised from the class word) and a UNet
    LoRA trained together on DreamBooth's captions, optionally with prior preservation (as dreambooth_lora)."""
    from customize.methods import lora
    from customize.methods import pivotal as pt

    subject = world.SUBJECT
    placeholder = f"<{subject.identifier}>"
    word = dict(token_abstraction=subject.identifier, placeholder_token=placeholder,
                initializer_token=subject.class_word)
    run = _dreambooth(pt.PivotalTuning(), pt.PivotalConfig, {**PIVOTAL_DEFAULTS, **word}, output_dir, base=base,
                      instance_dir=instance_dir, with_prior=with_prior, num_class_images=num_class_images, seed=seed,
                      progress=progress, overrides=overrides, class_backgrounds=class_backgrounds,
                      build_dataset=lora.build_dataset, prompt_for=_placeholder_prompts(subject.identifier, placeholder))
    # the LoRA (counted by _run) plus the new word's vectors, which live in rows of the frozen embedding matrix
    num_vectors = overrides.get("num_new_tokens_per_abstraction", PIVOTAL_DEFAULTS["num_new_tokens_per_abstraction"])
    run.trained_parameters += _word_vectors(run.pipe, num_vectors)
    return run


# ZipLoRA on the toy model: the merger vectors have one entry per input column, so the toy's few steps need a
# larger step size than the paper's 5e-5 for SDXL (at 5e-5 x 100 steps no entry can move by more than 0.005).
ZIPLORA_DEFAULTS = dict(steps=100, learning_rate=1e-2, similarity_lambda=0.01, train_batch_size=4, checkpointing_steps=0)


def ziplora(output_dir, content_lora, style_lora, *, base=BASE_DIR, data: str = "images", seed: int = 0,
            progress: bool = False, **overrides):
    """ZipLoRA of a subject LoRA and a style LoRA (files) on the toy base. `data="images"` trains on the LoRAs'
    own captioned images (data/toy/subject and data/toy/style), `data="generated"` on images each LoRA generates
    from its trigger prompt (the paper's recipe). Returns (ZipLoRAResult, seconds)."""
    from customize.methods.ziplora import ziplora as run

    settings = {**ZIPLORA_DEFAULTS, **overrides}
    if data == "images":
        settings.update(content_images=str(SUBJECT_DIR), style_images=str(STYLE_DIR), use_captions=True)
    elif data != "generated":
        raise ValueError(f"data must be 'images' or 'generated', got {data!r}")
    start = time.perf_counter()
    result = run(load_base(base), content_lora, style_lora, world.SUBJECT.instance_prompt,
                 f"a {world.SUBJECT.class_word} {world.STYLE.trigger}", output_dir=str(output_dir), seed=seed,
                 progress=progress, resolution=world.IMAGE_SIZE, generation_steps=quality.EVAL_STEPS,
                 num_images=NUM_STYLE_IMAGES, report_to="none", **settings)
    return result, time.perf_counter() - start


# A mask ControlNet on the toy model: far fewer steps than SD 1.5's thousands, so a larger step size than the
# recipe's 1e-5 (the zero convolutions must grow from 0 within the run); measured in docs/findings.md.
# measured in docs/findings.md, 'ControlNet on masks': 300 steps at 5e-4 gave IoU 0.53, 900 at 1e-3 0.67, 1800 0.67
# (512 scenes, conditioning scale 1). 2048 scenes instead of 512 raised it at every scale (1: 0.64 -> 0.66,
# 2: 0.70 -> 0.74), for ~30 s more; the rest of the gap is the base's size prior (held-out radii pulled toward the
# trained 6 and 10), which a conditioning scale above 1 overrides at sampling time (CONTROLNET_SAMPLING).
CONTROLNET_DEFAULTS = dict(learning_rate=1e-3, max_train_steps=900, train_batch_size=8, proportion_empty_prompts=0.1,
                           validation_steps=150, num_validation_images=2)
NUM_CONTROL_IMAGES = 2048
# How the bench samples the trained mask ControlNet (keywords of the diffusers pipeline). Scale 2 over 3 sampling
# seeds: IoU 0.72-0.74 against 0.63-0.67 at 1, shape (at most 1 of 48 lost) and colour+bg kept; 4 gives 0.76-0.80
# but loses up to 2 of 48 shapes. The training-time validation curve stays at the pipeline's scale 1.
CONTROLNET_SAMPLING = dict(controlnet_conditioning_scale=2.0)
CONTROL_VALIDATION_PROMPT = "a yellow shape on a blue background"  # no shape named: the mask says which


def controlnet_mask(output_dir, *, base=BASE_DIR, num_images: int = NUM_CONTROL_IMAGES, seed: int = 0,
                    progress: bool = False, **overrides) -> Run:
    """A ControlNet on shape masks: `num_images` scenes of the base's training split (no held-out combination),
    exported with their masks (`world.export("control-mask")`: `conditioning_image_file_name` columns) and full
    captions into output_dir/data, trained by the recipe's building blocks. Every validation_steps it draws the
    validation prompt on 4 held-out-layout masks and logs their mean mask IoU (validation/scores.png). The Run's
    pipe is the ControlNet pipeline; trained_parameters counts the ControlNet."""
    from customize.methods import controlnet as cn

    output_dir = Path(output_dir)
    data = output_dir / "data"
    if not (data / "metadata.jsonl").is_file():
        world.export("control-mask", data, num_images, seed, split="train")
    controls = output_dir / "validation_controls"
    controls.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, case in enumerate(world.heldout_control_cases(4, seed + 1)):
        case.control.save(controls / f"{k}.png")
        paths.append(str(controls / f"{k}.png"))
    cfg = cn.ControlNetConfig(
        pretrained_model_name_or_path=str(base), train_data_dir=str(data), resolution=world.IMAGE_SIZE,
        output_dir=str(output_dir), seed=seed, checkpointing_steps=0, report_to="none", progress=progress,
        lr_warmup_steps=0, validation_prompt=CONTROL_VALIDATION_PROMPT, validation_image=paths,
        validation_inference_steps=quality.EVAL_STEPS, validation_score="mask_iou", overwrite_output_dir=True,
        **{**CONTROLNET_DEFAULTS, **overrides},
    )
    run = _run(cn.ControlNetMethod(), cfg, base, build_dataset=cn.build_dataset, build_model=cn.build_model)
    run.pipe.controlnet.eval()
    run.trained_parameters = sum(p.numel() for p in run.pipe.controlnet.parameters())
    return run
# InstructPix2Pix on the toy model (bench/toy_quality.py, the ip2p rows). The whole UNet trains, conv_in widened
# to read the input image, so it must learn to copy the input through 4 zero-initialised channels. Measured
# (docs/findings.md, 'InstructPix2Pix on the toy model'): at 600 steps the model barely copies (held-out loss at
# t = T: 0.36 with the input image, 1.16 with none; the one-step x0 shows blobs), and more steps alone are slow;
# cubic timestep sampling (T2I-Adapter: most draws at the noisy end, where the layout is set and the input is the
# only source of it) halves that loss at the same steps, and a cosine decay anneals the full-UNet step size of
# 1e-3. At 2400 steps 400 pairs are memorised (loss at t = T 0.04 on them, 0.14 on unseen training-split scenes),
# so the exact rows train on 4000 pairs (free to render). 4800 steps: held-out preservation (at the bench's s_I 2,
# s_T 2) 89%, against 91% at 9600 steps; each doubling before that bought 7-12 points at 1.5 / 7.5.
IP2P_DEFAULTS = dict(learning_rate=1e-3, lr_scheduler="cosine", max_train_steps=4800, train_batch_size=16,
                     timestep_sampling="cubic", conditioning_dropout_prob=0.05)
# Training rows: the world's exact pairs cost nothing (4000 render in ~4 s); P2P pairs cost ~1.3 s a row on one
# CPU thread (up to 8 candidates, 2 images x 20 steps each; most rows pass at the first or second), and the
# probe filter keeps nearly all of them (1184 of 1200 rows). More P2P pairs buy preservation up to 1200 rows:
# held-out kept 58% from 360 rows, 70% from 1200 (~22 minutes of pairs on one thread); 2400 rows give 66%
# (validation 73 -> 83%) at 4800 steps, and 81% at 9600 steps (validation 85%): the P2P row trains on 2400 rows
# for 9600 steps (~35 minutes of pairs on one thread, ~22 of training on two).
IP2P_PAIRS = {"exact": 4000, "p2p": 2400}
IP2P_STEPS = {"p2p": 9600}  # max_train_steps where a training set needs other than IP2P_DEFAULTS'
# P2P-made pairs: the candidates per row (seeds x self-replace x cross-replace fractions; cross 0 is what lets a
# size or position edit pass: 0 of 30 position rows pass at cross 0.8, 27 of 30 at 0) and the exact probe filter
IP2P_P2P = dict(seeds=(0, 1), self_replace_steps=(0.4, 0.8), cross_replace_steps=(0.8, 0.0), min_score=1.0,
                max_score=1.0)


def ip2p_pairs(folder, data: str = "exact", *, base=BASE_DIR, n: int | None = None, seed: int = 0,
               progress: bool = False) -> tuple[Path, dict]:
    """A training folder of (input image, instruction, edited image) triplets on the world's training split
    (the held-out combinations stay out, as in the base's training): `data="exact"` the world's own rendered
    edit pairs (`world.export("edits")`), `data="p2p"` the paper's recipe in miniature: the same rows' captions
    drawn by the toy base with Prompt-to-Prompt and kept only where the probes read an exact edit
    (`ip2p_data.make_pairs` with `toy_probe_score` at 1.0). Returns (folder, {"pairs": kept, "rows": n,
    "seconds": making them})."""
    from customize.methods import ip2p_data

    start = time.perf_counter()
    n = IP2P_PAIRS.get(data, 0) if n is None else n
    if data == "exact":
        out = world.export("edits", folder, n, seed, split="train")
        kept = n
    elif data == "p2p":
        settings = dict(IP2P_P2P)
        lo, hi = settings.pop("min_score"), settings.pop("max_score")
        rows = ip2p_data.toy_rows(n, seed, split="train")
        pairs, _ = ip2p_data.make_pairs(load_base(base), rows, score=ip2p_data.toy_probe_score, min_score=lo,
                                        max_score=hi, num_inference_steps=quality.EVAL_STEPS,
                                        guidance_scale=quality.EVAL_GUIDANCE, progress=progress, **settings)
        out, kept = ip2p_data.write_pairs(folder, pairs), len(pairs)
    else:
        raise ValueError(f"data must be 'exact' or 'p2p', got {data!r}")
    return out, {"pairs": kept, "rows": n, "seconds": time.perf_counter() - start}


def instruct_pix2pix(output_dir, *, base=BASE_DIR, data: str = "exact", n_pairs: int | None = None, seed: int = 0,
                     reuse_pairs: bool = False, progress: bool = False, **overrides) -> Run:
    """InstructPix2Pix trained on `ip2p_pairs(data)` (written to output_dir/pairs; with reuse_pairs an earlier
    run's folder there is trained on again, since P2P pairs take minutes) from the toy base, with the recipe's
    blocks (build_dataset, build_model, the shared engine). Run.pipe is the InstructPix2Pix pipeline; Run.seconds
    counts training only, the pairs' cost is in Run.data (the ip2p_pairs record; seconds 0 when reused)."""
    import json

    from customize.methods import instruct_pix2pix as ip2p
    from customize.training import train

    folder = Path(output_dir) / "pairs"
    if reuse_pairs and (folder / "metadata.jsonl").is_file():
        kept = len((folder / "metadata.jsonl").read_text().splitlines())
        made = {"pairs": kept, "rows": json.loads((folder / "made.json").read_text())["rows"]
                if (folder / "made.json").is_file() else None, "seconds": 0.0}
    else:
        n = IP2P_PAIRS[data] if n_pairs is None and data in IP2P_PAIRS else n_pairs
        folder, made = ip2p_pairs(folder, data, base=base, n=n, seed=seed, progress=progress)
        (folder / "made.json").write_text(json.dumps(made) + "\n")
    cfg = ip2p.InstructPix2PixConfig(
        pretrained_model_name_or_path=str(base), train_data_dir=str(folder), resolution=world.IMAGE_SIZE,
        output_dir=str(Path(output_dir) / "model"), seed=seed, checkpointing_steps=0, report_to="none",
        progress=progress, lr_warmup_steps=0,
        **{**IP2P_DEFAULTS, "max_train_steps": IP2P_STEPS.get(data, IP2P_DEFAULTS["max_train_steps"]), **overrides},
    )
    start = time.perf_counter()
    pipe = load_base(base)
    dataset = ip2p.build_dataset(pipe, cfg)
    model = ip2p.build_model(pipe, cfg)
    result = train(ip2p.InstructPix2PixMethod(), model, dataset, cfg)
    seconds = time.perf_counter() - start
    model.unet.eval()
    trained = sum(p.numel() for p in model.unet.parameters() if p.requires_grad)
    return Run(model, seconds, trained, cfg.output_dir, list(result.losses), data=made)
