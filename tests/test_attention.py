"""customize.attention (controlled processors, Prompt-to-Prompt controllers, token mappers) and
customize.inference.edit, on the tiny SD and SDXL pipelines (3 steps, 32 pixels)."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from customize.attention import (AttentionStore, Controller, Refine, Replace, Reweight,
                                 controlled_layers, install, refine_mapper, replace_mapper)
from customize.inference import edit, generate
from tests.lora_helpers import tiny_pipe

STEPS = 3
SOURCE = "a red circle on a blue background"
TARGET = "a red square on a blue background"


def _pixels(images):
    return [np.asarray(im.convert("RGB")).astype(int) for im in images]


def _within_one_level(a, b):
    """One seed's image in two batch shapes or through the explicit attention path: float rounding moves a
    pixel by at most one 8-bit level (tests/test_inference.py's rule)."""
    return np.abs(a - b).max() <= 1


@pytest.fixture(scope="module")
def sd():
    return tiny_pipe("sd")


@pytest.fixture(scope="module")
def sdxl():
    return tiny_pipe("sdxl")


class _Identity(Controller):
    """Edits (the explicit path computes the output) but returns the maps unchanged, on every layer."""

    def prepare(self, tokenizer, prompts, num_steps):
        super().prepare(tokenizer, prompts, num_steps)
        self.calls = 0

    def __call__(self, probs, is_cross, place, name, step):
        self.calls += 1
        return probs


def test_store_reproduces_the_unhooked_pipeline_and_the_explicit_path_matches_sdpa(sd):
    plain = generate(sd, [SOURCE, TARGET], [0, 0], num_inference_steps=STEPS, output_type="np")
    store = AttentionStore(self_attention=True, max_pixels=256)
    stored = edit(sd, SOURCE, TARGET, 0, store, num_inference_steps=STEPS, output_type="np")
    assert max(np.abs(a - b).max() for a, b in zip(plain, stored)) == 0  # an observer: bitwise the same
    maps = store.maps()
    cross = [k for k in maps if ".attn2." in k]
    assert len(cross) == 4 and len(maps) == 8  # every layer of the tiny UNet is at <= 16x16 = 256 pixels
    assert all(store.counts[k] == STEPS for k in maps)
    for k in cross:  # (CFG rows, N, L), rows of probabilities
        assert maps[k].shape[0] == 4 and maps[k].shape[2] == sd.tokenizer.model_max_length
        torch.testing.assert_close(maps[k].sum(-1), torch.ones(maps[k].shape[:2]))
    assert store.cross_maps().shape == (4, 77, 16, 16)

    ident = _Identity()
    explicit = edit(sd, SOURCE, TARGET, 0, ident, num_inference_steps=STEPS, output_type="np")
    diff = max(np.abs(a - b).max() for a, b in zip(plain, explicit))
    assert ident.calls == 8 * STEPS and diff < 1e-5, diff  # softmax(QK^T/sqrt(d)) V vs SDPA: float rounding


@pytest.mark.parametrize("targets", [[TARGET], [TARGET, "a blue square on a red background"]])
def test_source_row_of_an_edit_is_the_plain_generation(sd, targets):
    plain = _pixels(generate(sd, SOURCE, [5], num_inference_steps=STEPS))[0]
    out = _pixels(edit(sd, SOURCE, targets, 5, Replace(cross_replace_steps=1.0, self_replace_steps=1.0,
                                                       self_max_pixels=256), num_inference_steps=STEPS))
    assert len(out) == 1 + len(targets)
    assert _within_one_level(out[0], plain), np.abs(out[0] - plain).max()
    # ... while the target is edited: not the plain target image
    plain_target = _pixels(generate(sd, TARGET, [5], num_inference_steps=STEPS))[0]
    assert np.abs(out[1] - plain_target).max() > 1


def test_no_replacement_steps_give_the_plain_target(sd):
    plain = _pixels(generate(sd, [TARGET, "a blue circle on a red background"], [7, 7], num_inference_steps=STEPS))
    out = _pixels(edit(sd, SOURCE, [TARGET, "a blue circle on a red background"], 7,
                       Replace(cross_replace_steps=0.0, self_replace_steps=0.0), num_inference_steps=STEPS))
    for a, b in zip(out[1:], plain):
        assert _within_one_level(a, b), np.abs(a - b).max()
    assert controlled_layers(sd.unet) == []  # processors put back
    assert all(type(p) is AttnProcessor2_0 for p in sd.unet.attn_processors.values())


def test_mappers_identity_and_alignment(sd):
    tok = sd.tokenizer
    assert torch.equal(replace_mapper(tok, SOURCE, SOURCE), torch.eye(77))
    assert torch.equal(refine_mapper(tok, SOURCE, SOURCE), torch.arange(77))
    # a swap of one token for seven ("circle" -> "rectangle" in this tokenizer): each of the seven target tokens
    # takes the circle's map, the words after follow, shifted by six
    a = replace_mapper(tok, "a red circle", "a red rectangle")
    assert torch.equal(a[:, 3:10], torch.zeros(77, 7).index_fill_(0, torch.tensor([3]), 1.0))
    assert a[4, 10] == 1 and a[5, 11] == 1 and a[70, 76] == 1  # the end token and padding
    torch.testing.assert_close(a.sum(0), torch.ones(77))  # every target token gets one map's worth
    # an added word: its tokens are new (-1), the others follow their source tokens
    m = refine_mapper(tok, "a circle on a blue background", "a red circle on a blue background")
    assert m[:8].tolist() == [0, 1, -1, 2, 3, 4, 5, 6] and m[8] == 7 and m[76] == 75


def test_bad_prompts_are_clear_errors(sd):
    with pytest.raises(ValueError, match="use Refine"):
        edit(sd, SOURCE, "a red square on a bright blue background", 0, Replace(), num_inference_steps=1)
    with pytest.raises(ValueError, match="in no target prompt"):
        edit(sd, SOURCE, TARGET, 0, Reweight({"green": 2.0}), num_inference_steps=1)
    with pytest.raises(ValueError, match="in no target prompt"):
        edit(sd, SOURCE, TARGET, 0, Replace({"default_": 0.5, "green": 0.2}), num_inference_steps=1)
    with pytest.raises(ValueError, match="tokens long"):
        edit(sd, SOURCE, " ".join(["dog"] * 80), 0, Refine(), num_inference_steps=1)
    with pytest.raises(ValueError, match="self_replace_steps"):
        Replace(self_replace_steps=1.5)
    assert controlled_layers(sd.unet) == []


def test_only_the_layers_a_controller_needs_get_the_explicit_processor(sd):
    unet = sd.unet
    cross = {k for k in unet.attn_processors if ".attn2." in k}
    prompts = [SOURCE, TARGET]

    def layers(controller):
        controller.prepare(sd.tokenizer, prompts, 10)
        before = install(unet, controller, latent_size=(16, 16))
        try:
            procs = unet.attn_processors
            assert all(isinstance(procs[k], AttnProcessor2_0) for k in procs if k not in controlled_layers(unet))
            return set(controlled_layers(unet))
        finally:
            unet.set_attn_processor(before)

    assert layers(Replace(cross_replace_steps=0.8, self_replace_steps=0.0)) == cross
    # the tiny UNet at 16x16 latents: down_blocks.0 and up_blocks.1 at 256 pixels, the mid block at 64
    assert layers(Replace(0.8, 0.4, self_max_pixels=64)) == cross | {
        "mid_block.attentions.0.transformer_blocks.0.attn1.processor"}
    assert len(layers(Replace(0.8, 0.4, self_max_pixels=256))) == 8
    assert layers(Replace(0.0, 0.0)) == set()
    assert layers(Reweight({"red": 2.0})) == cross
    assert layers(AttentionStore(max_pixels=64)) == {"mid_block.attentions.0.transformer_blocks.0.attn2.processor"}


def test_schedules_per_word_and_reweight(sd):
    r = Replace(cross_replace_steps={"default_": 1.0, "square": (0.0, 0.5)}, self_replace_steps=0.3)
    r.prepare(sd.tokenizer, [SOURCE, TARGET], 10)
    alpha = r.cross_alpha[0]  # (T, L)
    assert alpha[:, 3].tolist() == [1.0] * 5 + [0.0] * 5  # "square" (position 3): the first half only
    assert alpha[:, 2].tolist() == [1.0] * 10
    assert r.self_on.tolist() == [True] * 3 + [False] * 7
    assert not r.wants(True, "up", "x", 10, 64) and r.wants(False, "up", "x", 2, 1024)
    assert not r.wants(False, "up", "x", 2, 1025) and not r.wants(False, "up", "x", 3, 64)

    # Reweight after a base: the base's maps, the word's columns scaled, the source row untouched
    rw = Reweight({"red": 3.0}, base=Replace(1.0, 0.0))
    rw.prepare(sd.tokenizer, [SOURCE, SOURCE], 4)
    probs = torch.rand(4, 2, 16, 77).softmax(-1)  # (CFG rows, heads, N, L)
    out = rw(probs, True, "up", "x", 0)
    torch.testing.assert_close(out[:3], probs[:3])
    expected = probs[2].clone()
    expected[..., 2] *= 3.0
    torch.testing.assert_close(out[3], expected)

    # Refine: aligned tokens take the source's maps, the new word keeps its own
    rf = Refine(1.0, 0.0)
    rf.prepare(sd.tokenizer, ["a circle", "a red circle"], 4)
    out = rf(probs, True, "up", "x", 0)
    torch.testing.assert_close(out[3][..., [0, 1, 3]], probs[2][..., [0, 1, 2]])
    torch.testing.assert_close(out[3][..., 2], probs[3][..., 2])


def test_sdxl_edit_source_is_the_plain_generation(sdxl):
    plain = _pixels(generate(sdxl, [SOURCE, TARGET], [3, 3], num_inference_steps=STEPS))
    out = _pixels(edit(sdxl, SOURCE, TARGET, 3, Replace(1.0, 1.0, self_max_pixels=64),
                       num_inference_steps=STEPS))
    assert _within_one_level(out[0], plain[0]), np.abs(out[0] - plain[0]).max()
    # the target edited: the tiny random SDXL UNet barely reads its prompt (plain source and target differ by
    # 0.008 on average in [0, 1]), so the check is in float: measured 4e-4, float rounding ~1e-6
    floats = [generate(sdxl, TARGET, [3], num_inference_steps=STEPS, output_type="np")[0],
              edit(sdxl, SOURCE, TARGET, 3, Replace(1.0, 1.0, self_max_pixels=64), num_inference_steps=STEPS,
                   output_type="np")[1]]
    assert np.abs(floats[0] - floats[1]).mean() > 1e-4
    none = _pixels(edit(sdxl, SOURCE, TARGET, 3, Replace(0.0, 0.0), num_inference_steps=STEPS))
    assert _within_one_level(none[1], plain[1])  # pooled embeddings and time ids follow the target's row
    assert controlled_layers(sdxl.unet) == []
