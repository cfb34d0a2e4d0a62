"""The probes are accurate on the world's own images (ground truth known), sharp and degraded like generated
images, so a probe-scored model result means what it says."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from customize.toy import probes, world

ATTRS = ("background", "colour", "shape", "position", "size", "style")


def _scenes():
    rng = lambda i, s: world.scene_rng(11, i, s)  # noqa: E731
    base = [world.sample_scene(rng(i, "base"), "all") for i in range(150)]
    subject = [world.sample_scene(rng(i, "subject"), "all", shapes=(world.SUBJECT.shape,), colours=tuple(world.PALETTE))
               for i in range(50)]
    styled = [world.sample_scene(rng(i, "style"), "all", shapes=world.ALL_SHAPES, colours=world.STYLE.colours,
                                 backgrounds=world.STYLE.colours, style=world.STYLE.name) for i in range(100)]
    return base + subject + styled


def _blur_and_noise(img, i):
    """What a small generator's output looks like: soft edges and a little colour noise."""
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32)
    arr = arr + np.random.default_rng(i).normal(0, 10, arr.shape)
    return np.clip(arr, 0, 255)


def _accuracy(scenes, transform):
    hits = {k: 0 for k in ATTRS}
    ious = []
    for i, s in enumerate(scenes):
        r = probes.read(transform(world.render(s), i))
        truth = {"background": s.background, "colour": s.colour, "shape": s.shape, "position": s.position,
                 "size": s.size, "style": s.style is not None}
        for k in ATTRS:
            hits[k] += getattr(r, k) == truth[k]
        ious.append(probes.mask_iou(r.mask, world.shape_mask(s)))
    return {k: v / len(scenes) for k, v in hits.items()}, float(np.mean(ious))


@pytest.mark.parametrize("name,transform", [("sharp", lambda im, i: im), ("degraded", _blur_and_noise)])
def test_probe_accuracy_on_world_images(name, transform):
    acc, iou = _accuracy(_scenes(), transform)
    assert min(acc.values()) >= 0.95, (name, acc)
    assert iou >= 0.9, (name, iou)


def test_probe_separates_subject_and_style_from_the_base_concepts():
    subject = probes.read(world.render(world.subject_scenes(1)[0]))
    assert (subject.shape, subject.colour) == (world.SUBJECT.shape, world.SUBJECT.colour) and not subject.style
    plain = world.Scene("circle", "red", "blue", "large", "center")
    assert not probes.read(world.render(plain)).style
    from dataclasses import replace

    striped = probes.read(world.render(replace(plain, style=world.STYLE.name)))
    assert striped.style and striped.shape == "circle" and striped.colour == "red"
    assert striped.style_score > 10 * probes.read(world.render(plain)).style_score + 1


def test_probe_reports_nothing_on_an_empty_or_noise_image():
    flat = Image.new("RGB", (32, 32), world.PALETTE["green"])
    r = probes.read(flat)
    assert r.background == "green" and not r.found and r.shape is None and r.colour is None
    grey_noise = np.clip(np.random.default_rng(0).normal(128, 4, (32, 32, 3)), 0, 255)
    assert not probes.read(grey_noise).found


def test_probe_works_at_other_resolutions():
    scene = world.Scene("triangle", "yellow", "black", "small", "top right", jitter=(0.5, -0.5))
    for size in (32, 64):
        r = probes.read(world.render(scene, size))
        assert (r.shape, r.colour, r.background, r.position, r.size) == ("triangle", "yellow", "black", "top right", "small")
        assert probes.mask_iou(r.mask, world.shape_mask(scene, size)) > 0.9


def test_nearest_colour_snaps_drifted_colours():
    drifted = np.asarray([[200, 60, 60], [60, 150, 80], [60, 90, 200], [230, 230, 230]], dtype=np.float32)
    names = [tuple(world.PALETTE)[i] for i in probes.nearest_colour(drifted)]
    assert names == ["red", "green", "blue", "white"]
