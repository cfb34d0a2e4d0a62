"""Sampling from a diffusers pipeline with one seeding rule: image i comes from its own generator, seeded with
seeds[i], so an image is a function of (model, prompt, seed, settings) only: not of the batch it was drawn in,
nor of the images drawn before it.

Every place that samples through a pipeline goes through `generate`: `customize generate`, the class images of
prior preservation, the methods' validation images and the toy-world scores (`customize.toy.quality.sample`).

Batch invariance: the pipeline draws the initial latents (and a stochastic scheduler its step noise) one batch
row per generator, so image i's noise is the same in any batch. The network's arithmetic is not bitwise the
same across batch shapes (the blocking of a batched matmul or convolution depends on the batch size and the
thread count): an image drawn alone and in a batch of 3 agree to ~1e-6, so an 8-bit pixel moves by at most one
level, and rarely; with the same batch shape the images are bitwise equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def generation_device(pipe) -> torch.device:
    """Where the pipeline draws its noise: its execution device (the offload hooks' device under CPU offload),
    for a pipeline without one its `device`. On MPS the generators live on the CPU, as `customize generate`
    has always drawn them there (diffusers then draws on the CPU and moves the noise), so an image drawn on a
    Mac equals the CPU's up to float rounding."""
    device = getattr(pipe, "_execution_device", None) or pipe.device
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def generate(
    pipe,
    prompts: str | Sequence[str],
    seeds: Sequence[int] | None = None,
    *,
    negative_prompt: str | Sequence[str] | None = None,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    output_type: str = "pil",
    **pipe_kwargs,
) -> list:
    """One image per prompt, image i drawn from `torch.Generator(device).manual_seed(seeds[i])` (the pipeline gets
    a list of generators, one per image of the batch), in batches of `batch_size` prompts.

    prompts         a list of prompts, or one str (one image); repeat a prompt for several images of it.
    seeds           one int per prompt; default range(len(prompts)). Another length is a ValueError.
    negative_prompt one str for every image, or one per prompt.
    guidance_scale, num_inference_steps, height, width
                    passed to the pipeline when given; left None, the pipeline's defaults apply.
    progress        a tqdm bar over the images; the pipeline's own per-step bar is off during the call either
                    way, and its progress-bar config is put back afterwards.
    output_type     the pipeline's: "pil" gives PIL images; "np" / "pt" / "latent" give one array or tensor per
                    image (the batch's rows).
    pipe_kwargs     passed unchanged to every batch's pipeline call (cross_attention_kwargs, callback_on_step_end,
                    prompt_2 for SDXL, ...): per-image values do not belong here, since each call sees one batch.
                    num_images_per_prompt and generator are refused: the prompts and seeds say what to draw.

    Works for SD 1.x/2.x, SDXL and any diffusers pipeline whose call takes `prompt` and `generator`. Runs under
    the pipeline's own no_grad; autocast or attention processors set by the caller stay in force.

    Example:
        from customize.inference import generate
        from customize.models import load_pipeline

        pipe = load_pipeline("stabilityai/stable-diffusion-xl-base-1.0").to("cuda")
        images = generate(pipe, ["a watercolor fox"] * 4 + ["a red bicycle"], seeds=[0, 1, 2, 3, 0],
                          negative_prompt="blurry", guidance_scale=7.0, num_inference_steps=30,
                          height=1024, width=1024, batch_size=4, progress=True)
        images[4].save("bicycle-seed0.png")  # the same picture as generate(pipe, "a red bicycle", [0], ...)
    """
    from tqdm.auto import tqdm

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt (image)")
    if negative_prompt is None or isinstance(negative_prompt, str):
        negatives = None if negative_prompt is None else [negative_prompt] * len(prompts)
    else:
        negatives = list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one str or "
                             "one per prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for name in ("num_images_per_prompt", "generator"):
        if name in pipe_kwargs:
            raise ValueError(f"generate draws one image per prompt from its seed: pass no {name} (repeat a prompt "
                             "for several images, give the seeds in `seeds`)")
    settings = {"guidance_scale": guidance_scale, "num_inference_steps": num_inference_steps,
                "height": height, "width": width}
    call_kwargs = {k: v for k, v in settings.items() if v is not None}
    call_kwargs.update(pipe_kwargs, output_type=output_type)

    device = generation_device(pipe)
    saved = getattr(pipe, "_progress_bar_config", None)  # what set_progress_bar_config stored, if ever called
    pipe.set_progress_bar_config(**{**(saved or {}), "disable": True})
    images: list = []
    try:
        with tqdm(total=len(prompts), desc="generating", unit="image", disable=not progress) as bar:
            for start in range(0, len(prompts), batch_size):
                batch = slice(start, start + batch_size)
                generators = [torch.Generator(device).manual_seed(s) for s in seeds[batch]]
                if negatives is not None:
                    call_kwargs["negative_prompt"] = negatives[batch]
                out = pipe(prompt=prompts[batch], generator=generators, **call_kwargs)
                images.extend(out.images)  # a list of PIL images, or the rows of an array / tensor
                bar.update(len(generators))
    finally:
        if saved is None:  # never configured before: unconfigured again
            vars(pipe).pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = saved
    return images


def edit(
    pipe,
    source_prompt: str,
    target_prompts: str | Sequence[str],
    seed: int,
    controller,
    *,
    num_inference_steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    inversion=None,
    **generate_kwargs,
) -> list:
    """Prompt-to-Prompt (Hertz et al. 2022): the source prompt and the target prompt(s) drawn as one batch from
    the same initial latent, while `controller` (customize.attention: Replace, Refine, Reweight, AttentionStore)
    edits the targets' attention maps towards the source's. Returns [source image, target images...].

    Every row gets its own generator seeded with `seed` (diffusers draws the initial latent row by row from the
    list of generators), so every row starts from the latent `generate(pipe, prompt, [seed])` starts from, and
    the source row is that plain generation (up to float rounding across batch shapes: the explicit attention
    path and the batch of n + 1 rows move an 8-bit pixel by at most one level). SDXL needs nothing more: the
    prompts are batched, so both text encoders, the pooled embeddings and the added time ids follow each row's
    prompt (prompt_2, when given in generate_kwargs, is one str for every row, or one per row).

    The controller is prepared with the pipeline's tokenizer, the prompts and the step count, installed on the
    layers it needs for this image size (`customize.attention.install`), advanced by `callback_on_step_end`
    (a caller's own callback_on_step_end runs after it) and removed afterwards; the UNet keeps its processors.
    generate_kwargs go to `generate` (negative_prompt, guidance_scale, output_type, cross_attention_kwargs, ...).

    A real image: `inversion=` an Inversion of it (customize.methods.inversion: ddim, null-text, negative-prompt,
    direct) made with `source_prompt`; every row starts from its x_T (`seed` is then unused), its step count,
    size and guidance apply, the pipeline samples with its DDIM scheduler, and its per-step unconditional
    embeddings (all rows) or direct inversion's source-row correction are applied in callback_on_step_end, before
    the controller's step. Row 0 is then `reconstruct(pipe, inversion)`.

        from customize.attention import Replace
        source, square = edit(pipe, "a red circle on a blue background", "a red square on a blue background",
                              seed=0, controller=Replace(cross_replace_steps=0.8, self_replace_steps=0.4))
    """
    import contextlib
    import inspect

    from customize.attention import install

    targets = [target_prompts] if isinstance(target_prompts, str) else list(target_prompts)
    if not targets:
        raise ValueError("edit needs at least one target prompt")
    prompts = [source_prompt, *targets]
    for name in ("seeds", "batch_size"):
        if name in generate_kwargs:
            raise ValueError(f"edit draws every row from `seed` in one batch: pass no {name}")
    steps = num_inference_steps
    if steps is None:
        steps = inspect.signature(pipe.__call__).parameters["num_inference_steps"].default
    scale = getattr(pipe, "vae_scale_factor", 8)
    default_side = pipe.unet.config.sample_size * scale
    latent = ((height or default_side) // scale, (width or default_side) // scale)
    user_callback = generate_kwargs.pop("callback_on_step_end", None)
    inverted, inversion_step = contextlib.nullcontext(({}, None)), None
    if inversion is not None:  # a real image: every row from x_T, the inversion's settings and per-step changes
        from customize.methods.inversion import sampling

        inverted = sampling(pipe, inversion, len(prompts), 0, source_prompt, num_inference_steps, height, width,
                            generate_kwargs.pop("guidance_scale", None))
        steps, height, width = inversion.num_inference_steps, inversion.height, inversion.width
        latent = (height // scale, width // scale)

    def on_step_end(p, i, t, kwargs):
        if inversion_step is not None:
            kwargs = inversion_step(p, i, t, kwargs)
        kwargs = controller.step_callback(p, i, t, kwargs)
        return kwargs if user_callback is None else user_callback(p, i, t, kwargs)

    controller.prepare(pipe.tokenizer, prompts, steps)
    controller.reset()
    before = install(pipe.unet, controller, latent)
    try:
        with inverted as (inversion_kwargs, inversion_step):
            return generate(pipe, prompts, [seed] * len(prompts), num_inference_steps=steps, height=height,
                            width=width, batch_size=len(prompts), callback_on_step_end=on_step_end,
                            **{**generate_kwargs, **inversion_kwargs})
    finally:
        pipe.unet.set_attn_processor(before)


# ---------------------------------------------------------------------------------------------------------------
# InstructPix2Pix (Brooks et al. 2023): edit an image by an instruction, with image and text guidance
# ---------------------------------------------------------------------------------------------------------------


def check_edit_image(pipe, image, what: str = "the input image"):
    """The input image of an instruction edit as RGB, refused in one line: not a PIL image, transparent (another
    mode: its alpha would be flattened and change the picture), or with a side that is not a multiple of the
    VAE's downsampling factor (the pipeline would silently crop or resize it). Returns the RGB image."""
    from PIL import Image

    from customize.data.images import paired_image
    from customize.models import vae_scale_factor

    if not isinstance(image, Image.Image):
        raise ValueError(f"{what} must be a PIL image, got {type(image).__name__}")
    image = paired_image(image, what)
    factor = vae_scale_factor(pipe.vae)
    w, h = image.size
    if w % factor or h % factor or min(w, h) < factor:
        fit = (max(factor, w // factor * factor), max(factor, h // factor * factor))
        raise ValueError(f"{what} is {w}x{h}, but its sides must be multiples of the VAE's factor {factor}: "
                         f"resize or crop it, e.g. to {fit[0]}x{fit[1]}")
    return image


def instruct_edit(
    pipe,
    image,
    instruction: str,
    seed: int,
    *,
    image_guidance_scale: float = 1.5,
    guidance_scale: float = 7.5,
    num_inference_steps: int | None = None,
    **generate_kwargs,
):
    """InstructPix2Pix: `image` (PIL) edited by `instruction` through `pipe` (a diffusers
    StableDiffusionInstructPix2PixPipeline or the XL one, e.g. `customize.methods.instruct_pix2pix.
    load_instruct_pipeline(folder)`), drawn from `seed` by `generate`. Each step the pipeline combines three
    predictions (customize.methods.instruct_pix2pix.guided_noise):

        eps = eps(0, 0) + s_I (eps(I, 0) - eps(0, 0)) + s_T (eps(I, T) - eps(I, 0))

    s_I = image_guidance_scale (higher: closer to the input image), s_T = guidance_scale (higher: follows the
    instruction more). With s_T <= 1 (or s_I < 1) diffusers runs the fully conditioned prediction eps(I, T) alone.
    The output has the input's size. generate_kwargs go to `generate` (negative_prompt, output_type, ...).
    Returns one image."""
    from customize.methods.instruct_pix2pix import check_instruct_unet, check_instruction
    from customize.models import is_sdxl

    check_instruct_unet(pipe)
    check_instruction(instruction)
    image = check_edit_image(pipe, image)
    size = {"height": image.size[1], "width": image.size[0]} if is_sdxl(pipe) else {}
    return generate(pipe, [instruction], [seed], image=image, image_guidance_scale=image_guidance_scale,
                    guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, **size,
                    **generate_kwargs)[0]


def instruct_edit_grid(
    pipe,
    image,
    instruction: str,
    seed: int,
    *,
    image_guidance_scales: Sequence[float] = (1.0, 1.5, 2.0),
    guidance_scales: Sequence[float] = (3.0, 7.5, 12.0),
    **edit_kwargs,
):
    """The trade-off users tune: one `instruct_edit` per (s_I, s_T), all from the same seed. Returns (grid,
    edits): the grid has one row per image guidance scale (top: the lowest) and one column per text guidance
    scale (left: the lowest), edits is {(s_I, s_T): image}."""
    from customize.training.tracking import image_grid

    edits = {(si, st): instruct_edit(pipe, image, instruction, seed, image_guidance_scale=si, guidance_scale=st,
                                     **edit_kwargs)
             for si in image_guidance_scales for st in guidance_scales}
    return image_grid(list(edits.values()), cols=len(guidance_scales)), edits


def instruct_edit_files(
    model: str,
    image_path: str,
    instruction: str,
    out_dir: str,
    *,
    seeds: Sequence[int] = (0,),
    image_guidance_scale: float = 1.5,
    guidance_scale: float = 7.5,
    num_inference_steps: int | None = None,
    grid_image_guidance: Sequence[float] | None = None,
    grid_guidance: Sequence[float] | None = None,
    device: str | None = None,
    dtype=None,
) -> list:
    """What `customize edit --instruction ... --image IN [--image-guidance 1.5 --guidance 7.5]` does: load the
    InstructPix2Pix model folder (or hub id), edit the image once per seed and write out_dir/edit-seed<seed>.png
    (atomically), the input as out_dir/input.png and a record edit.json; with grid_image_guidance and
    grid_guidance also out_dir/grid-seed<seed>.png (`instruct_edit_grid`). Returns the paths written."""
    import json
    from pathlib import Path

    from customize.data.images import open_paired_image, save_image_atomic
    from customize.methods.instruct_pix2pix import check_instruction, load_instruct_pipeline
    from customize.utils import atomic_path

    check_instruction(instruction, "--instruction")
    image = open_paired_image(image_path, "--image")
    opts = {"torch_dtype": dtype} if dtype is not None else {}
    pipe = load_instruct_pipeline(model, **opts)
    if device is not None:
        pipe.to(device)
    image = check_edit_image(pipe, image, f"--image {image_path}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [save_image_atomic(image, out / "input.png")]
    for seed in seeds:
        edited = instruct_edit(pipe, image, instruction, seed, image_guidance_scale=image_guidance_scale,
                               guidance_scale=guidance_scale, num_inference_steps=num_inference_steps)
        written.append(save_image_atomic(edited, out / f"edit-seed{seed}.png"))
        if grid_image_guidance and grid_guidance:
            grid, _ = instruct_edit_grid(pipe, image, instruction, seed, image_guidance_scales=grid_image_guidance,
                                         guidance_scales=grid_guidance, num_inference_steps=num_inference_steps)
            written.append(save_image_atomic(grid, out / f"grid-seed{seed}.png"))
    record = {"model": str(model), "image": str(image_path), "instruction": instruction, "seeds": list(seeds),
              "image_guidance_scale": image_guidance_scale, "guidance_scale": guidance_scale,
              "num_inference_steps": num_inference_steps,
              "grid": {"image_guidance": list(grid_image_guidance or []), "guidance": list(grid_guidance or [])}}
    with atomic_path(out / "edit.json") as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2) + "\n")
    return [*written, out / "edit.json"]
