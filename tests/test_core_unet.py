"""The core UNet against diffusers' UNet2DModel, and the core schedulers driving real diffusers pipelines."""

import diffusers
import pytest
import torch

from customize.core import DDIMScheduler, DDPMScheduler, UNet, UNetConfig, config_to_diffusers, from_diffusers_config, sample

CONFIGS = {
    "attention": dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                      norm_num_groups=8, attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    "class_conditional_no_attention": dict(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32), layers_per_block=2,
        norm_num_groups=8, down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
        add_attention=False, num_class_embeds=10, freq_shift=1, flip_sin_to_cos=False),
    "scale_shift_asymmetric": dict(
        sample_size=8, in_channels=2, out_channels=4, block_out_channels=(16, 32), layers_per_block=2,
        norm_num_groups=4, attention_head_dim=None, down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"), resnet_time_scale_shift="scale_shift",
        mid_block_scale_factor=1.4142, downsample_padding=0, time_embedding_dim=48, num_class_embeds=3),
    "no_mid_block": dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                         mid_block_type=None, down_block_types=("DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D"), center_input_sample=True),
}


def _seeded_reference(config: dict) -> diffusers.UNet2DModel:
    """A UNet2DModel with every weight perturbed (diffusers zero-initialises nothing here, but the perturbation
    makes sure no parameter, e.g. a GroupNorm affine, sits at a value that would hide a wrong mapping)."""
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(config: dict, batch: int = 3):
    g = torch.Generator().manual_seed(1)
    size = config["sample_size"]
    x = torch.randn(batch, config.get("in_channels", 3), size, size, generator=g)
    t = torch.tensor([0, 517, 999])[:batch]
    y = torch.randint(0, config["num_class_embeds"], (batch,), generator=g) if config.get("num_class_embeds") else None
    return x, t, y


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_equals_diffusers_and_round_trips(name):
    config = CONFIGS[name]
    ref = _seeded_reference(config)
    ours = UNet.from_diffusers(ref).eval()
    x, t, y = _inputs(config)
    with torch.no_grad():
        a = ours(x, t, y)
        b = ref(x, t, class_labels=y).sample
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 1e-5, (a - b).abs().max()
    with torch.no_grad():  # a scalar timestep broadcasts over the batch, as in diffusers
        torch.testing.assert_close(ours(x, 250, y), ref(x, 250, class_labels=y).sample, rtol=0, atol=1e-5)
    # back to diffusers: the same architecture and bitwise the same weights
    back = diffusers.UNet2DModel(**config_to_diffusers(ours.config))
    back.load_state_dict(ours.diffusers_state_dict())
    ref_sd, back_sd = ref.state_dict(), back.state_dict()
    assert set(ref_sd) == set(back_sd)
    assert all(torch.equal(ref_sd[k], back_sd[k]) for k in ref_sd)
    assert from_diffusers_config(back.config) == ours.config


def test_gradients_equal_diffusers_and_checkpointing():
    config = CONFIGS["scale_shift_asymmetric"]
    ref = _seeded_reference(config).train()
    ours = UNet.from_diffusers(ref).train()
    x, t, y = _inputs(config, batch=2)
    ref(x, t, class_labels=y).sample.square().mean().backward()
    ours(x, t, y).square().mean().backward()
    ours_grads = UNet.from_diffusers(ref)  # a container with our layout, to hold diffusers' gradients by name
    ours_grads.load_diffusers_state_dict({k: p.grad for k, p in ref.named_parameters()})
    theirs = dict(ours_grads.named_parameters())
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[k].data, rtol=1e-4, atol=1e-6, msg=k)
    plain = {k: p.grad.clone() for k, p in ours.named_parameters()}
    ours.zero_grad()
    ours.enable_gradient_checkpointing()
    ours(x, t, y).square().mean().backward()
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, plain[k], rtol=1e-5, atol=1e-7, msg=k)


def test_unsupported_configs_and_bad_calls_are_named():
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        from_diffusers_config({**CONFIGS["attention"], "resnet_time_scale_shift": "spatial"})
    with pytest.raises(ValueError, match="SkipDownBlock2D"):
        from_diffusers_config({**CONFIGS["attention"], "down_block_types": ("SkipDownBlock2D", "DownBlock2D")})
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(channels=(30, 60), down_attention=(False, True), norm_groups=8)
    unet = UNet(UNetConfig(channels=(8, 16), down_attention=(False, False), norm_groups=4, num_class_embeds=2))
    with pytest.raises(ValueError, match="class_labels"):
        unet(torch.zeros(1, 3, 8, 8), 1)
    with pytest.raises(KeyError, match="lacks"):
        unet.load_diffusers_state_dict({})


# ---------------------------------------------------------------------------------------------------------------
# Our schedulers inside real diffusers pipelines
# ---------------------------------------------------------------------------------------------------------------


def _generate(pipe, eta: float = 0.0):
    return pipe("a photo of a red circle", num_inference_steps=8, guidance_scale=5.0, eta=eta, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_stable_diffusion_pipeline_with_our_schedulers(tiny_sd):
    tiny_sd.set_progress_bar_config(disable=True)
    theirs = tiny_sd.scheduler
    for eta in (0.0, 1.0):
        tiny_sd.scheduler = theirs
        a = _generate(tiny_sd, eta)
        tiny_sd.scheduler = DDIMScheduler.from_config(theirs.config)
        b = _generate(tiny_sd, eta)
        assert a.std() > 0.05 and abs(a - b).max() <= 1e-5, (eta, abs(a - b).max())
    tiny_sd.scheduler = diffusers.DDPMScheduler.from_config(theirs.config)
    a = _generate(tiny_sd)
    tiny_sd.scheduler = DDPMScheduler.from_config(theirs.config)
    b = _generate(tiny_sd)
    assert abs(a - b).max() <= 1e-5
    tiny_sd.scheduler = DDPMScheduler.from_config(theirs.config, timestep_spacing="trailing")
    c = _generate(tiny_sd)
    assert abs(c - b).max() > 1e-3  # the config reaches the scheduler: another spacing, another image


def test_core_sampler_equals_ddpm_pipeline():
    """Our UNet + DDPMScheduler + `sample` reproduce diffusers' DDPMPipeline from the same generator."""
    config = CONFIGS["attention"]
    ref = _seeded_reference(config)
    theirs = diffusers.DDPMPipeline(unet=ref, scheduler=diffusers.DDPMScheduler(num_train_timesteps=100))
    theirs.set_progress_bar_config(disable=True)
    images = theirs(batch_size=2, num_inference_steps=20, generator=torch.Generator().manual_seed(0), output_type="pt").images
    steps = []
    x = sample(UNet.from_diffusers(ref).eval(), DDPMScheduler(num_train_timesteps=100), (2, 3, 16, 16),
               num_inference_steps=20, generator=torch.Generator().manual_seed(0),
               callback=lambda i, t, x_t, x0: steps.append(t))
    assert steps == list(range(95, -1, -5))
    ours = (x / 2 + 0.5).clamp(0, 1)
    assert (ours - images).abs().max() <= 1e-5, (ours - images).abs().max()
