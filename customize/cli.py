"""The `customize` command: generate images, inspect and convert weight files, run the toy demo and benchmarks.

Each subcommand is a small function over the library; nothing here computes anything the library does not.
Errors a user can fix (a wrong file, a wrong size, a LoRA for another family) print one message and exit 1;
`--traceback` shows the full stack.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

EXIT_ERROR = 1
# What a user's input can raise (bad options or config values, missing or unreadable images, captions, model or
# LoRA files, a full disk, a loss that diverged): the `customize` command and the recipes report these in one line.
USER_ERRORS = (ValueError, OSError, FloatingPointError)
# StableDiffusion(XL)Pipeline.check_inputs refuses sizes that are not multiples of 8 pixels
DIFFUSERS_PIXEL_MULTIPLE = 8

MAIN_HELP = """\
Personalise and edit Stable Diffusion 1.x / 2.x and SDXL models.

examples:
  customize generate -m stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt "a photo of a dog" --out out/
  customize generate -m tiny-sd --prompt "a red circle" --steps 4        (a tiny in-memory model, no download)
  customize edit -m tiny-sd --prompt "a red circle" --target "a red square" --steps 4 -o out/   (Prompt-to-Prompt)
  customize inspect my_lora.safetensors                                  (format, family, rank, alpha, per block)
  customize convert pytorch_lora_weights.safetensors my_lora.safetensors --to kohya
  customize merge dog.safetensors style.safetensors:0.7 --method ties --rank 16 -o dog_style.safetensors
  customize demo                                                         (the toy-world demo)
  customize env                                                          (versions and GPU, for a bug report)

Run `customize <command> --help` for each command's options and examples.
"""

GENERATE_HELP = """\
Generate images with a model, optionally with LoRA files and textual-inversion embeddings.

Writes one PNG per image (named <prompt>-<image>-seed<seed>.png), grid.png (one row per prompt) and
generation.json (every setting, to reproduce the run) into --out. Every file is written atomically, and
nothing is written when an input is wrong.

Seeds: image j of every prompt (j = 0 .. --num-images - 1) is drawn from its own generator seeded with
--seed + j (customize.inference.generate), so it depends on its prompt and seed only: `--seed 5 --num-images 1`
redraws image 1 of `--seed 4 --num-images 2` (to within one 8-bit level of float rounding).

examples:
  customize generate -m stabilityai/stable-diffusion-xl-base-1.0 --prompt "a watercolor fox" --num-images 4
  customize generate -m ./my-model --prompts-file prompts.txt --steps 30 --guidance 7 --scheduler dpm++
  customize generate -m stable-diffusion-v1-5/stable-diffusion-v1-5 --lora style.safetensors:0.8 --lora dog/:1.0 \\
      --prompt "a photo of sks dog in <my-style> style" --embedding my-style.pt:<my-style>
  customize generate -m tiny-sdxl --prompt "a blue square" --steps 4 --width 32 --height 32 --out out/

--lora FILE[:WEIGHT]     diffusers, PEFT or kohya/A1111 file (or a folder with pytorch_lora_weights.safetensors);
                         WEIGHT scales it (default 1.0). A LoRA made for another family is refused.
--fuse                   fold the LoRAs into the weights first (same images up to float rounding, base speed)
--embedding FILE[:TOKEN] diffusers learned_embeds, SDXL clip_l/clip_g, or A1111 .pt/.safetensors; TOKEN
                         overrides the token stored in the file. SDXL models get both encoders' vectors.

ControlNet (repeat --controlnet for several at once; each then takes its own --control-image and, repeated in
the same order, its own --preprocess / --conditioning-scale / --control-start / --control-end; given once, a
value serves every ControlNet):
  customize generate -m stable-diffusion-v1-5/stable-diffusion-v1-5 --controlnet lllyasviel/sd-controlnet-canny \
      --control-image bird.png --preprocess canny --conditioning-scale 0.8 --prompt "a bird"
--controlnet PATH        a diffusers ControlNet folder or hub id (one made for another family is refused)
--control-image IMG      its conditioning image (resized to --width x --height)
--preprocess NAME        canny, soft_edge, scribble, segmentation or none (default: the image as it is)
--conditioning-scale S   multiplies the ControlNet's residuals (default 1.0)
--guess-mode             the ControlNet sees the conditional half only, residuals ramped 0.1 -> 1
--control-start/-end F   the fraction of the steps the ControlNet acts on (default 0 and 1)
"""

EDIT_HELP = """\
Edit an image by editing its prompt (Prompt-to-Prompt, Hertz et al. 2022; docs/methods.md, 'Prompt-to-Prompt'):
the source prompt and every --target are drawn from the same seed in one batch while the targets take the
source's attention maps, so the layout stays and only what the words changed changes.

Writes into --out: source.png, edited-<i>.png (one per --target, in order, from 0), attention.png (the source
prompt's per-word cross-attention maps over the source image: where each word is drawn, to choose --blend
words and --reweight weights), grid.png (source and edits side by side) and edit.json (every setting). Every
file is written atomically; a folder that already holds them is refused unless --overwrite.

  --replace (default)   word swap: the prompts have the same number of words ("circle" -> "square")
  --refine              words added or removed ("a circle" -> "a red circle")
  --cross-steps F       fraction of the steps the targets take the source's cross-attention (default 0.8)
  --self-steps F        ... and its self-attention (default 0.4): more keeps more of the source's layout
  --reweight WORD=C     scale a target word's attention by C (repeatable; 2 strengthens, 0.5 weakens)
  --blend WORD          local blend: only the pixels of these words' objects change (repeatable; words of the
                        source and/or the targets); --blend-invert keeps those pixels instead. --blend-threshold
                        is the fraction of the words' peak attention that counts as the object and
                        --blend-dilation grows it by that many latent pixels (defaults 0.3 and 1 for the region
                        that changes, 0.4 and 0 with --blend-invert: the kept region is drawn tight, since a kept
                        pixel of the old background shows as a speck of it at the object's edge)
  --image FILE --inversion {null-text,negative-prompt,direct,ddim}
                        edit a real image (--prompt describes it) through an inversion

InstructPix2Pix (Brooks et al. 2023; recipes/train_instruct_pix2pix.py): with --instruction "make the shape
blue" --image IN, -m is an InstructPix2Pix model and no --prompt / --target is given; writes input.png,
edit-seed<N>.png and edit.json, and with --grid-image-guidance / --grid-guidance a grid-seed<N>.png over those
values (the image-fidelity / edit-strength trade-off: eps = eps(0,0) + s_I (eps(I,0) - eps(0,0)) +
s_T (eps(I,T) - eps(I,0))).

examples:
  customize edit -m tiny-sd --prompt "a red circle on a blue background" \\
      --target "a red square on a blue background" --steps 4 -o out/square
  customize edit -m stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt "a cat riding a bicycle" \\
      --target "a dog riding a bicycle" --target "a tiger riding a bicycle" --blend cat --blend dog --blend tiger
  customize edit -m ./my-model --prompt "a house in the snow" --target "a house in the snow" \\
      --reweight snow=0.3 --cross-steps 1.0                   (less snow, same picture)
  customize edit -m stabilityai/stable-diffusion-xl-base-1.0 --prompt "a photo of a cake" \\
      --target "a photo of a chocolate cake" --refine --image cake.png --inversion null-text
"""

INSPECT_HELP = """\
Describe a weights file: a LoRA (format, base family, ranks, alphas, target modules, kohya/modelspec
metadata), a textual-inversion embedding (token, vectors, family), or any other .safetensors / torch file
(tensor names, shapes, dtypes, metadata). Pickled files are opened with torch.load(weights_only=True) only.

A LoRA's summary ends with a table of its UNet blocks (and text encoders): the update norm ||dW||_F of each
block's modules together, dW = (alpha / rank) * up @ down, its A1111 LoRA Block Weight id, and its share of the
summed squared norms, which says where the LoRA changes the model (B-LoRA, SDXL: up_blocks.0.attentions.0 is
content, up_blocks.0.attentions.1 style). --plot draws the same numbers as a bar chart.

examples:
  customize inspect pytorch_lora_weights.safetensors
  customize inspect output/dog-lora/                 (a folder with pytorch_lora_weights.safetensors)
  customize inspect learned_embeds.safetensors --json
  customize inspect my_lora.safetensors --plot my_lora_blocks.png      (the per-block norms as a bar chart)
"""

CONVERT_HELP = """\
Convert a LoRA file between the diffusers, PEFT and kohya (A1111 / ComfyUI) formats. Every layer's update
dW = (alpha / rank) * up @ down is kept exactly: kohya gets one `.alpha` per module, diffusers / PEFT get
the alphas in the adapter metadata that diffusers' load_lora_weights reads.

OUT is a .safetensors path or a folder (diffusers / PEFT: pytorch_lora_weights.safetensors in it; kohya:
the input's name).

examples:
  customize convert out/dog-lora/pytorch_lora_weights.safetensors dog_kohya.safetensors --to kohya
  customize convert some_civitai_lora.safetensors out/diffusers-lora/ --to diffusers
  customize convert lora.safetensors lora_kohya.safetensors --to kohya --model ./my-sdxl-model
"""

MERGE_HELP = """\
Merge LoRA files without training (docs/methods.md, 'Merging LoRAs', has the math) into one LoRA file.
Each input is FILE[:WEIGHT]; the weight multiplies that LoRA's update dW = (alpha / rank) * up @ down
(default 1; --method linear: 1/n). LoRAs adapting different modules merge over the union; LoRAs for different
base families are refused.

  concat  the exact weighted sum, ranks add (the file is as if every LoRA were loaded at its weight)
  linear  concat with default weights 1/n (the average)
  svd     the weighted sum re-ranked by SVD to --rank R, or to the least rank keeping --energy E of it
          (default: the largest source rank of each module); prints the energy kept
  ties    TIES: keep each update's top --density fraction by magnitude, elect a sign per entry, average the
          agreeing entries; then SVD as svd
  dare    DARE: drop each entry with probability --drop (rescaling the rest by 1/(1-drop)), seeded by --seed;
          then SVD as svd

--blocks SPEC weights UNet blocks: a preset (ALL, NONE, BASE, UNET, INS, MIDD, OUTS, BLORA_CONTENT, BLORA_STYLE,
BLORA), an A1111 LoRA Block Weight list (17 or 26 numbers for SD 1.x / 2.x, 12 or 20 for SDXL) or BLOCK=WEIGHT
pairs (BLOCK: BASE, IN04, MID, OUT03, unet, text_encoder, or a diffusers path such as down_blocks.1 or
up_blocks.0.attentions.1; '*' sets the rest). Once: for every LoRA; repeated: one per LoRA, in order.

examples:
  customize merge dog.safetensors style.safetensors -o both.safetensors                  (exact sum, ranks add)
  customize merge a.safetensors:0.5 b.safetensors:0.5 --method svd --rank 32 -o ab.safetensors
  customize merge a.safetensors b.safetensors --method ties --density 0.3 --energy 0.95 -o ab.safetensors
  customize merge a.safetensors b.safetensors --method dare --drop 0.7 --seed 1 --format kohya -o ab.safetensors
  customize merge content.safetensors style.safetensors --blocks BLORA_CONTENT --blocks BLORA_STYLE \\
      -o b-lora.safetensors                                                  (B-LoRA, SDXL)
"""

DEMO_HELP = """\
The README's main job, on a CPU in minutes: `customize demo toy` (a LoRA learns a new subject on the tiny
toy-world model, then draws and scores it) or `customize demo digits` (the from-scratch DDPM core trained on
scikit-learn's digits, scored by a digit classifier). With no name: toy when its model is present, else digits.
"""

ENV_HELP = """\
Print what this install is made of, as Markdown to paste into a bug report: Python, torch (CUDA / cuDNN,
every GPU's name and memory), diffusers, transformers, peft, accelerate, datasets, xformers, bitsandbytes, ...
and a verdict: every combination of versions known to break, with the command that fixes it.

examples:
  customize env
  customize env --check        (exit status 1 when a known-bad combination is installed)
"""

BENCH_HELP = """\
Benchmarks that print ratios against a reference measured in the same run.
Arguments after `bench` go to the benchmark runner.
"""


# ---------------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------------


def _split_spec(spec: str, parse_value, what: str) -> tuple[str, object]:
    """FILE[:VALUE] -> (FILE, VALUE or None). A path that exists as given wins over a split, so a file whose
    name holds ':' still works."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, _, value = spec.rpartition(":")
    try:
        return path, parse_value(value)
    except ValueError:
        raise ValueError(f"{what} {spec!r}: {value!r} after ':' is not valid; write FILE or FILE:{what.split()[-1].upper()}") from None


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def parse_lora_spec(spec: str) -> tuple[str, float]:
    path, weight = _split_spec(spec, _finite_float, "--lora weight")
    return path, 1.0 if weight is None else weight


def parse_embedding_spec(spec: str) -> tuple[str, str | None]:
    return _split_spec(spec, str, "--embedding token")


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path}: no such file")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts += [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE (one prompt a line)")
    return prompts


def _image_size(pipe, width: int | None, height: int | None) -> tuple[int, int]:
    """Native size by default; else a multiple of both the VAE's downsampling and diffusers' pixel rule."""
    from customize.models import model_info

    info = model_info(pipe)
    multiple = math.lcm(info.vae_scale_factor, DIFFUSERS_PIXEL_MULTIPLE)
    width = info.resolution if width is None else width
    height = info.resolution if height is None else height
    for name, value in (("--width", width), ("--height", height)):
        if value <= 0 or value % multiple:
            lower = max(multiple, value // multiple * multiple)
            raise ValueError(
                f"{name} {value}: must be a positive multiple of {multiple} for this model (VAE downsamples by "
                f"{info.vae_scale_factor}); try {lower} or {lower + multiple}"
            )
    return width, height


def generate_device(spec: str):
    """--device as a torch.device this machine has, or a ValueError that says which ones it has."""
    import torch

    from customize.utils import default_device

    best = default_device().type
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {spec!r} is not a device name: use cuda, cuda:1, mps or cpu (this machine's best "
                         f"is {best})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {spec}: {why}; use --device {best}, or leave --device out for the best "
                             "available")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {spec}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"--device {spec}: MPS (Apple GPU) is not available here; use --device {best}, or "
                             "leave --device out for the best available")
    elif device.type != "cpu":
        raise ValueError(f"--device {spec}: generate runs on cuda, mps or cpu (this machine's best is {best})")
    return device


def _png_info(prompt: str, seed: int, args):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("negative_prompt", args.negative_prompt or "")
    info.add_text("parameters", json.dumps({"model": args.model, "seed": seed, "steps": args.steps, "guidance": args.guidance}))
    return info


def _per_controlnet(values, n: int, flag: str, default):
    """A repeatable ControlNet option as one value per ControlNet: none (the default for each), one (for each)
    or exactly n (in order)."""
    values = list(values or [])
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{flag} is given {len(values)} times for {n} --controlnet; give it once (for every "
                         "ControlNet) or once per --controlnet, in the same order")
    return values


def control_settings(args) -> dict | None:
    """The ControlNet options checked before any model loads: {"paths", "images", "preprocess", "scales",
    "start", "end"} with one entry per ControlNet, or None without --controlnet."""
    from customize.control import PREPROCESSORS

    nets = list(args.controlnet or [])
    extra = [f for f, v in (("--control-image", args.control_image), ("--preprocess", args.preprocess),
                            ("--conditioning-scale", args.conditioning_scale), ("--control-start", args.control_start),
                            ("--control-end", args.control_end), ("--guess-mode", args.guess_mode)) if v]
    if not nets:
        if extra:
            raise ValueError(f"{extra[0]} needs --controlnet PATH")
        return None
    images = list(args.control_image or [])
    if len(images) != len(nets):
        raise ValueError(f"{len(nets)} --controlnet need {len(nets)} --control-image (one each, in order), got "
                         f"{len(images)}")
    for path in images:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--control-image {path}: no such file")
    pre = _per_controlnet(args.preprocess, len(nets), "--preprocess", "none")
    for name in pre:
        if name not in PREPROCESSORS:
            raise ValueError(f"--preprocess {name}: choose one of {', '.join(PREPROCESSORS)}")
    scales = _per_controlnet(args.conditioning_scale, len(nets), "--conditioning-scale", 1.0)
    start = _per_controlnet(args.control_start, len(nets), "--control-start", 0.0)
    end = _per_controlnet(args.control_end, len(nets), "--control-end", 1.0)
    for s_, e_ in zip(start, end):
        if not 0.0 <= s_ < e_ <= 1.0:
            raise ValueError(f"--control-start {s_} / --control-end {e_}: need 0 <= start < end <= 1")
    if not all(math.isfinite(x) for x in scales):
        raise ValueError("--conditioning-scale must be a finite number")
    return {"paths": nets, "images": images, "preprocess": pre, "scales": scales, "start": start, "end": end}


def controlnet_kwargs(pipe, control: dict, width: int, height: int, guess_mode: bool = False):
    """(the ControlNet pipeline built from `pipe`'s components, the pipeline keywords of the control images and
    scales) for `customize.inference.generate`; each image loaded, preprocessed and resized to width x height."""
    from customize.control import controlnet_pipeline, load_controlnet, preprocess
    from customize.data.images import open_paired_image

    nets = [load_controlnet(p, pipe) for p in control["paths"]]
    images = [preprocess(open_paired_image(p, "--control-image"), name).resize((width, height))
              for p, name in zip(control["images"], control["preprocess"])]
    one = len(nets) == 1
    kwargs = {
        "image": images[0] if one else images,
        "controlnet_conditioning_scale": control["scales"][0] if one else control["scales"],
        "control_guidance_start": control["start"][0] if one else control["start"],
        "control_guidance_end": control["end"][0] if one else control["end"],
        "guess_mode": guess_mode,
    }
    return controlnet_pipeline(pipe, nets), kwargs, images


def cmd_generate(args) -> int:
    if args.device:
        generate_device(args.device)  # before the seconds of importing diffusers and loading the model
    from diffusers.utils import logging as diffusers_logging
    from tqdm.auto import tqdm

    from customize.data.images import save_image_atomic
    from customize.formats import load_embedding_into, load_lora_files
    from customize.inference import generate
    from customize.models import load_pipeline
    from customize.training.tracking import image_grid
    from customize.utils import atomic_path, default_device

    prompts = _read_prompts(args)
    loras = [parse_lora_spec(s) for s in args.lora or []]
    embeddings = [parse_embedding_spec(s) for s in args.embedding or []]
    for path, _ in loras + embeddings:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file")
    if args.num_images < 1 or args.steps < 1:
        raise ValueError("--num-images and --steps must be at least 1")
    for name, value in (("--width", args.width), ("--height", args.height)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} {value}: must be a positive multiple of {DIFFUSERS_PIXEL_MULTIPLE} pixels "
                             "(leave it out for the model's native size)")
    if not math.isfinite(args.guidance):
        raise ValueError(f"--guidance {args.guidance}: must be a finite number (e.g. 7.5; 1 turns guidance off)")
    control = control_settings(args)  # before the model loads

    # diffusers warns, for instance, that a UNet-only LoRA has no text-encoder keys: true, and nothing to act on
    diffusers_logging.set_verbosity_error()
    device = generate_device(args.device) if args.device else default_device()
    pipe = load_pipeline(args.model, dtype=args.dtype, scheduler=args.scheduler)
    width, height = _image_size(pipe, args.width, args.height)
    for path, token in embeddings:
        added = load_embedding_into(pipe, path, token)
        print(f"embedding {path}: tokens {', '.join(added)}")
    adapters = load_lora_files(pipe, loras, fuse=args.fuse)
    for (path, weight), name in zip(loras, adapters):
        print(f"lora {path}: {'fused' if args.fuse else 'adapter ' + name}, weight {weight:g}")
    control_kwargs = {}
    if control is not None:
        pipe, control_kwargs, control_images = controlnet_kwargs(pipe, control, width, height, args.guess_mode)
        for k, path in enumerate(control["paths"]):
            print(f"controlnet {path}: image {control['images'][k]} ({control['preprocess'][k]}), scale "
                  f"{control['scales'][k]:g}, steps {control['start'][k]:g}-{control['end'][k]:g}")
        for k, img in enumerate(control_images):
            save_image_atomic(img, Path(args.out) / f"control-{k}.png")
    pipe.to(device)

    out = Path(args.out)
    bar = tqdm(total=len(prompts) * args.steps, desc="denoising", unit="step", disable=args.no_progress)

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        bar.update(1)
        return callback_kwargs

    # image j of every prompt uses seed + j, so a prompt's images can be reproduced one at a time; a prompt's
    # images are one batch, written before the next prompt's are drawn
    seeds = [args.seed + j for j in range(args.num_images)]
    written, grid = [], []
    for p, prompt in enumerate(prompts):
        images = generate(
            pipe, [prompt] * args.num_images, seeds, negative_prompt=args.negative_prompt,
            guidance_scale=args.guidance, num_inference_steps=args.steps, height=height, width=width,
            batch_size=args.num_images, callback_on_step_end=on_step_end, **control_kwargs,
        )
        for j, (img, seed) in enumerate(zip(images, seeds)):
            path = out / f"{p:03d}-{j:02d}-seed{seed}.png"
            written.append(save_image_atomic(img, path, pnginfo=_png_info(prompt, seed, args)))
        grid += images
    bar.close()
    grid_path = save_image_atomic(image_grid(grid, cols=args.num_images), out / "grid.png")
    record = {
        "model": args.model, "prompts": prompts, "negative_prompt": args.negative_prompt, "seed": args.seed,
        "steps": args.steps, "guidance": args.guidance, "scheduler": type(pipe.scheduler).__name__,
        "width": width, "height": height, "num_images": args.num_images,
        "loras": [{"file": p, "weight": w} for p, w in loras], "fused": bool(args.fuse and loras),
        "embeddings": [{"file": p, "token": t} for p, t in embeddings],
        "controlnets": [] if control is None else [
            {"path": p, "control_image": i, "preprocess": pre, "conditioning_scale": s, "start": a, "end": b}
            for p, i, pre, s, a, b in zip(*(control[k] for k in ("paths", "images", "preprocess", "scales", "start",
                                                                 "end")))],
        "guess_mode": bool(args.guess_mode),
        "images": [x.name for x in written],
    }
    with atomic_path(out / "generation.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(f"wrote {len(written)} images and {grid_path}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# edit
# ---------------------------------------------------------------------------------------------------------------

INVERSIONS = ("null-text", "negative-prompt", "direct", "ddim")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1]")
    return value


def parse_reweight(spec: str) -> tuple[str, float]:
    """WORD=C -> (WORD, C); C a finite number >= 0."""
    word, sep, value = spec.rpartition("=")
    try:
        weight = _finite_float(value) if sep and word.strip() else None
    except ValueError:
        weight = None
    if weight is None or weight < 0:
        raise ValueError(f"--reweight {spec!r}: write WORD=WEIGHT with a number >= 0, e.g. --reweight red=2")
    return word.strip(), weight


def _edit_outputs(out: Path, n_targets: int) -> list[Path]:
    return [out / "source.png", *(out / f"edited-{i}.png" for i in range(n_targets)), out / "attention.png",
            out / "grid.png", out / "edit.json"]


def _check_edit_words(args, weights: dict[str, float]) -> None:
    """What can be checked on the words before the model loads: Replace's equal word counts, the blend and
    reweight words being in the prompts (the tokenizer's checks follow when the controller is prepared)."""
    prompts = [args.prompt, *args.target]
    if not args.refine:
        for target in args.target:
            if len(target.split()) != len(args.prompt.split()):
                raise ValueError(f"--replace swaps words one for one, but the prompt has {len(args.prompt.split())} "
                                 f"words and the target {target!r} has {len(target.split())}: use --refine for added "
                                 "or removed words")

    def contains(prompt: str, word: str) -> bool:
        words, key = prompt.split(), word.split()
        return any(words[i:i + len(key)] == key for i in range(len(words) - len(key) + 1))

    for word in args.blend or []:
        if not any(contains(p, word) for p in prompts):
            raise ValueError(f"--blend {word!r}: the word is in neither the prompt nor a target ({prompts})")
    for word in weights:
        if not any(contains(t, word) for t in args.target):
            raise ValueError(f"--reweight {word!r}: the word is in no target prompt ({args.target})")


def _instruct_edit(args) -> int:
    """`customize edit --instruction`: InstructPix2Pix on --image (customize.inference.instruct_edit_files)."""
    from customize.inference import instruct_edit_files

    if args.image is None:
        raise ValueError("--instruction edits an image: give --image IN.png")
    if not Path(args.image).is_file():
        raise FileNotFoundError(f"--image {args.image}: no such file")
    clash = [flag for flag, value in (("--prompt", args.prompt), ("--target", args.target),
                                      ("--inversion", args.inversion)) if value]
    if clash:
        raise ValueError(f"--instruction (InstructPix2Pix) takes no {', '.join(clash)}: those are Prompt-to-Prompt's")
    for flag, value in (("--image-guidance", args.image_guidance), ("--guidance", args.guidance)):
        if not math.isfinite(value):
            raise ValueError(f"{flag} {value}: must be a finite number")
    if bool(args.grid_image_guidance) != bool(args.grid_guidance):
        raise ValueError("--grid-image-guidance and --grid-guidance go together (the grid's two axes)")
    out = Path(args.out)
    names = ["input.png", "edit.json", f"edit-seed{args.seed}.png"]
    existing = [n for n in names if (out / n).exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}: pass --overwrite to replace them, or give "
                              "another --out folder")
    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(args.dtype)
    import torch

    written = instruct_edit_files(args.model, args.image, args.instruction, str(out), seeds=[args.seed],
                                  image_guidance_scale=args.image_guidance, guidance_scale=args.guidance,
                                  num_inference_steps=args.steps, grid_image_guidance=args.grid_image_guidance,
                                  grid_guidance=args.grid_guidance, device=args.device,
                                  dtype=getattr(torch, dtype) if dtype else None)
    for path in written:
        print(path)
    return 0


def cmd_edit(args) -> int:
    if args.device:
        generate_device(args.device)
    if args.instruction is not None:
        return _instruct_edit(args)
    if not args.prompt:
        raise ValueError("no source prompt: give --prompt TEXT (what the image shows), or --instruction for "
                         "InstructPix2Pix")
    if not args.target:
        raise ValueError("no target: give --target TEXT (repeatable), the prompt as it should read after the edit")
    if args.steps < 1:
        raise ValueError("--steps must be at least 1")
    if not math.isfinite(args.guidance):
        raise ValueError(f"--guidance {args.guidance}: must be a finite number (e.g. 7.5; 1 turns guidance off)")
    if args.blend_threshold is not None and (not math.isfinite(args.blend_threshold) or args.blend_threshold < 0):
        raise ValueError(f"--blend-threshold {args.blend_threshold}: must be a number >= 0 (a fraction of the peak)")
    if args.blend_dilation is not None and args.blend_dilation < 0:
        raise ValueError(f"--blend-dilation {args.blend_dilation}: must be a whole number of latent pixels >= 0")
    if (args.image is None) != (args.inversion is None):
        raise ValueError("--image and --inversion go together: a real image is edited through an inversion "
                         f"({', '.join(INVERSIONS)})")
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"--image {args.image}: no such file")
    weights = dict(parse_reweight(s) for s in args.reweight or [])
    _check_edit_words(args, weights)
    out = Path(args.out)
    outputs = _edit_outputs(out, len(args.target))
    existing = [p.name for p in outputs if p.exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}: pass --overwrite to replace them, or give "
                              "another --out folder")
    invert = None
    if args.image is not None:
        from customize.methods.inversion import invert

    from diffusers.utils import logging as diffusers_logging
    from PIL import Image
    from tqdm.auto import tqdm

    from customize.attention import AttentionStore, LocalBlend, Observed, Refine, Replace, Reweight, attention_heatmaps
    from customize.data.images import save_image_atomic
    from customize.inference import edit
    from customize.models import load_pipeline
    from customize.training.tracking import image_grid
    from customize.utils import atomic_path, default_device

    diffusers_logging.set_verbosity_error()
    device = generate_device(args.device) if args.device else default_device()
    pipe = load_pipeline(args.model, dtype=args.dtype, scheduler=args.scheduler)
    width, height = _image_size(pipe, args.width, args.height)
    pipe.to(device)

    controller = (Refine if args.refine else Replace)(cross_replace_steps=args.cross_steps,
                                                       self_replace_steps=args.self_steps)
    if weights:
        controller = Reweight(weights, base=controller)
    if args.blend:
        controller = LocalBlend(args.blend, base=controller, threshold=args.blend_threshold,
                                dilation=args.blend_dilation, invert=args.blend_invert)
    blend_settings = ({"blend_threshold": controller.threshold, "blend_dilation": controller.dilation}
                      if args.blend else {"blend_threshold": None, "blend_dilation": None})
    store = AttentionStore()
    bar = tqdm(total=args.steps, desc="editing", unit="step", disable=args.no_progress)

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        bar.update(1)
        return callback_kwargs

    extra = {}
    if invert is not None:
        with Image.open(args.image) as im:
            photo = im.copy()
        extra["inversion"] = invert(pipe, photo, args.prompt, method=args.inversion, num_inference_steps=args.steps,
                                    guidance_scale=args.guidance, height=height, width=width)
    images = edit(pipe, args.prompt, args.target, args.seed, Observed(controller, store),
                  num_inference_steps=args.steps, guidance_scale=args.guidance, height=height, width=width,
                  negative_prompt=args.negative_prompt, callback_on_step_end=on_step_end, **extra)
    bar.close()
    source, edited = images[0], images[1:]
    written = [save_image_atomic(source, outputs[0], pnginfo=_png_info(args.prompt, args.seed, args))]
    for i, (img, target) in enumerate(zip(edited, args.target)):
        written.append(save_image_atomic(img, outputs[1 + i], pnginfo=_png_info(target, args.seed, args)))
    heat = attention_heatmaps(store, pipe.tokenizer, args.prompt, source, tile=max(128, source.width))
    written.append(save_image_atomic(heat, outputs[-3]))
    written.append(save_image_atomic(image_grid(images, cols=len(images)), outputs[-2]))
    record = {
        "model": args.model, "prompt": args.prompt, "targets": args.target, "seed": args.seed, "steps": args.steps,
        "guidance": args.guidance, "negative_prompt": args.negative_prompt, "width": width, "height": height,
        "scheduler": type(pipe.scheduler).__name__, "controller": "refine" if args.refine else "replace",
        "cross_steps": args.cross_steps, "self_steps": args.self_steps, "reweight": weights,
        "blend": args.blend or [], **blend_settings, "blend_invert": args.blend_invert,
        "image": args.image, "inversion": args.inversion, "images": [p.name for p in written],
    }
    with atomic_path(outputs[-1]) as tmp:
        tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(f"wrote {', '.join(p.name for p in written)} and edit.json into {out}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------------------------


def _tensor_listing(path: Path) -> tuple[dict[str, tuple[list[int], str]], dict[str, str]]:
    """Names -> (shape, dtype) and metadata; a .safetensors file is read from its header only."""
    import torch

    from customize.formats import read_tensor_file
    from customize.formats.common import read_safetensors_header

    if path.suffix == ".safetensors":
        return read_safetensors_header(path)
    obj, _ = read_tensor_file(path, finite=False)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            flat[prefix] = (list(value.shape), str(value.dtype).removeprefix("torch."))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", obj)
    return flat, {}


def inspect_file(path: str | os.PathLike) -> dict:
    """What `customize inspect` prints, as a dict: {"kind": "lora" | "embedding" | "tensors", ...}, with
    "nonfinite": {tensor: {"nan": count, "inf": count}} for the tensors holding NaN or infinite values (such a
    file is still described, and every reader that would use it refuses it)."""
    from customize.formats.common import describe_nonfinite, nonfinite_counts
    from customize.formats.embeddings import EMBEDDING_WEIGHT_NAME, EMBEDDING_WEIGHT_NAME_2, EMBEDDING_WEIGHT_NAME_BIN
    from customize.formats.lora_state import LORA_WEIGHT_NAME

    result = _describe_file(path)
    path = Path(path)
    files = [path / n for n in (EMBEDDING_WEIGHT_NAME, EMBEDDING_WEIGHT_NAME_BIN, EMBEDDING_WEIGHT_NAME_2,
                                LORA_WEIGHT_NAME)] if path.is_dir() else [path]
    from customize.formats import read_tensor_file

    bad = {}
    for file in files:
        if file.is_file():
            bad.update(nonfinite_counts(read_tensor_file(file, finite=False)[0]))
    result["nonfinite"] = {name: {"nan": nan, "inf": inf} for name, (nan, inf) in bad.items()}
    if bad:
        result["summary"] += (f"\nnon-finite:  {len(bad)} tensor(s) hold NaN or infinite values, so the file cannot "
                              f"be used: {describe_nonfinite(bad)}")
    return result


def _describe_file(path: str | os.PathLike) -> dict:
    from dataclasses import asdict

    from customize.formats import FormatError, inspect_lora, read_embedding
    from customize.formats.embeddings import EMBEDDING_WEIGHT_NAME, EMBEDDING_WEIGHT_NAME_BIN
    from customize.formats.lora_state import LORA_WEIGHT_NAME

    path = Path(path)
    if path.is_dir():
        if (path / EMBEDDING_WEIGHT_NAME).is_file() or (path / EMBEDDING_WEIGHT_NAME_BIN).is_file():
            emb = read_embedding(path, finite=False)
            return {"kind": "embedding", "path": str(path), "summary": emb.summary(str(path))}
        if not (path / LORA_WEIGHT_NAME).is_file():
            found = sorted(path.glob("*.safetensors"))
            if len(found) == 1:  # a kohya LoRA from training (--lora_format kohya) is named after its folder
                return _describe_file(found[0])
            raise FileNotFoundError(f"{path}: no {LORA_WEIGHT_NAME} or {EMBEDDING_WEIGHT_NAME} in this folder")
        info = inspect_lora(path, blocks=True)
        return {"kind": "lora", **asdict(info), "summary": info.summary()}
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    tensors, metadata = _tensor_listing(path)
    not_lora = ""
    try:
        from customize.formats import detect_lora_format

        detect_lora_format(tensors)
        info = inspect_lora(path, blocks=True)
        return {"kind": "lora", **asdict(info), "summary": info.summary()}
    except FormatError as e:
        not_lora = str(e)
    try:
        emb = read_embedding(path, finite=False)
        return {"kind": "embedding", "path": str(path), "token": emb.token, "format": emb.format,
                "family": emb.family, "vectors": {k: list(v.shape) for k, v in emb.vectors.items()},
                "summary": emb.summary(str(path))}
    except FormatError:
        pass
    lines = [f"file:        {path}", f"kind:        {len(tensors)} tensors (not a LoRA: {not_lora})"]
    lines += [f"  {name}: {shape} {dtype}" for name, (shape, dtype) in sorted(tensors.items())]
    lines += [f"metadata:    {k} = {v if len(v) < 80 else v[:77] + '...'}" for k, v in sorted(metadata.items())]
    return {"kind": "tensors", "path": str(path), "tensors": {k: {"shape": s, "dtype": d} for k, (s, d) in tensors.items()},
            "metadata": metadata, "summary": "\n".join(lines)}


PLOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _plot_output(spec: str, overwrite: bool) -> Path:
    """--plot OUT, checked before anything is read: an image suffix (so never the weights file being inspected),
    and no existing file unless --overwrite."""
    out = Path(spec)
    if out.suffix.lower() not in PLOT_SUFFIXES:
        raise ValueError(f"--plot {spec}: give an image path ending in {' / '.join(PLOT_SUFFIXES)}, e.g. blocks.png")
    if out.is_dir():
        raise IsADirectoryError(f"--plot {spec} is a folder; give an image path such as {out / 'blocks.png'}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: pass --overwrite to replace it, or give another --plot path")
    return out


def block_chart(result: dict):
    """The bar chart of a LoRA's per-block update norms (`inspect_file`'s "blocks"), labels with their LBW ids."""
    from customize.plots import bar_chart

    rows = result["blocks"]
    labels = [f"{r['block']} ({r['lbw']})" if r["lbw"] else r["block"] for r in rows]
    return bar_chart(labels, [r["norm"] for r in rows], title=f"{Path(result['path']).name}: LoRA update per block",
                     value_label="||dW||_F of the block's modules, dW = (alpha / rank) * up @ down")


def cmd_inspect(args) -> int:
    out = _plot_output(args.plot, args.overwrite) if args.plot else None
    result = inspect_file(args.file)
    if out is not None:
        from customize.formats import FormatError
        from customize.plots import save_chart

        if result["kind"] != "lora":
            what = "an embedding" if result["kind"] == "embedding" else "a plain tensor file"
            raise FormatError(f"--plot: {result['path']} is {what}, not a LoRA; only a LoRA has per-block update "
                              "norms to plot")
        result["plot"] = str(save_chart(block_chart(result), out))
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "summary"}, indent=2, default=str))
    else:
        print(result["summary"])
        if out is not None:
            print(f"wrote {out}: {len(result['blocks'])} blocks")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------------------------


def _convert_output(src: Path, dst: Path, to: str) -> Path:
    """A folder OUT gets diffusers' file name, or for kohya the input's name (A1111 shows it as the LoRA name)."""
    from customize.formats.lora_state import LORA_WEIGHT_NAME

    if dst.suffix:
        return dst
    if to != "kohya":
        return dst / LORA_WEIGHT_NAME
    stem = src.name if src.is_dir() else src.stem
    if stem == Path(LORA_WEIGHT_NAME).stem:
        stem = src.resolve().parent.name
    return dst / f"{stem}.safetensors"


def cmd_convert(args) -> int:
    from customize.formats import check_lora_compatible, convert_lora, describe_family, inspect_lora
    from customize.formats.kohya_names import UNetLayout

    from customize.formats import FormatError
    from customize.formats.lora_read import _weights_file

    out = _convert_output(Path(args.input), Path(args.output), args.to)
    src = _weights_file(args.input)
    if out.resolve() == src.resolve() or (out.exists() and os.path.samefile(out, src)):
        raise FormatError(f"{out} is the input file: a conversion never writes over what it reads; give another "
                          "output path")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists: pass --overwrite to replace it, or give another output path")
    family, layout = args.family, None
    if args.model:
        from customize.models import detect_family, load_pipeline

        pipe = load_pipeline(args.model)
        check_lora_compatible(pipe, args.input)
        layout = UNetLayout.from_config(pipe.unet.config)
        family = family or detect_family(pipe)
    out = convert_lora(args.input, out, args.to, family=family, layout=layout)
    info = inspect_lora(out, layout)
    print(f"wrote {out}: {args.to} format, {info.num_layers} layers, {describe_family(info.family or family)}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------------------------


def cmd_merge(args) -> int:
    from customize.formats import FormatError, describe_family, inspect_lora, merge_loras, save_lora
    from customize.formats.lora_read import _weights_file
    from customize.formats.lora_state import LORA_WEIGHT_NAME
    from customize.formats.lora_write import _output_file

    specs = _split_weights(args.loras)
    sources = [_weights_file(path) for path, _ in specs]
    out = _output_file(Path(args.output), LORA_WEIGHT_NAME)
    for src in sources:
        if out.resolve() == src.resolve() or (out.exists() and os.path.samefile(out, src)):
            raise FormatError(f"{out} is an input file: a merge never writes over what it reads; give another "
                              "output path")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists: pass --overwrite to replace it, or give another output path")
    if args.rank is not None and args.rank <= 0:
        raise ValueError(f"--rank {args.rank}: must be a positive whole number")
    blocks = args.blocks
    if blocks is not None and len(blocks) == 1:
        blocks = blocks[0]
    # no weight written anywhere: the method's default weights (linear: 1/n); else 1 where none is written
    weights = None if all(w is None for _, w in specs) else [1.0 if w is None else w for _, w in specs]
    merged, report = merge_loras(
        [str(s) for s in sources], weights=weights, method=args.method, rank=args.rank, energy=args.energy,
        density=args.density, drop=args.drop, seed=args.seed, blocks=blocks, names=[p for p, _ in specs],
    )
    family = args.family or merged.metadata.get("customize.base_family")
    if args.format == "kohya" and family is None and "unet" in merged.components():
        raise FormatError("cannot tell the base family from the shapes; kohya names depend on it: pass --family "
                          "(sd1 / sd2 / sdxl)")
    meta = {"customize.merge": merged.metadata["customize.merge"]}
    out = save_lora(merged, out, args.format, family=family, metadata=meta)
    info = inspect_lora(out)
    print(report.summary())
    print(f"wrote {out}: {args.format} format, {info.num_layers} layers, {describe_family(info.family or family)}")
    return 0


def _split_weights(specs: list[str]) -> list[tuple[str, float | None]]:
    """FILE[:WEIGHT] -> (FILE, WEIGHT or None): None where no weight was written (method defaults apply)."""
    return [_split_spec(s, _finite_float, "--lora weight") for s in specs]


# ---------------------------------------------------------------------------------------------------------------
# demo, bench: supplied by other modules, imported only when asked for
# ---------------------------------------------------------------------------------------------------------------


def _run_optional(module: str, what: str, argv: list[str]) -> int:
    import importlib

    try:
        entry = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        print(f"customize: {what} is not available in this install ({module} is missing)", file=sys.stderr)
        return EXIT_ERROR
    return int(entry.main(argv) or 0)


def cmd_env(args) -> int:
    from customize import env

    print(env.report())
    return EXIT_ERROR if args.check and any(p.fatal for p in env.problems()) else 0


def cmd_demo(args) -> int:
    return _run_optional("customize.demo", "the demo", args.args)


def cmd_bench(args) -> int:
    return _run_optional("customize.bench", "the benchmark runner", args.args)


# ---------------------------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="customize", description=MAIN_HELP, formatter_class=fmt)
    parser.add_argument("--traceback", action="store_true", help="show the full Python traceback on errors")
    from customize import __version__

    parser.add_argument("--version", action="version", version=f"customize {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    g = sub.add_parser("generate", help="generate images (with LoRAs and embeddings)", description=GENERATE_HELP, formatter_class=fmt)
    g.add_argument("-m", "--model", required=True, help="hub id, diffusers folder, single .safetensors/.ckpt file, or tiny-sd / tiny-sdxl")
    g.add_argument("-p", "--prompt", action="append", help="a prompt (repeat for several)")
    g.add_argument("--prompts-file", help="a text file with one prompt a line ('#' starts a comment line)")
    g.add_argument("--negative-prompt", default=None, help="what the images should not show")
    g.add_argument("--seed", type=int, default=0, help="image j of each prompt is drawn from seed + j (default 0)")
    g.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    g.add_argument("--scheduler", default=None, help="ddim, ddpm, pndm, euler, euler_a, dpm++, unipc, customize-ddim, "
                   "customize-ddpm (default: the model's own)")
    g.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]", help="a LoRA file and its weight (repeatable)")
    g.add_argument("--fuse", action="store_true", help="fold the LoRAs (at their weights) into the model's weights "
                   "before sampling: each step then costs what the base model's does")
    g.add_argument("--embedding", action="append", metavar="FILE[:TOKEN]", help="a textual-inversion file (repeatable)")
    g.add_argument("--controlnet", action="append", metavar="PATH", help="a ControlNet folder or hub id (repeatable)")
    g.add_argument("--control-image", action="append", metavar="IMG", help="the conditioning image of each ControlNet")
    g.add_argument("--preprocess", action="append", metavar="NAME", help="canny, soft_edge, scribble, segmentation, "
                   "none: turn each control image into a conditioning image (once: all)")
    g.add_argument("--conditioning-scale", action="append", type=float, metavar="S",
                   help="each ControlNet's residual scale (default 1.0; once: all)")
    g.add_argument("--guess-mode", action="store_true", help="ControlNet guess mode (follow the control image without "
                   "relying on the prompt)")
    g.add_argument("--control-start", action="append", type=float, metavar="F",
                   help="fraction of the steps where each ControlNet starts (default 0)")
    g.add_argument("--control-end", action="append", type=float, metavar="F",
                   help="fraction of the steps where each ControlNet stops (default 1)")
    g.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    g.add_argument("--width", type=int, default=None, help="pixels (default: the model's native size)")
    g.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    g.add_argument("-o", "--out", default="outputs/generate", help="output folder (default outputs/generate)")
    g.add_argument("--device", default=None, help="cuda, cuda:1, mps, cpu (default: the best available)")
    g.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="weights dtype (default: as stored)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    ed = sub.add_parser("edit", help="edit an image by editing its prompt (Prompt-to-Prompt)", description=EDIT_HELP,
                        formatter_class=fmt)
    ed.add_argument("-m", "--model", required=True, help="hub id, diffusers folder, single .safetensors/.ckpt file, or tiny-sd / tiny-sdxl")
    ed.add_argument("-p", "--prompt", default=None, help="the source prompt (with --image: what the image shows); "
                    "required unless --instruction")
    ed.add_argument("-t", "--target", action="append", help="the edited prompt (repeat for several edits)")
    ed.add_argument("--negative-prompt", default=None, help="what the images should not show")
    ed.add_argument("--seed", type=int, default=0, help="the seed every row is drawn from (default 0)")
    ed.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    ed.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    ed.add_argument("--scheduler", default=None, help="as for generate (default: the model's own)")
    how = ed.add_mutually_exclusive_group()
    how.add_argument("--replace", action="store_true", help="word swap, same number of words (the default)")
    how.add_argument("--refine", action="store_true", help="words added or removed")
    ed.add_argument("--cross-steps", type=_fraction, default=0.8, metavar="F", help="fraction of the steps with the "
                    "source's cross-attention (default 0.8)")
    ed.add_argument("--self-steps", type=_fraction, default=0.4, metavar="F", help="fraction of the steps with the "
                    "source's self-attention (default 0.4)")
    ed.add_argument("--reweight", action="append", metavar="WORD=C", help="scale a target word's attention (repeatable)")
    ed.add_argument("--blend", action="append", metavar="WORD", help="local blend: only these words' pixels change "
                    "(repeatable)")
    ed.add_argument("--blend-threshold", type=float, default=None, help="fraction of a blend word's peak attention "
                    "that belongs to its object (default 0.3; 0.4 with --blend-invert)")
    ed.add_argument("--blend-dilation", type=int, default=None, metavar="N", help="grow the blend words' mask by N "
                    "latent pixels before thresholding (default 1; 0 with --blend-invert)")
    ed.add_argument("--blend-invert", action="store_true", help="keep the blend words' pixels, change the rest")
    ed.add_argument("--image", default=None, help="a real image to edit (with --inversion)")
    ed.add_argument("--inversion", default=None, choices=INVERSIONS, help="how --image is inverted")
    ed.add_argument("--instruction", default=None, help="InstructPix2Pix: the edit as an instruction (with --image "
                    "and an InstructPix2Pix -m)")
    ed.add_argument("--image-guidance", type=float, default=1.5, help="InstructPix2Pix image guidance s_I (default 1.5)")
    ed.add_argument("--grid-image-guidance", type=float, nargs="+", default=None, metavar="S",
                    help="InstructPix2Pix: image-guidance values of the grid")
    ed.add_argument("--grid-guidance", type=float, nargs="+", default=None, metavar="S",
                    help="InstructPix2Pix: text-guidance values of the grid")
    ed.add_argument("--width", type=int, default=None, help="pixels (default: the model's native size)")
    ed.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    ed.add_argument("-o", "--out", default="outputs/edit", help="output folder (default outputs/edit)")
    ed.add_argument("--overwrite", action="store_true", help="replace the files of an earlier edit in --out")
    ed.add_argument("--device", default=None, help="cuda, cuda:1, mps, cpu (default: the best available)")
    ed.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="weights dtype (default: as stored)")
    ed.add_argument("--no-progress", action="store_true", help="no progress bar")
    ed.set_defaults(func=cmd_edit)

    i = sub.add_parser("inspect", help="describe a LoRA, embedding or safetensors file", description=INSPECT_HELP, formatter_class=fmt)
    i.add_argument("file", help="the file (or a folder with pytorch_lora_weights.safetensors / learned_embeds.safetensors)")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.add_argument("--plot", metavar="OUT.png", help="a LoRA: write a bar chart of its update norm per block")
    i.add_argument("--overwrite", action="store_true", help="replace the --plot image when it exists")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("convert", help="convert a LoRA between diffusers, PEFT and kohya", description=CONVERT_HELP, formatter_class=fmt)
    c.add_argument("input", help="a LoRA file in any supported format (or its folder)")
    c.add_argument("output", help="a .safetensors path or a folder")
    c.add_argument("--to", required=True, choices=["kohya", "diffusers", "peft"], help="the output format")
    c.add_argument("--family", choices=["sd1", "sd2", "sdxl"], help="base family when the shapes cannot tell (kohya names depend on it)")
    c.add_argument("--model", help="check the LoRA against this model and take its family and UNet layout")
    c.add_argument("--overwrite", action="store_true", help="replace OUT when it exists (never the input itself)")
    c.set_defaults(func=cmd_convert)

    mg = sub.add_parser("merge", help="merge LoRA files (concat, linear, svd, ties, dare; block weights)",
                        description=MERGE_HELP, formatter_class=fmt)
    mg.add_argument("loras", nargs="+", metavar="FILE[:WEIGHT]", help="LoRA files (any format, or their folders)")
    mg.add_argument("-o", "--output", required=True, help="a .safetensors path or a folder")
    mg.add_argument("--method", default="concat", choices=["concat", "linear", "svd", "ties", "dare"],
                    help="how to merge (default concat: the exact sum)")
    size = mg.add_mutually_exclusive_group()
    size.add_argument("--rank", type=int, default=None, help="svd / ties / dare: the rank written")
    size.add_argument("--energy", type=float, default=None, help="svd / ties / dare: keep this fraction of the "
                      "energy (sum of S^2) per module, e.g. 0.9")
    mg.add_argument("--density", type=float, default=0.5, help="ties: fraction of each update kept (default 0.5)")
    mg.add_argument("--drop", type=float, default=0.5, help="dare: drop probability (default 0.5)")
    mg.add_argument("--seed", type=int, default=0, help="dare: seed of the drop masks (default 0)")
    mg.add_argument("--blocks", action="append", metavar="SPEC", help="per-block weights (once: all LoRAs; "
                    "repeated: one per LoRA)")
    mg.add_argument("--format", default="diffusers", choices=["diffusers", "peft", "kohya"],
                    help="the output format (default diffusers)")
    mg.add_argument("--family", choices=["sd1", "sd2", "sdxl"], help="base family when the shapes cannot tell "
                    "(kohya names depend on it)")
    mg.add_argument("--overwrite", action="store_true", help="replace the output when it exists (never an input)")
    mg.set_defaults(func=cmd_merge)

    e = sub.add_parser("env", help="versions, GPU and known-bad combinations (for a bug report)", description=ENV_HELP, formatter_class=fmt)
    e.add_argument("--check", action="store_true", help="exit 1 when a combination known to break is installed")
    e.set_defaults(func=cmd_env)

    for name, func, text in (("demo", cmd_demo, DEMO_HELP), ("bench", cmd_bench, BENCH_HELP)):
        d = sub.add_parser(name, help=text.splitlines()[0], description=text, formatter_class=fmt, add_help=False)
        d.set_defaults(func=func)
    return parser


# commands whose arguments belong to another module's parser and are passed on untouched
PASSTHROUGH = ("demo", "bench")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    # the first word that is not a flag is the command (the global flags take no values)
    at = next((i for i, word in enumerate(argv) if not word.startswith("-")), len(argv))
    if at < len(argv) and argv[at] in PASSTHROUGH:
        args = parser.parse_args(argv[: at + 1])
        args.args = argv[at + 1 :]
    else:
        args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if args.traceback:
            raise
        print(f"customize {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR


def run_recipe(main, argv: list[str] | None = None) -> int:
    """Run a recipe's `main(argv)` as a command: 0 when it returns; EXIT_ERROR and a one-line "<recipe>: error: ..."
    on standard error for a USER_ERRORS exception, as `customize` itself does (CUSTOMIZE_TRACEBACK=1 re-raises it:
    the full traceback)."""
    try:
        main(argv)
    except USER_ERRORS as e:
        if os.environ.get("CUSTOMIZE_TRACEBACK", "") not in ("", "0"):
            raise
        name = Path(sys.argv[0]).name or "recipe"
        print(f"{name}: error: {e}\n(set CUSTOMIZE_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
