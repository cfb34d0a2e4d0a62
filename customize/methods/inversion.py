"""Real-image inversion for Prompt-to-Prompt editing (SD 1.x/2.x and SDXL): DDIM, null-text (Mokady et al. 2023),
negative-prompt (Miyake et al. 2023) and direct inversion (Ju et al. 2023, "PnP Inversion").

Each inversion is one function `(pipe, image, prompt, ...) -> Inversion`; `reconstruct(pipe, inversion)` samples
the image back, and `customize.inference.edit(..., inversion=inv)` edits it (every row starts from x_T). All of
them use the pipeline's own parts: `pipe.encode_prompt`, the VAE, the UNet, and a DDIMScheduler built from
`pipe.scheduler.config`; sampling goes through the pipeline's own `__call__` (via `customize.inference.generate`),
with the per-step changes (null-text's unconditional embeddings, direct inversion's source correction) made in
its `callback_on_step_end`.

The DDIM step is affine in the latent. With a = alpha_bar(t), p = alpha_bar(s) (s the next, less noisy step;
the scheduler's `final_alpha_cumprod` after the last one) and o = the network output at (x_t, t),

    x_s = A x_t + B o,     epsilon:  A = sqrt(p / a),                       B = sqrt(1 - p) - sqrt(p (1 - a) / a)
                           v:        A = sqrt(p a) + sqrt((1 - p)(1 - a)),  B = sqrt((1 - p) a) - sqrt(p (1 - a))
                           sample:   A = sqrt((1 - p) / (1 - a)),           B = sqrt(p) - sqrt(a (1 - p) / (1 - a))

(x0 and epsilon written from o, then x_s = sqrt(p) x0 + sqrt(1 - p) epsilon, eta = 0), with classifier-free
guidance o = o_u + w (o_c - o_u). DDIM inversion runs it backwards, x_t = (x_s - B o) / A, with the one
approximation that o is evaluated at (x_s, t) instead of the unknown (x_t, t): so a network whose output does not
depend on x inverts exactly, and a real one drifts by how much o changes between x_s and x_t.

Image rules (`ValueError` otherwise, saying what to do): a PIL image (or a path to one) of mode RGB, or L
(grey, converted to RGB: lossless); RGBA, LA, P, CMYK, ... are refused, since flattening transparency or a palette
is a choice (which background?) the caller should make. Its size must be height x width, by default the
pipeline's native resolution (unet.sample_size x the VAE factor), both multiples of the VAE factor: an image is
never resized here, because the reconstruction is measured against the pixels given.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

METHODS = ("ddim", "null-text", "negative-prompt", "direct")


@dataclass
class Inversion:
    """What an inversion found, enough to sample the image back (`reconstruct`) or edit it (`edit(inversion=)`).

    trajectory[i] is the latent sampling step i starts from, in sampling order (trajectory[0] = latent = x_T,
    trajectory[N] = x_0 = the VAE latent of the image); sampling step i runs the UNet at timesteps[i].
    uncond_embeds are the unconditional text embeddings the sampling uses in place of the empty prompt's:
    null-text's per-step ones (N rows, row i for step i), negative-prompt's single one (1 row: the source
    prompt's conditional embedding), None for ddim and direct (the pipeline's own empty-prompt embedding).
    uncond_pooled (SDXL, 1 x P) goes with them; timesteps, guidance_scale, height and width are what sampling
    must use; settings records the method's parameters; seconds the time the inversion took.
    """

    method: str
    prompt: str
    latent: torch.Tensor  # (1, C, h, w) x_T
    trajectory: torch.Tensor  # (N + 1, C, h, w), sampling order
    timesteps: torch.Tensor  # (N,)
    guidance_scale: float
    height: int
    width: int
    uncond_embeds: torch.Tensor | None = None  # (N, L, D) null-text, (1, L, D) negative-prompt
    uncond_pooled: torch.Tensor | None = None  # (1, P), SDXL only
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def num_inference_steps(self) -> int:
        return int(self.timesteps.shape[0])


# --------------------------------------------------------------------------------------------- pipeline parts


def _sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def _device(pipe) -> torch.device:
    return torch.device(getattr(pipe, "_execution_device", None) or pipe.device)


def ddim_scheduler(pipe, num_inference_steps: int):
    """A DDIMScheduler from the pipeline's scheduler config (its betas, prediction type, timestep spacing), with
    clipping and thresholding off (the inversion inverts the unclipped step), timesteps set."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, thresholding=False)
    sched.set_timesteps(num_inference_steps, device=_device(pipe))
    return sched


def step_coefficients(sched, t) -> tuple[float, float]:
    """(A, B) of the DDIM step from timestep t to the next one, x_s = A x_t + B o (module docstring), computed as
    DDIMScheduler.step picks its alphas (prev = t - T / N, final_alpha_cumprod below 0)."""
    t = int(t)
    prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
    a = float(sched.alphas_cumprod[t])
    p = float(sched.alphas_cumprod[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
    kind = sched.config.prediction_type
    if kind == "epsilon":
        if a <= 0:
            raise ValueError("an epsilon-prediction model cannot be inverted at alpha_bar = 0 (zero terminal SNR)")
        return (p / a) ** 0.5, (1 - p) ** 0.5 - (p * (1 - a) / a) ** 0.5
    if kind == "v_prediction":
        return (p * a) ** 0.5 + ((1 - p) * (1 - a)) ** 0.5, ((1 - p) * a) ** 0.5 - (p * (1 - a)) ** 0.5
    if kind == "sample":
        return ((1 - p) / (1 - a)) ** 0.5, p ** 0.5 - (a * (1 - p) / (1 - a)) ** 0.5
    raise ValueError(f"unknown prediction_type {kind!r}")


@dataclass
class _Text:
    cond: torch.Tensor  # (1, L, D)
    uncond: torch.Tensor  # (1, L, D), the empty prompt's (zeros for SDXL's force_zeros_for_empty_prompt)
    pooled: torch.Tensor | None = None  # (1, P) SDXL
    uncond_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None  # (1, 6) SDXL


def _check_prompt(pipe, prompt: str) -> None:
    if not isinstance(prompt, str):
        raise ValueError(f"the source prompt must be one str, got {type(prompt).__name__}")
    for tok in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)):
        if tok is None:
            continue
        n = len(tok(prompt).input_ids)
        if n > tok.model_max_length:
            raise ValueError(f"the prompt is {n} tokens, the tokenizer takes {tok.model_max_length} (start and end "
                             "included): shorten it, or the words past the limit would be silently dropped")


def _encode_text(pipe, prompt: str, height: int, width: int) -> _Text:
    """The pipeline's own encode_prompt (both encoders and the pooled embedding for SDXL) and, for SDXL, the
    added time ids the pipeline builds for an un-cropped height x width image."""
    device = _device(pipe)
    with torch.no_grad():
        if not _sdxl(pipe):
            cond, uncond = pipe.encode_prompt(prompt, device, 1, True)
            return _Text(cond, uncond)
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
    time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=cond.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return _Text(cond, uncond, pooled, uncond_pooled, time_ids.to(device))


def _unet(pipe, text: _Text, x, t, embeds, pooled):
    """One UNet call as the pipeline makes it: x (B, C, h, w), embeds (B, L, D), pooled (B, P) for SDXL."""
    added = None
    if text.time_ids is not None:
        added = {"text_embeds": pooled, "time_ids": text.time_ids.expand(x.shape[0], -1)}
    return pipe.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]


def _guided(pipe, text: _Text, x, t, w: float, uncond=None):
    """o = o_u + w (o_c - o_u), one batched call [uncond, cond] as the pipeline; the conditional call alone at
    w = 1 (the pipeline's rule: guidance only above 1)."""
    if w <= 1:
        return _unet(pipe, text, x, t, text.cond, text.pooled)
    uncond = text.uncond if uncond is None else uncond
    pooled = None if text.pooled is None else torch.cat([text.uncond_pooled, text.pooled])
    o_u, o_c = _unet(pipe, text, torch.cat([x, x]), t, torch.cat([uncond, text.cond]), pooled).chunk(2)
    return o_u + w * (o_c - o_u)


def load_image(image, height: int | None = None, width: int | None = None, factor: int = 8):
    """The image (a PIL image or a path) as RGB after the module's rules; a ValueError says what to do."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        image = Image.open(image)
        image.load()
    if not isinstance(image, Image.Image):
        raise ValueError(f"invert a PIL image (or a path to one), got {type(image).__name__}")
    if image.mode == "L":
        image = image.convert("RGB")  # grey: three equal channels, nothing lost
    elif image.mode != "RGB":
        raise ValueError(
            f"image mode {image.mode}: inversion takes RGB (or L) images. Flatten it yourself onto the background "
            "you want, e.g. Image.alpha_composite(Image.new('RGBA', im.size, 'white'), im.convert('RGBA'))"
            ".convert('RGB'), or im.convert('RGB') for a palette / CMYK image")
    w, h = image.size
    if (height is not None and h != height) or (width is not None and w != width):
        raise ValueError(f"the image is {w}x{h} pixels but the inversion runs at {width}x{height}: resize or crop "
                         f"it to {width}x{height} first (image.resize(({width}, {height}))), or pass height={h}, "
                         f"width={w} to invert at its own size")
    if h % factor or w % factor:
        raise ValueError(f"the image is {w}x{h} pixels, not a multiple of the VAE factor {factor}: crop or resize "
                         f"it to e.g. {w // factor * factor}x{h // factor * factor}")
    return image


def _encode_image(pipe, image, height: int | None, width: int | None):
    """x_0 = the VAE posterior's mean times scaling_factor, (1, C, h, w), and the checked (height, width)."""
    import numpy as np

    factor = pipe.vae_scale_factor
    native = pipe.unet.config.sample_size * factor
    height, width = height or native, width or native
    image = load_image(image, height, width, factor)
    device = _device(pipe)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]  # (1, 3, H, W)
    with torch.no_grad():
        latent = pipe.vae.encode(pixels.to(device, pipe.vae.dtype)).latent_dist.mean
    latent = latent * pipe.vae.config.scaling_factor
    return latent.to(pipe.unet.dtype), height, width


# --------------------------------------------------------------------------------------------- inversions


def _ddim_trajectory(pipe, sched, text: _Text, x0, w: float) -> torch.Tensor:
    """(N + 1, C, h, w) in sampling order: x_0 run backwards through the N steps, x_t = (x_s - B o(x_s, t)) / A."""
    n = sched.num_inference_steps
    out = [None] * (n + 1)
    out[n] = x = x0[0]
    with torch.no_grad():
        for i in reversed(range(n)):
            t = sched.timesteps[i]
            a, b = step_coefficients(sched, t)
            o = _guided(pipe, text, x[None], t, w)[0]
            x = (x - b * o) / a
            out[i] = x
    return torch.stack(out)


def _start(pipe, image, prompt, num_inference_steps, height, width):
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    _check_prompt(pipe, prompt)
    x0, height, width = _encode_image(pipe, image, height, width)
    return ddim_scheduler(pipe, num_inference_steps), _encode_text(pipe, prompt, height, width), x0, height, width


def ddim_inversion(pipe, image, prompt: str, *, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                   inversion_guidance_scale: float = 1.0, height: int | None = None, width: int | None = None,
                   method: str = "ddim") -> Inversion:
    """DDIM inversion: x_0 = the image's VAE latent, run backwards through the deterministic DDIM steps with the
    source prompt at `inversion_guidance_scale` (1: the conditional prediction alone, the usual choice, since
    guidance amplifies the error of evaluating o at x_s instead of x_t). N UNet calls (2N above guidance 1).

    guidance_scale is what sampling from it uses (`reconstruct`, `edit`): at 1 the reconstruction is near exact,
    at the 7.5 an edit wants it drifts (the guided trajectory is not the inverted one), which null-text,
    negative-prompt and direct inversion each repair."""
    begin = time.perf_counter()
    sched, text, x0, height, width = _start(pipe, image, prompt, num_inference_steps, height, width)
    traj = _ddim_trajectory(pipe, sched, text, x0, inversion_guidance_scale)
    return Inversion(method, prompt, traj[:1].clone(), traj, sched.timesteps.clone(), float(guidance_scale),
                     height, width, settings={"inversion_guidance_scale": inversion_guidance_scale},
                     seconds=time.perf_counter() - begin)


def null_text_inversion(pipe, image, prompt: str, *, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                        inner_steps: int = 10, learning_rate: float = 1e-2, early_stop: float = 1e-5,
                        height: int | None = None, width: int | None = None) -> Inversion:
    """Null-text inversion (Mokady et al. 2023): DDIM inversion at guidance 1 gives the pivot trajectory z*_i;
    then, step by step in sampling order from z_0 = z*_0 = x_T, the unconditional embedding of step i is optimised
    so that the guided step lands on the pivot,

        min_{u_i} || z*_{i+1} - (A z_i + B (o_u(z_i, u_i) + w (o_c(z_i) - o_u(z_i, u_i)))) ||^2     (mean over
        latent elements), by `inner_steps` Adam steps at `learning_rate` from u_{i-1} (the empty prompt's for
        i = 0), stopping early once the loss is below `early_stop`; then z_{i+1} = the guided step with u_i.

    The conditional output o_c is computed once per step (it does not depend on u); only the unconditional
    call carries a graph, and only the embedding gets a gradient (the UNet is not touched). Cost per step: one
    conditional call and up to inner_steps forward + backward unconditional calls, ~10-30x a DDIM inversion.
    Sampling with the N embeddings (`reconstruct`, `edit`) follows the pivot up to the remaining loss, so the
    image comes back at guidance w while the conditional branch (what P2P edits) is untouched.
    SDXL: the token embeddings (both encoders', concatenated) are optimised, the pooled one stays the empty
    prompt's."""
    if guidance_scale <= 1:
        raise ValueError(f"null-text inversion optimises the unconditional branch of classifier-free guidance, "
                         f"which the pipeline skips at guidance_scale {guidance_scale}: use guidance_scale > 1, or "
                         "ddim_inversion, exact enough without guidance")
    begin = time.perf_counter()
    sched, text, x0, height, width = _start(pipe, image, prompt, num_inference_steps, height, width)
    traj = _ddim_trajectory(pipe, sched, text, x0, 1.0)
    w = float(guidance_scale)
    uncond = text.uncond.detach()
    embeds, used, losses = [], [], []
    z = traj[0][None]  # (1, C, h, w)
    for i, t in enumerate(sched.timesteps):
        a, b = step_coefficients(sched, t)
        with torch.no_grad():
            o_c = _unet(pipe, text, z, t, text.cond, text.pooled)
        target = traj[i + 1][None]
        u = uncond.clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=learning_rate)
        o_u = None
        for j in range(inner_steps + 1):
            with torch.enable_grad():
                o_u = _unet(pipe, text, z, t, u, text.uncond_pooled)
                loss = torch.mean((target - (a * z + b * (o_u + w * (o_c - o_u)))) ** 2)
            if j == inner_steps or loss.item() < early_stop:
                break  # o_u is the output of the embedding kept
            (u.grad,) = torch.autograd.grad(loss, [u])
            opt.step()
        used.append(j)
        losses.append(loss.item())
        uncond = u.detach()
        embeds.append(uncond[0])
        o_u = o_u.detach()
        z = (a * z + b * (o_u + w * (o_c - o_u))).detach()
    return Inversion("null-text", prompt, traj[:1].clone(), traj, sched.timesteps.clone(), w, height, width,
                     uncond_embeds=torch.stack(embeds), uncond_pooled=text.uncond_pooled,
                     settings={"inner_steps": inner_steps, "learning_rate": learning_rate, "early_stop": early_stop,
                               "adam_steps_used": used, "final_losses": losses},
                     seconds=time.perf_counter() - begin)


def negative_prompt_inversion(pipe, image, prompt: str, *, num_inference_steps: int = 50,
                              guidance_scale: float = 7.5, height: int | None = None,
                              width: int | None = None) -> Inversion:
    """Negative-prompt inversion (Miyake et al. 2023): DDIM inversion at guidance 1, then sampling with the
    source prompt's conditional embedding C as the unconditional one. No optimisation: null-text's optimum u_i
    makes the guided output equal the conditional one, o_u + w (o_c - o_u) = o_c, which u = C achieves exactly
    for the source row (o_u = o_c); the target rows of an edit get C as their negative prompt as well, so their
    guidance pushes away from the source and towards the target prompt. The cost is the DDIM inversion's."""
    inv = ddim_inversion(pipe, image, prompt, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, height=height, width=width, method="negative-prompt")
    text = _encode_text(pipe, prompt, inv.height, inv.width)  # a text-encoder call: ~nothing next to the UNet's
    inv.uncond_embeds, inv.uncond_pooled = text.cond, text.pooled
    return inv


def direct_inversion(pipe, image, prompt: str, *, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                     height: int | None = None, width: int | None = None) -> Inversion:
    """Direct inversion (Ju et al. 2023, "PnP Inversion"): DDIM inversion at guidance 1, kept as the trajectory
    z*_i; when sampling, the source row is corrected after every step by its difference to the trajectory,
    z_{i+1} <- z_{i+1} + (z*_{i+1} - z_{i+1}) (= z*_{i+1}: the correction is computed from the stored trajectory
    on the fly, no optimisation), so the source branch reproduces the trajectory and ends on the image's
    latent, while the target rows of an edit run freely at guidance w and read the corrected source branch only
    through the controller's attention. The cost is the DDIM inversion's; the source reconstruction is the VAE's."""
    return ddim_inversion(pipe, image, prompt, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, height=height, width=width, method="direct")


INVERSIONS = {"ddim": ddim_inversion, "null-text": null_text_inversion,
              "negative-prompt": negative_prompt_inversion, "direct": direct_inversion}


def invert(pipe, image, prompt: str, method: str = "null-text", **kwargs) -> Inversion:
    """The inversion named `method` (one of METHODS), kwargs to its function."""
    if method not in INVERSIONS:
        raise ValueError(f"unknown inversion method {method!r}: choose one of {', '.join(METHODS)}")
    return INVERSIONS[method](pipe, image, prompt, **kwargs)


# --------------------------------------------------------------------------------------------- sampling


@contextlib.contextmanager
def sampling(pipe, inversion: Inversion, rows: int, source_row: int = 0, source_prompt: str | None = None,
             num_inference_steps: int | None = None, height: int | None = None, width: int | None = None,
             guidance_scale: float | None = None):
    """Sampling `rows` images from an inversion through the pipeline's own call: yields (call_kwargs, callback).

    call_kwargs for the pipeline: latents (every row x_T), the inversion's guidance (the caller passes its step
    count, height and width), the unconditional embeddings of step 0 as negative_prompt_embeds (and the pooled
    ones for SDXL), and the callback tensor inputs. callback is for callback_on_step_end: after step i it puts step i + 1's null-text embedding
    into the unconditional half of prompt_embeds (rows [uncond x rows, cond x rows]) and, for direct inversion,
    sets the source row to trajectory[i + 1]. Inside the block the pipeline's scheduler is the inversion's DDIM
    scheduler (the pipeline's own is put back afterwards). The given step count / size / guidance / source prompt,
    when not None, must be the inversion's (ValueError otherwise: they are fixed when inverting)."""
    if not isinstance(inversion, Inversion):
        raise ValueError(f"inversion= takes an Inversion (customize.methods.inversion), got "
                         f"{type(inversion).__name__}")
    given = {"source prompt": (source_prompt, inversion.prompt),
             "num_inference_steps": (num_inference_steps, inversion.num_inference_steps),
             "height": (height, inversion.height), "width": (width, inversion.width),
             "guidance_scale": (guidance_scale, inversion.guidance_scale)}
    for name, (value, fixed) in given.items():
        if value is not None and value != fixed:
            raise ValueError(f"{name} {value!r} differs from the inversion's {fixed!r}: these are fixed when "
                             "inverting; invert again to change them (or leave them out here)")
    sched = ddim_scheduler(pipe, inversion.num_inference_steps)
    if not torch.equal(sched.timesteps.cpu(), inversion.timesteps.cpu()):
        raise ValueError("the pipeline's scheduler config gives other timesteps than the inversion's: invert "
                         "with this pipeline")
    device = _device(pipe)
    latents = inversion.latent.to(device).expand(rows, -1, -1, -1).clone()  # (rows, C, h, w)
    kwargs = {"latents": latents, "guidance_scale": inversion.guidance_scale,
              "callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds"]}
    uncond = None if inversion.uncond_embeds is None else inversion.uncond_embeds.to(device)
    if uncond is not None:
        kwargs["negative_prompt_embeds"] = uncond[:1].expand(rows, -1, -1)  # (rows, L, D)
        if _sdxl(pipe):
            kwargs["negative_pooled_prompt_embeds"] = inversion.uncond_pooled.to(device).expand(rows, -1)
    per_step = uncond is not None and uncond.shape[0] > 1
    trajectory = inversion.trajectory.to(device) if inversion.method == "direct" else None

    def callback(p, i, t, callback_kwargs):
        nxt = i + 1
        if per_step and nxt < uncond.shape[0] and p.do_classifier_free_guidance:
            embeds = callback_kwargs["prompt_embeds"].clone()  # (2 rows, L, D): [uncond x rows, cond x rows]
            embeds[:rows] = uncond[nxt]
            callback_kwargs["prompt_embeds"] = embeds
        if trajectory is not None:
            lat = callback_kwargs["latents"].clone()  # (rows, C, h, w)
            lat[source_row] = trajectory[nxt]  # z + (z* - z), written as z* (exact, no rounding of the sum)
            callback_kwargs["latents"] = lat
        return callback_kwargs

    before = pipe.scheduler
    pipe.scheduler = sched
    try:
        yield kwargs, callback
    finally:
        pipe.scheduler = before


def reconstruct(pipe, inversion: Inversion, output_type: str = "pil", **generate_kwargs):
    """The image sampled back from the inversion (the source row of an edit with no controller): x_T through
    the pipeline's DDIM sampling at the inversion's guidance, with its per-step embeddings / source correction.
    generate_kwargs go to `customize.inference.generate` (not the fixed settings, see `sampling`)."""
    from customize.inference import generate

    fixed = {k: generate_kwargs.pop(k, None) for k in ("num_inference_steps", "height", "width", "guidance_scale")}
    with sampling(pipe, inversion, 1, **fixed) as (kwargs, callback):
        user = generate_kwargs.pop("callback_on_step_end", None)

        def on_step_end(p, i, t, cb_kwargs):
            cb_kwargs = callback(p, i, t, cb_kwargs)
            return cb_kwargs if user is None else user(p, i, t, cb_kwargs)

        return generate(pipe, [inversion.prompt], [0], num_inference_steps=inversion.num_inference_steps,
                        height=inversion.height, width=inversion.width, output_type=output_type,
                        callback_on_step_end=on_step_end, **kwargs, **generate_kwargs)[0]


def psnr(a, b) -> float:
    """PSNR in dB of two 8-bit images (PIL or arrays), 10 log10(255^2 / MSE)."""
    import numpy as np

    a = np.asarray(a.convert("RGB") if hasattr(a, "convert") else a, dtype=np.float64)
    b = np.asarray(b.convert("RGB") if hasattr(b, "convert") else b, dtype=np.float64)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
