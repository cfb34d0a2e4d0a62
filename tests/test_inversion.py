"""customize.methods.inversion (DDIM, null-text, negative-prompt, direct) and edit(inversion=), on the tiny SD and
SDXL pipelines and the committed toy base, on images rendered by the toy world (few steps)."""

import numpy as np
import pytest
import torch
from PIL import Image

from customize.attention import Replace
from customize.inference import edit
from customize.methods import inversion as inv
from customize.toy import experiments, world
from tests.lora_helpers import tiny_pipe

STEPS = 4
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def sd():
    return tiny_pipe("sd")


@pytest.fixture(scope="module")
def sdxl():
    return tiny_pipe("sdxl")


@pytest.fixture(scope="module")
def image():
    scene = world.Scene(shape="circle", colour="red", background="blue", size="large", position="center")
    return world.render(scene)  # 32 x 32 RGB, the tiny pipelines' and the toy base's native size


def _x_free(monkeypatch, pipe):
    """The UNet sees zeros instead of x: its output depends on t and the text only."""
    forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda sample, t, *a, **k: forward(torch.zeros_like(sample), t, *a, **k))


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_ddim_inversion_round_trips_with_an_x_independent_unet(kind, sd, sdxl, image, monkeypatch):
    pipe = sd if kind == "sd" else sdxl
    _x_free(monkeypatch, pipe)
    for w in (1.0, 3.0):  # the inversion and the sampling at the same guidance: the same outputs both ways
        done = inv.ddim_inversion(pipe, image, PROMPT, num_inference_steps=STEPS, guidance_scale=w,
                                  inversion_guidance_scale=w)
        back = inv.reconstruct(pipe, done, output_type="latent")
        x0 = done.trajectory[-1]
        assert done.trajectory.shape == (STEPS + 1, 4, 16, 16) and torch.equal(done.latent[0], done.trajectory[0])
        err = float((back - x0).abs().max())
        assert err < 1e-4 * float(x0.abs().max()), err  # exact up to float (A, B vs the scheduler's x0 / eps)
        assert float((done.latent - x0).abs().max()) > 0.1  # ... while x_T is somewhere else


@pytest.fixture(scope="module")
def toy():
    if not experiments.base_available():
        pytest.skip("no committed toy base")
    pipe = experiments.load_base()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_null_text_and_direct_beat_ddim_with_guidance_on_the_toy_base(toy, image):
    w, n = 4.0, 5
    ddim = inv.ddim_inversion(toy, image, PROMPT, num_inference_steps=n, guidance_scale=w)
    null = inv.null_text_inversion(toy, image, PROMPT, num_inference_steps=n, guidance_scale=w, inner_steps=5,
                                   learning_rate=5e-2)
    direct = inv.direct_inversion(toy, image, PROMPT, num_inference_steps=n, guidance_scale=w)
    assert null.uncond_embeds.shape == (n, toy.tokenizer.model_max_length, 64)
    assert len(null.settings["final_losses"]) == n
    psnr = {k: inv.psnr(inv.reconstruct(toy, x), image) for k, x in
            (("ddim", ddim), ("null-text", null), ("direct", direct))}
    assert psnr["null-text"] > psnr["ddim"] + 0.3, psnr
    assert psnr["direct"] > psnr["ddim"] + 0.3, psnr


def _inversion_bench():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "bench" / "toy_inversion.py"
    spec = importlib.util.spec_from_file_location("toy_inversion_bench", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules[spec.name]
    return bench


def test_tiny_sdxl_with_the_toy_vae_null_text_and_direct_beat_ddim_in_pixels(toy, image):
    """bench/toy_inversion.py's "sdxl" model: the tiny SDXL layout (random UNet, two random text encoders) around
    the toy base's trained VAE, so that the pixels show what null-text's lower latent error buys."""
    bench = _inversion_bench()
    pipe = bench.tiny_sdxl()
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder_2 is not None and pipe.unet.config.addition_embed_type == "text_time"
    assert torch.equal(pipe.vae.decoder.conv_out.weight, toy.vae.decoder.conv_out.weight)  # the trained VAE
    vae = bench.vae_round_trip(pipe, image)
    assert inv.psnr(vae, image) > 25  # it decodes faithfully (the random tiny VAE's round trip is ~8 dB)
    w, n = 5.0, 4
    psnr = {m: inv.psnr(inv.reconstruct(pipe, inv.invert(pipe, image, PROMPT, m, num_inference_steps=n,
                                                         guidance_scale=w, **kw)), vae)
            for m, kw in (("ddim", {}), ("null-text", {"inner_steps": 5, "learning_rate": 5e-2}), ("direct", {}))}
    assert psnr["null-text"] > psnr["ddim"] + 1.0, psnr
    assert psnr["direct"] == float("inf"), psnr  # the source branch ends on the image latent: the VAE's decode


def test_negative_prompt_inversion_is_ddim_cost_and_no_gradient(sd, image, monkeypatch):
    calls = []
    hook = sd.unet.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    try:
        neg = inv.negative_prompt_inversion(sd, image, PROMPT, num_inference_steps=STEPS)
    finally:
        hook.remove()
    assert calls == [False] * STEPS  # the DDIM inversion's N conditional calls, no graph: nothing optimised
    cond, _ = sd.encode_prompt(PROMPT, "cpu", 1, True)
    torch.testing.assert_close(neg.uncond_embeds, cond)  # the source prompt's embedding as the negative one
    ddim = inv.ddim_inversion(sd, image, PROMPT, num_inference_steps=STEPS, guidance_scale=1.0)
    # unconditional = conditional: the guided output is the conditional one, i.e. DDIM's reconstruction at w = 1
    a = inv.reconstruct(sd, neg, output_type="latent")
    b = inv.reconstruct(sd, ddim, output_type="latent")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_direct_inversion_source_branch_reproduces_the_image_latent(kind, sd, sdxl, image):
    pipe = sd if kind == "sd" else sdxl
    done = inv.direct_inversion(pipe, image, PROMPT, num_inference_steps=STEPS, guidance_scale=7.5)
    back = inv.reconstruct(pipe, done, output_type="latent")
    assert torch.equal(back, done.trajectory[-1])  # the source row set onto the trajectory every step
    ddim = inv.ddim_inversion(pipe, image, PROMPT, num_inference_steps=STEPS, guidance_scale=7.5)
    assert float((inv.reconstruct(pipe, ddim, output_type="latent") - back).abs().max()) > 1e-2


def test_sdxl_null_text_and_negative_prompt_follow_the_pipeline(sdxl, image):
    null = inv.null_text_inversion(sdxl, image, PROMPT, num_inference_steps=3, guidance_scale=5.0, inner_steps=3,
                                   learning_rate=5e-2)
    assert null.uncond_embeds.shape == (3, 77, 64) and null.uncond_pooled.shape == (1, 32)
    assert float(null.uncond_embeds.abs().max()) > 0  # moved off SDXL's zero empty-prompt embedding
    ddim = inv.ddim_inversion(sdxl, image, PROMPT, num_inference_steps=3, guidance_scale=5.0)
    x0 = ddim.trajectory[-1]
    err = {k: float(((inv.reconstruct(sdxl, x, output_type="latent") - x0) ** 2).mean()) for k, x in
           (("ddim", ddim), ("null-text", null))}
    assert err["null-text"] < err["ddim"], err  # the per-step embeddings reach the pipeline's UNet
    neg = inv.negative_prompt_inversion(sdxl, image, PROMPT, num_inference_steps=3, guidance_scale=5.0)
    assert neg.uncond_pooled.shape == (1, 32) and float(neg.uncond_pooled.abs().max()) > 0
    assert inv.reconstruct(sdxl, neg).size == (32, 32)


def test_bad_inputs_are_clear_errors(sd, image):
    with pytest.raises(ValueError, match="RGB"):
        inv.ddim_inversion(sd, image.convert("RGBA"), PROMPT, num_inference_steps=2)
    inv.ddim_inversion(sd, image.convert("L"), PROMPT, num_inference_steps=2)  # grey: converted
    with pytest.raises(ValueError, match="resize or crop"):
        inv.ddim_inversion(sd, image.resize((48, 48)), PROMPT, num_inference_steps=2)
    with pytest.raises(ValueError, match="multiple of the VAE factor 2"):
        inv.ddim_inversion(sd, Image.new("RGB", (33, 33)), PROMPT, num_inference_steps=2, height=33, width=33)
    with pytest.raises(ValueError, match="unknown inversion method 'pnp'.*null-text"):
        inv.invert(sd, image, PROMPT, "pnp")
    with pytest.raises(ValueError, match="tokens"):
        inv.ddim_inversion(sd, image, " ".join(["red"] * 100), num_inference_steps=2)
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        inv.null_text_inversion(sd, image, PROMPT, num_inference_steps=2, guidance_scale=1.0)
    done = inv.ddim_inversion(sd, image, PROMPT, num_inference_steps=2)
    with pytest.raises(ValueError, match="num_inference_steps 3 differs"):
        edit(sd, PROMPT, "a red square on a blue background", 0, Replace(), inversion=done, num_inference_steps=3)
    with pytest.raises(ValueError, match="source prompt"):
        edit(sd, "a blue circle", "a red square", 0, Replace(), inversion=done)


@pytest.mark.parametrize("method", ["null-text", "direct", "negative-prompt"])
def test_edit_with_an_inversion_returns_the_reconstruction_as_row_0(sd, image, method):
    kw = {"inner_steps": 2} if method == "null-text" else {}
    done = inv.invert(sd, image, PROMPT, method, num_inference_steps=STEPS, **kw)
    alone = np.asarray(inv.reconstruct(sd, done, output_type="np"))
    rows = edit(sd, PROMPT, "a red square on a blue background", 0,
                Replace(cross_replace_steps=0.8, self_replace_steps=0.4, self_max_pixels=256), inversion=done,
                output_type="np")
    assert len(rows) == 2
    assert np.abs(rows[0] - alone).max() < 1e-4  # batch shape and the explicit attention path: float rounding
    assert np.abs(rows[1] - rows[0]).max() > 1e-3  # the target is edited
    if method == "direct":
        assert sd.scheduler.__class__.__name__ == "DDIMScheduler"  # put back (the tiny one's own is DDIM too)
