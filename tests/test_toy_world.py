"""The toy world: seeded scenes, captions that say what the image shows, held-out concepts kept out, exports that
the `datasets` library reads."""

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from customize.toy import world


def test_examples_are_a_function_of_seed_and_index():
    a = [world.base_example(3, i) for i in range(20)]
    b = [world.base_example(3, i) for i in reversed(range(20))][::-1]
    assert a == b
    assert a != [world.base_example(4, i) for i in range(20)]
    s = a[0][0]
    assert np.array_equal(np.asarray(world.render(s)), np.asarray(world.render(s)))


def test_full_captions_parse_back_to_their_scene():
    for i in range(200):
        scene = world.sample_scene(world.scene_rng(0, i, "t"), "all")
        got = world.parse_caption(world.caption(scene))
        for key in ("shape", "colour", "background", "size", "position"):
            assert got[key] == getattr(scene, key), (key, world.caption(scene))
        assert not got["subject"] and not got["style"]
    sub = world.subject_scenes(1)[0]
    parsed = world.parse_caption(world.caption(sub))
    assert parsed["subject"] and parsed["shape"] == world.SUBJECT.shape and parsed["colour"] == world.SUBJECT.colour


def test_training_captions_never_teach_held_out_words_and_sometimes_use_the_class_word():
    captions = [world.base_example(0, i)[1] for i in range(3000)]
    words = {w for c in captions for w in c.split()}
    assert not words & set(world.HELD_OUT_WORDS)
    generic = sum(f" {world.SUBJECT.class_word} " in f" {c} " for c in captions) / len(captions)
    assert 0.08 < generic < 0.25  # the class word for prior preservation is known to the base
    # every colour, shape and background word is taught
    assert set(world.BASE_COLOURS) | set(world.BASE_SHAPES) <= words


def test_held_out_combinations_never_appear_in_training():
    train = {(s.colour, s.shape, s.background) for s, _ in (world.base_example(0, i) for i in range(3000))}
    assert not train & world.HELD_OUT_COMBOS
    held = {(s.colour, s.shape, s.background) for _, s in world.heldout_prompts(200)}
    assert held <= world.HELD_OUT_COMBOS and len(held) > len(world.HELD_OUT_COMBOS) // 2
    for axis in range(3):  # each held-out combination is made of words seen in training
        assert {c[axis] for c in world.HELD_OUT_COMBOS} <= {c[axis] for c in train}


def test_render_draws_the_scene():
    scene = world.Scene("square", "red", "blue", "large", "center")
    arr = np.asarray(world.render(scene))
    assert tuple(arr[16, 16]) == world.PALETTE["red"]
    assert tuple(arr[0, 0]) == world.PALETTE["blue"]
    mask = world.shape_mask(scene)
    side = 2 * 0.85 * world.SIZES["large"]
    assert abs(mask.sum() - side**2) < 2 * side  # area right up to the anti-aliased edge
    small = world.shape_mask(replace(scene, size="small", position="top left"))
    assert small.sum() < mask.sum() / 2
    ys, xs = np.nonzero(small)
    assert ys.mean() < 16 and xs.mean() < 16
    striped = np.asarray(world.render(replace(scene, style=world.STYLE.name)))
    column = striped[8:24, 16]  # inside the square
    white = (column == world.PALETTE[world.STYLE.stripe_colour]).all(axis=1)
    assert abs(white.mean() - world.STYLE.band / world.STYLE.period) < 0.1
    with pytest.raises(ValueError, match="invisible"):
        world.Scene("circle", "red", "red")


def test_subject_and_style_sets_hold_out_what_they_promise():
    subs = world.subject_scenes(5)
    assert {s.shape for s in subs} == {world.SUBJECT.shape}
    assert {s.background for s in subs} == set(world.SUBJECT.instance_backgrounds)
    assert len({(s.size, s.position, s.jitter) for s in subs}) == 5
    for prompt, want in world.subject_eval_prompts():
        assert want["background"] not in world.SUBJECT.instance_backgrounds
        assert world.parse_caption(prompt)["background"] == want["background"]
    assert {s.shape for s in world.style_scenes(20)} == set(world.STYLE.shapes)
    eval_shapes = {s.shape for s in world.style_eval_scenes(40)}
    assert eval_shapes == set(world.STYLE.unseen_shapes) and not eval_shapes & set(world.STYLE.shapes)
    for s in world.style_scenes(20) + world.style_eval_scenes(20):
        assert world.STYLE.stripe_colour not in (s.colour, s.background)
        assert world.STYLE.identifier in world.STYLE.prompt(s)


def test_subject_folder_lists_each_image_with_and_without_its_layout(tmp_path):
    """Each instance image twice: its full caption, and the subject prompt alone (no size, no position); the
    committed data/toy/subject is exactly that export."""
    from customize.toy import experiments

    folder = world.export("subject", tmp_path / "subject", n=5)
    lines = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
    scenes = world.subject_scenes(5)
    assert len(lines) == 10 and len({r["file_name"] for r in lines}) == 10
    for k, scene in enumerate(scenes):
        full, short = lines[2 * k], lines[2 * k + 1]
        assert full["text"] == world.caption(scene) and short["text"] == world.SUBJECT.prompt(scene.background)
        parsed = world.parse_caption(short["text"])
        assert parsed["subject"] and parsed["size"] is None and parsed["position"] is None
        a, b = (np.asarray(Image.open(folder / r["file_name"]).convert("RGB")) for r in (full, short))
        assert np.array_equal(a, b) and np.array_equal(a, np.asarray(world.render(scene)))
    committed = experiments.SUBJECT_DIR
    assert (committed / "metadata.jsonl").read_text() == (folder / "metadata.jsonl").read_text()
    for r in lines:
        assert (committed / r["file_name"]).read_bytes() == (folder / r["file_name"]).read_bytes()


def test_edit_pairs_change_exactly_what_the_instruction_says():
    kinds = set()
    for i in range(60):
        e = world.edit_pair(0, i)
        kinds.add(e.kind)
        changed = [k for k in ("colour", "background", "size", "position") if getattr(e.source, k) != getattr(e.target, k)]
        assert changed == [e.kind]
        assert e.source.jitter == e.target.jitter and e.source.shape == e.target.shape
        assert str(getattr(e.target, e.kind)) in e.instruction
        assert not np.array_equal(np.asarray(world.render(e.source)), np.asarray(world.render(e.target)))
    assert kinds == set(world.EDIT_KINDS)


def test_control_maps_are_the_mask_and_its_outline():
    scene = world.Scene("triangle", "green", "black", "large", "bottom right")
    mask = world.shape_mask(scene)
    m = np.asarray(world.control_map(scene, "mask"))[..., 0] > 127
    e = np.asarray(world.control_map(scene, "edge"))[..., 0] > 127
    assert np.array_equal(m, mask)
    assert e.sum() > 0 and not (e & ~mask).any() and e.sum() < mask.sum() / 2
    with pytest.raises(ValueError):
        world.control_map(scene, "depth")


def test_exports_load_with_the_datasets_library(tmp_path):
    import datasets

    folder = world.export("base", tmp_path / "base", n=6, seed=1)
    lines = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in lines] == [world.base_example(1, i)[1] for i in range(6)]
    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert len(ds) == 6 and set(ds.column_names) >= {"image", "text", "shape", "colour", "background"}
    row = ds[0]
    want = world.render(world.base_example(1, 0)[0])
    assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(want))

    edits = world.export("edits", tmp_path / "edits", n=4)
    ds = datasets.load_dataset("imagefolder", data_dir=str(edits), split="train")
    assert {"input_image", "edited_image", "edit_prompt"} <= set(ds.column_names)
    e = world.edit_pair(0, 0)
    assert ds[0]["edit_prompt"] == e.instruction
    assert np.array_equal(np.asarray(ds[0]["edited_image"].convert("RGB")), np.asarray(world.render(e.target)))

    ctrl = world.to_dataset("control-mask", n=3)
    assert isinstance(ctrl.features["conditioning_image"], datasets.Image)
    assert ctrl[0]["text"] == world.caption(world.sample_scene(world.scene_rng(0, 0, "control-mask"), "all"))
    with pytest.raises(ValueError, match="unknown toy data set"):
        world.rows("nope", 1)
