"""customize.toy.grounding: which caption words are grounded where, the grounding loss against hand-computed
values, the recording processor as a pure observer, and the toy base's training step with the loss on."""

import pytest
import torch

from customize.toy import experiments, grounding, quality, world
from customize.toy.grounding import BACKGROUND, SHAPE, UNGROUNDED


def test_word_regions_ground_the_shape_words_and_the_background_words():
    text = "a large red circle at the top left on a blue background"
    regions = grounding.word_regions(text, 24)
    expected = [UNGROUNDED] * 24
    expected[2:5] = [SHAPE] * 3  # large red circle (position 0 is the start token)
    expected[11:13] = [BACKGROUND] * 2  # blue background
    assert regions.tolist() == expected
    # the same colour word is the shape's before "on" and the background's after it
    assert grounding.word_regions("a red shape on a red background", 10).tolist() == [0, 0, 1, 1, 0, 0, 2, 2, 0, 0]
    assert grounding.word_regions("", 8).tolist() == [0] * 8
    assert grounding.word_regions("a red circle on a blue background", 5).tolist() == [0, 0, 1, 1, 0]  # truncated
    with pytest.raises(ValueError, match="two 'on'"):
        grounding.word_regions("a red circle on a blue background on a mat", 24)


def test_position_grounding_adds_the_position_words_to_the_shape_only():
    text = "a large red circle at the top left on a blue background"
    plain, with_position = grounding.word_regions(text, 24), grounding.word_regions(text, 24, position=True)
    changed = (plain != with_position).nonzero().flatten().tolist()
    assert changed == [7, 8] and with_position[7:9].tolist() == [SHAPE, SHAPE]  # "top left"; "at the" are not
    centre = grounding.word_regions("a red square in the center on a green background", 24, position=True)
    assert centre[1:11].tolist() == [0, 1, 1, 0, 0, 1, 0, 0, 2, 2]  # a red square in the center on a green background
    assert grounding.POSITION_WORDS == {"top", "bottom", "left", "right", "center"}


def test_every_base_caption_word_is_one_token_so_word_positions_are_token_positions():
    from customize.toy.tokenizer import toy_tokenizer

    tok = toy_tokenizer()
    for i in range(200):
        text = world.base_example(0, i)[1]
        ids = tok(text).input_ids
        assert len(ids) == len(text.split()) + 2, text  # start + one token per word + end


def _uniform(b, n, l):
    return torch.full((b, n, l), 1.0 / l)


def test_grounding_loss_matches_the_hand_computed_shares():
    masks = torch.zeros(2, 8, 8)
    masks[0, :4, :4] = 1.0  # a quarter of image 0 is shape
    masks[1, :, :4] = 1.0  # half of image 1
    regions = torch.zeros(2, 5, dtype=torch.long)
    regions[0, 1], regions[0, 2] = SHAPE, BACKGROUND
    regions[1, 3] = SHAPE
    # uniform attention: a word's share inside a region is the region's area
    loss = grounding.grounding_loss([_uniform(2, 16, 5)], masks, regions)  # a 4x4 layer: the mask area-averaged
    want = ((1 - 0.25) ** 2 + (1 - 0.75) ** 2 + (1 - 0.5) ** 2) / 3
    torch.testing.assert_close(loss, torch.tensor(want))
    # per-example weights scale each example's words; two layers are averaged
    w = torch.tensor([0.0, 2.0])
    both = grounding.grounding_loss([_uniform(2, 16, 5), _uniform(2, 4, 5)], masks, regions, w)
    torch.testing.assert_close(both, torch.tensor(2.0 * (1 - 0.5) ** 2 / 3))
    # attention entirely inside each word's region: zero loss
    p = torch.zeros(2, 64, 5)
    inside = masks.flatten(1) > 0  # (2, 64)
    p[..., 0] = 1.0
    p[0, :, 1] = inside[0] / inside[0].sum()
    p[0, :, 2] = (~inside[0]) / (~inside[0]).sum()
    p[1, :, 3] = inside[1] / inside[1].sum()
    assert grounding.grounding_loss([p], masks, regions).item() == pytest.approx(0.0, abs=1e-7)
    # no grounded word (empty captions): zero, not NaN
    assert grounding.grounding_loss([p], masks, torch.zeros_like(regions)).item() == 0.0


def test_grounding_loss_gradient_moves_attention_into_the_region():
    masks = torch.zeros(1, 4, 4)
    masks[0, :2] = 1.0
    logits = torch.zeros(1, 16, 3, requires_grad=True)
    regions = torch.tensor([[UNGROUNDED, SHAPE, BACKGROUND]])
    loss = grounding.grounding_loss([logits.softmax(-1)], masks, regions)
    loss.backward()
    g = logits.grad[0]  # (16, 3): descent raises the shape word's logits inside the shape, lowers them outside
    assert (g[:8, 1] < 0).all() and (g[8:, 1] > 0).all()
    assert (g[:8, 2] > 0).all() and (g[8:, 2] < 0).all()


needs_base = pytest.mark.skipif(not experiments.base_available(), reason="no toy base model in data/toy/base")


@needs_base
def test_recorder_leaves_images_unchanged_and_records_attention_distributions():
    from diffusers.models.attention_processor import AttnProcessor

    torch.set_num_threads(1)
    pipe = experiments.load_base()
    prompts = [p for p, _ in world.heldout_prompts(2)]
    pipe.unet.set_attn_processor(AttnProcessor())
    plain = quality.sample(pipe, prompts, num_inference_steps=4)
    store = {}
    before = grounding.record_cross_attention(pipe.unet, store)
    recorded = quality.sample(pipe, prompts, num_inference_steps=4)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(plain, recorded))
    cross = [n for n in pipe.unet.attn_processors if "attn2" in n]
    assert sorted(store) == sorted(cross)  # cross-attention layers only, every one
    for steps in store.values():
        assert len(steps) == 4  # one record per sampling step
        probs = steps[0]  # (2 prompts x (unconditional, conditional), N pixels, L tokens)
        assert probs.shape[0] == 4 and probs.shape[2] == pipe.tokenizer.model_max_length
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]))
    pipe.unet.set_attn_processor(before)
    assert all(type(p) is AttnProcessor for p in pipe.unet.attn_processors.values())


@needs_base
def test_toy_base_step_adds_the_weighted_grounding_loss_and_saves_without_recorders(tmp_path):
    from customize.toy import base as toy_base

    torch.set_num_threads(1)
    pipe = experiments.load_base()
    processors = {type(p) for p in pipe.unet.attn_processors.values()}
    cfg = toy_base.ToyBaseConfig(output_dir=str(tmp_path), grounding_loss_weight=0.5, cache_latents=False,
                                 caption_dropout=0.0)
    stage = toy_base.TextUNetStage(pipe.tokenizer, tmp_path / "pipeline")
    data = stage.prepare(pipe, toy_base.ToyImages(4, 0, masks=True), cfg, None)
    batch = stage.collate([data[i] for i in range(4)])
    assert batch["shape_mask"].shape == (4, world.IMAGE_SIZE, world.IMAGE_SIZE)
    assert (batch["token_regions"] == SHAPE).any() and (batch["token_regions"] == BACKGROUND).any()
    torch.manual_seed(0)
    with_grounding = stage.loss(pipe, batch, cfg)
    torch.manual_seed(0)  # the same noise and timesteps: the denoising part is the same
    off = stage.loss(pipe, batch, toy_base.ToyBaseConfig(output_dir=str(tmp_path), cache_latents=False,
                                                          grounding_loss_weight=0.0))
    assert 0 < with_grounding["grounding"] < 1
    torch.testing.assert_close(with_grounding["loss"], off["loss"] + 0.5 * with_grounding["grounding"])
    with_grounding["loss"].backward()
    q = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_q.weight
    assert q.grad is not None and q.grad.abs().sum() > 0  # the loss reaches the queries through the recorded maps
    stage.save(pipe, cfg, tmp_path / "run")
    assert {type(p) for p in pipe.unet.attn_processors.values()} == processors


def test_grounding_settings_are_checked():
    from customize.toy import base as toy_base

    with pytest.raises(ValueError, match="grounding_loss_weight must be >= 0"):
        toy_base.ToyBaseConfig(grounding_loss_weight=-1.0)
    with pytest.raises(ValueError, match="single-shape scenes"):
        toy_base.ToyImages(4, clutter_fraction=0.5, masks=True)
    ex = toy_base.ToyImages(4, masks=True)[0]
    scene, text = world.base_example(0, 0)
    assert ex["text"] == text
    assert torch.equal(ex["shape_mask"], torch.from_numpy(world.coverage(scene)))  # the mask of the scene drawn


def test_position_grounding_option_marks_the_position_captions_and_words(tmp_path):
    from customize.toy import base as toy_base
    from customize.toy.tokenizer import toy_tokenizer

    tok = toy_tokenizer()
    data = toy_base.ToyImages(16, 0, masks=True)
    examples = [data[i] for i in range(16)]
    plain = toy_base.TextUNetStage(tok, tmp_path / "p").collate(examples)
    stage = toy_base.TextUNetStage(tok, tmp_path / "p", ground_position=True)
    batch = stage.collate(examples)
    names = [world.parse_caption(e["text"])["position"] is not None for e in examples]
    assert any(names) and not all(names)  # training captions drop the position half the time
    assert batch["names_position"].tolist() == names
    extra = (batch["token_regions"] != plain["token_regions"]).any(-1).tolist()
    assert extra == names  # only captions naming a position gain grounded words


def test_grounding_weights_by_timestep_and_caption(tmp_path):
    from customize.toy import base as toy_base

    alpha_bar = torch.tensor([0.0, 0.25, 1.0])
    names = torch.tensor([True, False, False])
    cfg = lambda **kw: toy_base.ToyBaseConfig(output_dir=str(tmp_path), pipeline_dir=str(tmp_path / "p"), **kw)  # noqa: E731
    plain = toy_base.grounding_weights(cfg(ground_position=False), alpha_bar, None)
    assert plain.tolist() == [0.0, 0.5, 1.0]  # sqrt(alpha_bar_t): nothing asked at t = T
    assert toy_base.grounding_weights(cfg(ground_position=True), alpha_bar, names).tolist() == [1.0, 0.5, 1.0]
    every = toy_base.grounding_weights(cfg(ground_position=True, ground_every_timestep=True), alpha_bar, names)
    assert every.tolist() == [1.0, 1.0, 1.0]


def test_stage_takes_ground_position_from_the_config_and_refuses_a_mismatch(tmp_path):
    from customize.toy import base as toy_base

    cfg = toy_base.ToyBaseConfig(output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="ground_position"):
        toy_base.TextUNetStage(None, tmp_path / "p", ground_position=not cfg.ground_position).prepare(None, None, cfg, None)
    stage = toy_base.TextUNetStage(None, tmp_path / "p")
    assert stage.ground_position is None
    with pytest.raises(Exception):  # nothing to prepare; the flag is taken first
        stage.prepare(None, None, cfg, None)
    assert stage.ground_position == cfg.ground_position
