"""InstructPix2Pix: the widened conv_in, the conditioning dropout, the null conditions of inference, the two
guidance scales, the recipe's folder in diffusers' own pipelines, and bad input (tiny pipelines, a few steps)."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from customize.data import collate_examples
from customize.methods import instruct_pix2pix as ip2p
from customize.models import tiny_pipeline
from customize.training import sd

RES = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from customize.toy import world

    return world.export("edits", tmp_path_factory.mktemp("ip2p") / "data", 4)


@pytest.fixture(scope="module")
def pipes():
    return {kind: tiny_pipeline(kind) for kind in ("sd", "sdxl")}


def _cfg(folder, **kw):
    return ip2p.InstructPix2PixConfig(train_data_dir=str(folder), resolution=RES, output_dir="", **kw)


def _randomize_new_weights(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = unet.conv_in.weight
        w[:, unet.config.out_channels:] = torch.randn(w[:, unet.config.out_channels:].shape, generator=g) * 0.3


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_widened_unet_equals_base_at_init(pipes, kind, tmp_path):
    pipe = pipes[kind]
    base = pipe.unet
    wide = ip2p.widen_conv_in(copy.deepcopy(base))
    assert wide.config.in_channels == 8 and wide.conv_in.in_channels == 8
    assert torch.equal(wide.conv_in.weight[:, :4], base.conv_in.weight)
    assert torch.count_nonzero(wide.conv_in.weight[:, 4:]) == 0
    assert torch.equal(wide.conv_in.bias, base.conv_in.bias)  # the bias is kept (diffusers#4960 drops it)
    assert ip2p.widen_conv_in(wide) is wide and wide.conv_in.in_channels == 8  # already wide: unchanged
    g = torch.Generator().manual_seed(1)
    x_t, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700])
    cond = sd.encode_prompts(pipe, ["a red circle", "make the circle blue"])
    ids = sd.time_ids((RES, RES), (0, 0), (RES, RES)) if kind == "sdxl" else None
    with torch.no_grad():
        plain = sd.unet_predict(base, x_t, t, cond, ids)
        for extra in (torch.randn(2, 4, 16, 16, generator=g) * 5, torch.zeros(2, 4, 16, 16)):
            widened = sd.unet_predict(wide, torch.cat([x_t, extra], 1), t, cond, ids)
            torch.testing.assert_close(widened, plain, rtol=0, atol=1e-5)
    # the config follows, so a saved UNet loads wide
    wide.save_pretrained(tmp_path / "unet")
    from diffusers import UNet2DConditionModel

    assert UNet2DConditionModel.from_pretrained(tmp_path / "unet").conv_in.in_channels == 8


def test_dropout_masks_partition_5_5_5():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    text, image = ip2p.dropout_masks(n, 0.05, g)
    fractions = {
        "text only": (text & ~image).float().mean().item(),
        "image only": (image & ~text).float().mean().item(),
        "both": (text & image).float().mean().item(),
        "neither": (~text & ~image).float().mean().item(),
    }
    for case in ("text only", "image only", "both"):
        assert abs(fractions[case] - 0.05) < 0.003, fractions
    assert abs(fractions["neither"] - 0.85) < 0.004, fractions
    assert not ip2p.dropout_masks(1000, 0.0, g)[0].any()


def test_image_latent_is_the_unscaled_mode_and_cached_loss_matches(pipes, folder):
    from customize.data import ImageCaptionDataset

    pipe = ip2p.build_model(tiny_pipeline("sd"))
    ds = ImageCaptionDataset.from_hf(str(folder), RES, image_column="edited_image", caption_column="edit_prompt",
                                     center_crop=True, paired_columns={ip2p.ORIGINAL: "input_image"})
    batch = collate_examples([ds[i] for i in range(2)])
    with torch.no_grad():
        mode = pipe.vae.encode(batch[ip2p.ORIGINAL_KEY]).latent_dist.mode()  # the pipelines' "argmax"
    torch.testing.assert_close(ip2p.image_latents(pipe, batch), mode, rtol=0, atol=0)
    cfg = _cfg(folder, conditioning_dropout_prob=0.2)
    cached = ip2p.cache_dataset(pipe, ds, 2, 0)
    cbatch = collate_examples([cached[i] for i in range(2)])
    assert ip2p.ORIGINAL_KEY not in cbatch and ip2p.CACHED_ORIGINAL in cbatch
    null = ip2p.null_condition(pipe)
    with torch.no_grad():
        a = ip2p.instruct_loss(pipe, batch, cfg, null, torch.Generator().manual_seed(3))
        b = ip2p.instruct_loss(pipe, cbatch, cfg, null, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a["loss"] if isinstance(a, dict) else a, b["loss"] if isinstance(b, dict) else b)


def test_timestep_sampling_reaches_the_loss_and_is_checked(pipes, folder, monkeypatch):
    """--timestep_sampling cubic: the loss draws its t by the cubic rule (the toy default, IP2P_DEFAULTS); the
    default stays uniform; an unknown rule is refused when the config is built."""
    from customize.core import losses
    from customize.data import ImageCaptionDataset

    pipe = ip2p.build_model(tiny_pipeline("sd"))
    ds = ImageCaptionDataset.from_hf(str(folder), RES, image_column="edited_image", caption_column="edit_prompt",
                                     center_crop=True, paired_columns={ip2p.ORIGINAL: "input_image"})
    batch = collate_examples([ds[i] for i in range(4)])
    drawn = []
    real = losses.sample_timesteps

    def spy(scheduler, batch_size, device, generator=None, sampling="uniform"):
        t = real(scheduler, batch_size, device, generator, sampling)
        drawn.append((sampling, t))
        return t

    monkeypatch.setattr(losses, "sample_timesteps", spy)
    with torch.no_grad():
        for rule in ("uniform", "cubic"):
            ip2p.instruct_loss(pipe, batch, _cfg(folder, timestep_sampling=rule), None, torch.Generator().manual_seed(0))
    assert [r for r, _ in drawn] == ["uniform", "cubic"]
    assert _cfg(folder).timestep_sampling == "uniform"
    with pytest.raises(ValueError, match="timestep_sampling"):
        _cfg(folder, timestep_sampling="logit-normal")


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_null_conditions_match_inference_and_drop_together(pipes, kind):
    pipe = ip2p.instruct_pipeline(pipes[kind])
    null = ip2p.null_condition(pipe)
    with torch.no_grad():
        if kind == "sdxl":
            _, neg, _, neg_pooled = pipe.encode_prompt("make it blue", device="cpu", num_images_per_prompt=1,
                                                       do_classifier_free_guidance=True)
            assert set(null) == {"encoder_hidden_states", "text_embeds"}
            assert torch.count_nonzero(null["encoder_hidden_states"]) == 0 and torch.count_nonzero(null["text_embeds"]) == 0
            torch.testing.assert_close(null["text_embeds"], neg_pooled, rtol=0, atol=0)
        else:
            embeds = pipe._encode_prompt("make it blue", "cpu", 1, True)  # [text, null, null]
            neg = embeds.chunk(3)[1]
        torch.testing.assert_close(null["encoder_hidden_states"], neg, rtol=0, atol=0)
    # a dropped row loses its states and (SDXL) its pooled embedding together; the image is zeroed by its own mask
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.randn((3, *v.shape[1:]), generator=g) for k, v in null.items()}
    image = torch.randn(3, 4, 16, 16, generator=g)
    out, img = ip2p.drop_conditions(batch, image, null, torch.tensor([True, False, True]),
                                    torch.tensor([False, True, True]))
    for key in null:
        assert torch.equal(out[key][0], null[key][0]) and torch.equal(out[key][2], null[key][0])
        assert torch.equal(out[key][1], batch[key][1])
    assert torch.equal(img[0], image[0]) and torch.count_nonzero(img[1:]) == 0


def test_both_guidance_scales_one_is_the_fully_conditioned_prediction(pipes):
    pipe = ip2p.build_model(tiny_pipeline("sd"))
    _randomize_new_weights(pipe.unet)
    g = torch.Generator().manual_seed(2)
    x_t, c_i, t = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500])
    text, null = sd.encode_prompts(pipe, ["make the circle blue"]), ip2p.null_condition(pipe)
    with torch.no_grad():
        full = sd.unet_predict(pipe.unet, torch.cat([x_t, c_i], 1), t, text, None)
        img = sd.unet_predict(pipe.unet, torch.cat([x_t, c_i], 1), t, null, None)
        none = sd.unet_predict(pipe.unet, torch.cat([x_t, 0 * c_i], 1), t, null, None)
    assert (full - img).abs().max() > 1e-4 and (img - none).abs().max() > 1e-4  # all three differ
    torch.testing.assert_close(ip2p.guided_noise(full, img, none, 1.0, 1.0), full, rtol=0, atol=1e-6)
    # s_T = 0: eps(I, 0); s_I = s_T = 0: eps(0, 0)
    torch.testing.assert_close(ip2p.guided_noise(full, img, none, 1.0, 0.0), img, rtol=0, atol=1e-6)
    torch.testing.assert_close(ip2p.guided_noise(full, img, none, 0.0, 0.0), none, rtol=0, atol=1e-6)


def test_recipe_model_loads_in_diffusers_with_the_same_image(tmp_path, folder):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from customize.inference import instruct_edit

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    import train_instruct_pix2pix

    out = tmp_path / "ip2p"
    train_instruct_pix2pix.main([
        "--pretrained_model_name_or_path", "tiny-sd", "--train_data_dir", str(folder), "--resolution", str(RES),
        "--max_train_steps", "2", "--learning_rate", "1e-3", "--output_dir", str(out), "--report_to", "none",
        "--progress", "false", "--use_ema", "--ema_decay", "0.5", "--train_batch_size", "2",
    ])
    theirs = StableDiffusionInstructPix2PixPipeline.from_pretrained(out, safety_checker=None,
                                                                    requires_safety_checker=False)
    assert theirs.unet.config.in_channels == 8
    assert torch.count_nonzero(theirs.unet.conv_in.weight[:, 4:]) > 0  # it trained (the EMA weights are saved)
    theirs.set_progress_bar_config(disable=True)
    image = Image.open(folder / "00001_input_image.png").convert("RGB")
    expected = theirs("make the circle blue", image=image, num_inference_steps=3, image_guidance_scale=1.5,
                      guidance_scale=7.5, generator=torch.Generator().manual_seed(0)).images[0]
    pipe = ip2p.load_instruct_pipeline(str(out))
    ours = instruct_edit(pipe, image, "make the circle blue", 0, num_inference_steps=3)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))
    plain = instruct_edit(pipe, image, "make the circle blue", 0, num_inference_steps=3, image_guidance_scale=1.0,
                          guidance_scale=1.0)
    assert np.abs(np.asarray(plain, float) - np.asarray(ours, float)).max() > 0  # the scales matter
    # `customize edit --instruction` writes the same image, and a grid over (s_I, s_T)
    from customize.cli import main

    args = ["edit", "-m", str(out), "--instruction", "make the circle blue", "--image",
            str(folder / "00001_input_image.png"), "--steps", "3", "--grid-image-guidance", "1.0", "1.5",
            "--grid-guidance", "1.0", "7.5", "-o", str(tmp_path / "edit"), "--no-progress"]
    assert main(args) == 0
    written = sorted((tmp_path / "edit").iterdir())
    assert main(args) == 1  # the files of an earlier edit are refused without --overwrite
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "edit" / "edit-seed0.png")), np.asarray(expected))
    grid = Image.open(tmp_path / "edit" / "grid-seed0.png")
    assert grid.size == (2 * RES, 2 * RES)
    np.testing.assert_array_equal(np.asarray(grid)[RES:, RES:], np.asarray(expected))  # s_I 1.5, s_T 7.5
    assert json.loads((tmp_path / "edit" / "edit.json").read_text())["instruction"] == "make the circle blue"
    assert len(written) == 4


def test_sdxl_folder_loads_in_diffusers_with_the_same_image(tmp_path, pipes, folder):
    from diffusers import StableDiffusionXLInstructPix2PixPipeline

    from customize.inference import instruct_edit

    pipe = ip2p.build_model(tiny_pipeline("sdxl"))
    _randomize_new_weights(pipe.unet, 1)
    ip2p.save(pipe, _cfg(folder), tmp_path / "xl")
    theirs = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(tmp_path / "xl")
    theirs.set_progress_bar_config(disable=True)
    image = Image.open(folder / "00002_input_image.png").convert("RGB")
    expected = theirs("make the square red", image=image, num_inference_steps=2, height=RES, width=RES, guidance_scale=7.5,
                      generator=torch.Generator().manual_seed(0)).images[0]
    ours = instruct_edit(ip2p.load_instruct_pipeline(str(tmp_path / "xl")), image, "make the square red", 0,
                         num_inference_steps=2)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))
    from customize.models import load_pipeline

    assert isinstance(load_pipeline(str(tmp_path / "xl")), StableDiffusionXLInstructPix2PixPipeline)


# -- bad input ----------------------------------------------------------------------------------------------------


def _copy(folder, dst):
    shutil.copytree(folder, dst)
    return dst


def _rewrite(dst, edit):
    meta = dst / "metadata.jsonl"
    rows = [json.loads(x) for x in meta.read_text().splitlines() if x.strip()]
    edit(rows)
    meta.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_bad_input_is_one_clear_line(tmp_path, pipes, folder):
    from customize.data.images import ImageError
    from customize.inference import instruct_edit

    pipe = ip2p.build_model(tiny_pipeline("sd"))
    image = Image.open(folder / "00000_input_image.png").convert("RGB")
    with pytest.raises(ValueError, match=r"is 31x31, but its sides must be multiples of the VAE's factor 2"):
        instruct_edit(pipe, image.resize((31, 31)), "make it blue", 0, num_inference_steps=1)
    with pytest.raises(ImageError, match="RGBA image with transparency"):
        instruct_edit(pipe, image.convert("RGBA"), "make it blue", 0, num_inference_steps=1)
    with pytest.raises(ValueError, match="the instruction is empty"):
        instruct_edit(pipe, image, "  ", 0, num_inference_steps=1)
    with pytest.raises(ValueError, match="reads 4 input channels, not the 8 of an InstructPix2Pix model"):
        instruct_edit(ip2p.instruct_pipeline(tiny_pipeline("sd")), image, "make it blue", 0)

    def build(d, **kw):
        return ip2p.build_dataset(pipes["sd"], _cfg(d, **kw))

    d = _copy(folder, tmp_path / "column")
    _rewrite(d, lambda rows: rows[1].pop("input_image_file_name"))
    with pytest.raises(ValueError, match=r"line 2: no 'input_image_file_name' column .*--original_image_column"):
        build(d)
    d = _copy(folder, tmp_path / "file")
    (d / "00002_edited_image.png").unlink()
    with pytest.raises(ImageError, match=r"line 3: edited_image_file_name names .* does not exist"):
        build(d)
    d = _copy(folder, tmp_path / "prompt")
    _rewrite(d, lambda rows: rows[0].update(edit_prompt=""))
    with pytest.raises(ValueError, match=r"line 1: the instruction is empty"):
        build(d)
    with pytest.raises(ValueError, match=r"no 'instruction' column .*--edit_prompt_column"):
        build(_copy(folder, tmp_path / "noprompt"), edit_prompt_column="instruction")
    # a datasets-library set without a column names the flag
    from customize.toy import world

    world.to_dataset("edits", 2).save_to_disk(str(tmp_path / "hf"))
    cfg = ip2p.InstructPix2PixConfig(dataset_name=str(tmp_path / "hf"), resolution=RES, output_dir="",
                                     original_image_column="before")
    with pytest.raises(ValueError, match=r"no column 'before'.*--original_image_column"):
        ip2p.build_dataset(pipes["sd"], cfg)
    with pytest.raises(ValueError, match=r"conditioning_dropout_prob must be in \[0, 1/3\]"):
        ip2p.InstructPix2PixConfig(conditioning_dropout_prob=0.5)
    with pytest.raises(ValueError, match="exactly one of --train_data_dir"):
        ip2p.InstructPix2PixConfig(output_dir="").check_inputs()
    # an input image of another size than its edited image
    d = _copy(folder, tmp_path / "size")
    Image.new("RGB", (20, 20)).save(d / "00000_input_image.png")
    with pytest.raises(ImageError, match=r"is 20x20 but the image is 32x32"):
        build(d)[0]


# -- the data recipe: Prompt-to-Prompt pairs ----------------------------------------------------------------------


def test_p2p_pairs_recipe_writes_a_training_folder(tmp_path, pipes):
    from customize.methods import ip2p_data
    from customize.toy import world

    # the scores: exact world pairs pass the probe filter, an edit that did nothing does not
    rows = ip2p_data.toy_rows(6)
    for i, row in enumerate(rows):
        e = world.edit_pair(0, i)
        assert (row["input"], row["edit"], row["output"]) == (world.caption(e.source), e.instruction,
                                                               world.caption(e.target))
        src, tgt = world.render(e.source, 64), world.render(e.target, 64)
        assert ip2p_data.toy_probe_score(src, tgt, row) == 1.0
        assert ip2p_data.toy_probe_score(src, src, row) < 1.0
        assert ip2p_data.pixel_consistency(src, src) == 1.0 and ip2p_data.pixel_consistency(src, tgt) < 1.0
    # word swap -> Replace, added / removed words -> Refine
    from customize.attention import Refine, Replace

    assert isinstance(ip2p_data.controller_for(None, "a red circle", "a blue circle", 0.4, 0.8), Replace)
    assert isinstance(ip2p_data.controller_for(None, "a circle in the center", "a circle at the top left", 0.4, 0.8),
                      Refine)
    # the recipe: rows -> P2P pairs -> a folder the training recipe reads
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    import make_ip2p_pairs

    lines = [{"input": "a red circle", "edit": "make the circle blue", "output": "a blue circle"},
             {"input": "a red square", "edit": "make it a large square", "output": "a large red square"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = make_ip2p_pairs.main(["--pretrained_model_name_or_path", "tiny-sd", "--rows", str(tmp_path / "rows.jsonl"),
                                "--output_dir", str(tmp_path / "pairs"), "--seeds", "0", "--self_replace_steps", "0.5",
                                "--num_inference_steps", "2", "--resolution", str(RES), "--min_score", "0",
                                "--no-progress"])
    meta = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert [m["edit_prompt"] for m in meta] == [x["edit"] for x in lines]
    assert all(0 <= m["score"] <= 1 for m in meta)
    ds = ip2p.build_dataset(pipes["sd"], _cfg(out))
    assert len(ds) == 2 and ds[0][ip2p.ORIGINAL_KEY].shape == (3, RES, RES)
    # nothing passes: a clear error; a bad rows file: one line naming it
    with pytest.raises(ValueError, match="no pair passed the consistency filter"):
        ip2p_data.write_pairs(tmp_path / "none", [])
    (tmp_path / "bad.jsonl").write_text('{"input": "a red circle", "edit": ""}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 1: needs \"input\".*lacks \['output'\]"):
        ip2p_data.read_rows(tmp_path / "bad.jsonl")


def test_p2p_pairs_stop_at_the_first_candidate_at_max_score(pipes):
    """A candidate at max_score cannot be beaten, so its row draws no more (the toy's exact probe filter)."""
    from customize.methods import ip2p_data

    rows = [{"input": "a red circle", "edit": "make the circle blue", "output": "a blue circle"}]
    kept, report = ip2p_data.make_pairs(pipes["sd"], rows, seeds=(0, 1), self_replace_steps=(0.2, 0.5),
                                        score=lambda a, b, row: 1.0, min_score=1.0, max_score=1.0,
                                        num_inference_steps=2, height=RES, width=RES)
    assert len(kept) == 1 and len(report) == 1 and (kept[0]["seed"], kept[0]["self_replace_steps"]) == (0, 0.2)
    _, report = ip2p_data.make_pairs(pipes["sd"], rows, seeds=(0, 1), self_replace_steps=(0.2,),
                                     score=lambda a, b, row: 0.5, min_score=0.0, max_score=1.0,
                                     num_inference_steps=2, height=RES, width=RES)
    assert len(report) == 2  # below max_score: every candidate is drawn


def test_p2p_pairs_draw_every_seed_self_and_cross_fraction_in_order(pipes):
    """cross_replace_steps may list candidates (0 lets a layout edit move the shape): the candidates are the
    product seeds x self x cross in that nesting order, and the kept record and the report name the q drawn."""
    from customize.methods import ip2p_data

    calls = []

    def third_passes(a, b, row):
        calls.append(1)
        return 1.0 if len(calls) == 3 else 0.5

    rows = [{"input": "a red circle", "edit": "make the circle blue", "output": "a blue circle"}]
    kept, report = ip2p_data.make_pairs(pipes["sd"], rows, seeds=(0, 1), self_replace_steps=(0.2, 0.5),
                                        cross_replace_steps=(0.8, 0.0), score=third_passes, min_score=1.0,
                                        max_score=1.0, num_inference_steps=2, height=RES, width=RES)
    assert [(r["seed"], r["self_replace_steps"], r["cross_replace_steps"]) for r in report] == [
        (0, 0.2, 0.8), (0, 0.2, 0.0), (0, 0.5, 0.8)]
    assert len(kept) == 1 and (kept[0]["seed"], kept[0]["self_replace_steps"], kept[0]["cross_replace_steps"]) == (
        0, 0.5, 0.8)
    with pytest.raises(ValueError, match="at least one"):
        ip2p_data.make_pairs(pipes["sd"], rows, seeds=(0,), self_replace_steps=(0.2,), cross_replace_steps=())
