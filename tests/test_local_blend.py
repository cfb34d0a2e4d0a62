"""customize.attention.LocalBlend and the attention heat maps, on the tiny SD pipeline (3 steps, 32 pixels):
threshold above 1 keeps the source latent, threshold 0 is the edit without LocalBlend (bitwise), the mask
follows the blend word's map, the defaults by what the mask marks (changed or kept region), composition with
Reweight, bad blend words."""

import numpy as np
import pytest
import torch

from customize.attention import AttentionStore, LocalBlend, Replace, Reweight
from customize.inference import edit
from tests.lora_helpers import tiny_pipe

STEPS = 3
SOURCE = "a red circle on a blue background"
TARGET = "a red square on a blue background"


@pytest.fixture(scope="module")
def sd():
    return tiny_pipe("sd")


def _latents(sd, controller):
    return edit(sd, SOURCE, TARGET, 0, controller, num_inference_steps=STEPS, output_type="latent")


def test_threshold_above_one_keeps_the_source_latent(sd):
    blend = LocalBlend(["circle", "square"], base=Replace(0.8, 0.4), threshold=1.01, start_blend=0.0)
    source, target = _latents(sd, blend)
    assert torch.equal(source, target)  # every step ends on the source latent
    assert blend.masks is not None and not blend.masks.any()
    images = edit(sd, SOURCE, TARGET, 0, LocalBlend(["circle"], base=Replace(0.8, 0.4), threshold=2.0,
                                                    start_blend=0.0), num_inference_steps=STEPS, output_type="np")
    assert np.array_equal(images[0], images[1])  # the edited image is the source image


def test_threshold_zero_is_the_edit_without_local_blend(sd):
    plain = _latents(sd, Replace(0.8, 0.4))
    blend = LocalBlend(["circle", "square"], base=Replace(0.8, 0.4), threshold=0.0)
    blended = _latents(sd, blend)
    assert all(torch.equal(a, b) for a, b in zip(plain, blended))  # calls it only reads keep SDPA: bitwise
    assert blend.masks.all()
    # without a base: a plain generation of each target, blended; inverted, threshold 0 selects nothing
    inverted = LocalBlend("square", threshold=0.0, invert=True, start_blend=0.0)
    source, target = _latents(sd, inverted)
    assert torch.equal(source, target)


def test_mask_follows_the_blend_words_map_and_composes(sd):
    blend = LocalBlend([["circle"], ["square"]], base=Reweight({"square": 2.0}, base=Replace(0.8, 0.4)),
                       threshold=0.999, start_blend=0.0, dilation=0)
    source, target = _latents(sd, blend)
    side = source.shape[-1]
    masks = blend.word_masks((side, side))
    assert masks.shape == (2, side, side) and masks.any(dim=(1, 2)).all() and not masks.all()
    assert torch.equal(blend.masks[0], masks[0] | masks[1])
    outside = ~blend.masks[0]
    assert torch.equal(target[:, outside], source[:, outside])  # outside the mask: the source latent
    # Reweight outside, LocalBlend inside: the callback and the reset reach the inner controller
    outer = Reweight({"square": 2.0}, base=LocalBlend(["circle", "square"], base=Replace(0.8, 0.4),
                                                      threshold=2.0, start_blend=0.0))
    source, target = _latents(sd, outer)
    assert torch.equal(source, target)


def test_defaults_draw_the_changed_region_generous_and_the_kept_region_tight(sd):
    from customize.attention import BLEND_DILATION, BLEND_THRESHOLD, KEEP_DILATION, KEEP_THRESHOLD

    assert (BLEND_THRESHOLD, BLEND_DILATION, KEEP_THRESHOLD, KEEP_DILATION) == (0.3, 1, 0.4, 0)
    plain, kept = LocalBlend("circle"), LocalBlend("circle", invert=True)
    assert (plain.threshold, plain.dilation, kept.threshold, kept.dilation) == (0.3, 1, 0.4, 0)
    given = LocalBlend("circle", invert=True, threshold=0.3, dilation=1)  # given values apply as given
    assert (given.threshold, given.dilation) == (0.3, 1)
    # the inverted default is exactly the explicit (0.4, 0) blend
    runs = []
    for kw in ({}, {"threshold": 0.4, "dilation": 0}):
        blend = LocalBlend(["circle", "square"], base=Replace(0.8, 0.4), invert=True, start_blend=0.0, **kw)
        runs.append((_latents(sd, blend), blend.masks))
    assert all(torch.equal(a, b) for a, b in zip(*(r[0] for r in runs))) and torch.equal(runs[0][1], runs[1][1])
    # on the same maps, the tight words' mask lies inside the generous one
    side = runs[0][0][0].shape[-1]
    for level in (0.4, 0.99):  # the random model's maps are flat: at 0.4 both masks hold every pixel
        blend.threshold, blend.dilation = level, 0
        tight = blend.word_masks((side, side))
        blend.threshold, blend.dilation = min(level, 0.3), 1
        generous = blend.word_masks((side, side))
        assert tight.any() and not (tight & ~generous).any()
    assert generous.sum() > tight.sum()


def test_bad_blend_words_are_clear_errors(sd):
    with pytest.raises(ValueError, match="blend word 'triangle' is in none of the prompts"):
        _latents(sd, LocalBlend(["triangle"], base=Replace()))
    with pytest.raises(ValueError, match="blend word 'square' is not in the prompt 'a red circle"):
        _latents(sd, LocalBlend([["square"], ["square"]], base=Replace()))
    with pytest.raises(ValueError, match="one list per prompt"):
        _latents(sd, LocalBlend([["circle"]], base=Replace()))
    with pytest.raises(ValueError, match="threshold must be"):
        LocalBlend(["circle"], threshold=float("nan"))
    for bad in (-1, 0.5):
        with pytest.raises(ValueError, match="dilation must be a whole number"):
            LocalBlend(["circle"], dilation=bad)
    with pytest.raises(ValueError, match="raise max_pixels"):
        _latents(sd, LocalBlend(["circle"], base=Replace(), max_pixels=1, start_blend=0.0))


def test_heatmap_row_has_a_tile_per_word_hottest_where_the_map_peaks():
    from PIL import Image

    from customize.plots import PAD, heatmap_row

    maps = np.zeros((3, 8, 8), dtype=np.float32)
    for k, (y, x) in enumerate([(1, 1), (6, 2), (4, 6)]):
        maps[k, y, x] = 1.0
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    tile = 64
    out = heatmap_row(image, maps, ["a", "red", "circle"], tile=tile)
    assert out.width == 2 * PAD + 3 * tile + 2 * 8
    arr = np.asarray(out.convert("L"), dtype=np.float32)
    for k, (y, x) in enumerate([(1, 1), (6, 2), (4, 6)]):
        x0 = PAD + k * (tile + 8)
        cell = arr[PAD:PAD + tile, x0:x0 + tile]
        hy, hx = np.unravel_index(cell.argmax(), cell.shape)
        assert abs(hy - (y + 0.5) * tile / 8) <= tile / 8 and abs(hx - (x + 0.5) * tile / 8) <= tile / 8
    with pytest.raises(ValueError, match="2 labels"):
        heatmap_row(image, maps, ["a", "b"])


def test_attention_heatmaps_of_an_edit(sd):
    from customize.attention import attention_heatmaps, word_maps

    store = AttentionStore(max_pixels=256)
    images = edit(sd, SOURCE, TARGET, 0, store, num_inference_steps=STEPS)
    words, maps = word_maps(store, sd.tokenizer, SOURCE)
    assert words == SOURCE.split() and maps.shape[0] == len(words) and (maps >= 0).all()
    picture = attention_heatmaps(store, sd.tokenizer, SOURCE, images[0], tile=32)
    assert picture.width >= len(words) * 32


def test_p2p_cases_swap_one_attribute():
    from customize.toy import quality, world

    for kind in quality.P2P_KINDS:
        cases = quality.p2p_cases(kind, 6, seed=1)
        assert cases == quality.p2p_cases(kind, 6, seed=1) and len(cases) == 6
        for source, target, src, tgt in cases:
            assert len(source.split()) == len(target.split())  # a word swap: Replace applies
            assert [a for a in src if src[a] != tgt[a]] == [kind]
            assert src["colour"] != src["background"] and tgt["colour"] != tgt["background"]
            assert world.parse_caption(target)[kind] == tgt[kind]
    with pytest.raises(ValueError, match="unknown edit kind"):
        quality.p2p_cases("size", 1)


def test_p2p_real_cases_swap_one_word_of_a_rendered_scene(sd):
    """The real-image P2P cases (bench/toy_quality.py p2p-real-*): held-out scenes, the full caption with one word
    swapped; the scorer runs end to end (random tiny model: the code path, not the scores)."""
    import dataclasses

    from customize.attention import Replace
    from customize.toy import quality, world

    for kind in quality.P2P_KINDS:
        cases = quality.p2p_real_cases(kind, 4, seed=1)
        for (scene, prompt, target, target_prompt), (_, held) in zip(cases, world.heldout_prompts(4, seed=1)):
            assert (scene, prompt) == (held, world.caption(held))
            assert getattr(target, kind) != getattr(scene, kind) and target.colour != target.background
            assert dataclasses.replace(target, **{kind: getattr(scene, kind)}) == scene
            swapped = [(a, b) for a, b in zip(prompt.split(), target_prompt.split()) if a != b]
            assert len(prompt.split()) == len(target_prompt.split()) and len(swapped) == 1
    cache = {}
    scores = quality.p2p_real_edit_scores(sd, "colour", lambda s, t: Replace(0.8, 0.4), ["ddim"], n=1,
                                          num_inference_steps=STEPS, inversions=cache)
    assert list(cache) == [("ddim", 0, 0)] and len(scores["images"]["ddim"][0]) == 4
    assert all(0 <= scores[f"ddim{x}_preserved"] <= 1 for x in ("", "_regen", "_recon"))
