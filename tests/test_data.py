"""Datasets, captions, transforms (with SDXL crop conditioning), feature caches and the seeded data stream."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from customize.data import (
    CaptionError,
    ImageCaptionDataset,
    ImageError,
    ImageTransform,
    PairedDataset,
    cache_features,
    collate_examples,
    dreambooth_dataset,
    pil_to_tensor,
    tensor_to_pil,
)
from customize.data.sampling import EpochBatchSampler, SeededDataset, seeded_rng


def _img(path, w=24, h=20, color=None, mode="RGB"):
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr) if color is None else Image.new("RGB", (w, h), color)
    img.convert(mode).save(path)
    return path


def _coordinate_image(w, h):
    """R = x, G = y: every pixel says where it came from."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


def _to_uint8(pixel_values):
    return ((pixel_values + 1) * 127.5).round().to(torch.int64)  # (3, H, W)


def test_captions_from_metadata_jsonl_and_sidecars(tmp_path, caplog):
    for name in ("a.png", "b.png", "c.png"):
        _img(tmp_path / name)
    (tmp_path / "b.txt").write_text("b from txt\n")
    (tmp_path / "c.caption").write_text("c from caption file")
    ds = ImageCaptionDataset.from_folder(tmp_path, 16, prompt="fallback")
    assert [ds.prompt(i) for i in range(3)] == ["fallback", "b from txt", "c from caption file"]

    lines = [{"file_name": "b.png", "text": "b from metadata"}, {"file_name": "a.png", "caption": "a caption"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with caplog.at_level(logging.WARNING):
        ds = ImageCaptionDataset.from_folder(tmp_path, 16)
    assert len(ds) == 2 and [ds.prompt(i) for i in range(2)] == ["b from metadata", "a caption"]
    assert "c.png" in caplog.text  # listed nowhere in metadata.jsonl: left out, loudly

    lines = [{"file_name": "a.png", "tags": "red"}, {"file_name": "c.png", "tags": "blue", "text": "x"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    ds = ImageCaptionDataset.from_folder(tmp_path, 16, caption_column="tags")
    assert [ds.prompt(i) for i in range(2)] == ["red", "blue"]
    ds = ImageCaptionDataset.from_folder(tmp_path, 16, prompt="sks dog", use_captions=False)
    assert [ds[i]["prompt"] for i in range(2)] == ["sks dog", "sks dog"]


def test_use_captions_on_a_folder_without_captions_warns_once(tmp_path, caplog):
    data = tmp_path / "dogs"
    data.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        _img(data / name)
    with caplog.at_level(logging.WARNING, logger="customize.data.datasets"):
        dreambooth_dataset(data, "a photo of sks dog", 16, use_captions=True)
    (record,) = caplog.records
    assert f"no image in {data} has a caption" in record.getMessage() and "'a photo of sks dog'" in record.getMessage()
    (data / "a.txt").write_text("a dog on grass")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="customize.data.datasets"):
        dreambooth_dataset(data, "a photo of sks dog", 16, use_captions=True)
        dreambooth_dataset(data, "a photo of sks dog", 16, use_captions=False)  # the prompt was asked for: silent
    (record,) = caplog.records
    assert f"2 of the 3 images in {data} have no caption" in record.getMessage()


def test_decompression_bomb_is_an_image_error_naming_the_file(tmp_path):
    from test_bad_input_options import _png_declaring

    from customize.data import load_image

    _png_declaring(tmp_path / "huge.png", 30000, 30000)
    with pytest.raises(ImageError, match="huge.png: too large to open safely.*downscale it"):
        load_image(tmp_path / "huge.png")


def test_data_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageCaptionDataset.from_folder(tmp_path / "nope", 16, prompt="p")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="holds no images"):
        ImageCaptionDataset.from_folder(tmp_path / "empty", 16, prompt="p")

    good = tmp_path / "good"
    good.mkdir()
    _img(good / "a.png")
    (good / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n"
                                         + json.dumps({"file_name": "gone.png", "text": "y"}) + "\n")
    with pytest.raises(ImageError, match=r"line 2.*gone\.png"):
        ImageCaptionDataset.from_folder(good, 16)
    (good / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"\n')
    with pytest.raises(CaptionError, match="line 1: not valid JSON"):
        ImageCaptionDataset.from_folder(good, 16)
    (good / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png"}))
    with pytest.raises(CaptionError, match="'tags' column"):
        ImageCaptionDataset.from_folder(good, 16, caption_column="tags")
    with pytest.raises(ValueError, match=r"a\.png has no caption"):
        ImageCaptionDataset.from_folder(good, 16)

    bad = tmp_path / "bad"
    bad.mkdir()
    _img(bad / "ok.png")
    (bad / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = ImageCaptionDataset.from_folder(bad, 16, prompt="p")
    with pytest.raises(ImageError, match=r"broken\.jpg"):
        ds[0]
    assert ds[1]["pixel_values"].shape == (3, 16, 16)


def test_metadata_image_columns_stay_inside_the_folder(tmp_path):
    from customize.data.captions import metadata_rows, read_metadata

    data, other = tmp_path / "data", tmp_path / "other"
    for d in (data, data / "sub", other):
        d.mkdir()
    for path in (data / "a.png", data / "sub" / "b.png", other / "c.png"):
        _img(path)
    meta = data / "metadata.jsonl"
    meta.write_text(json.dumps({"file_name": "sub/../a.png", "conditioning_image_file_name": "./sub/b.png"}) + "\n")
    (_, row), = metadata_rows(data)
    assert row == {"file_name": data / "a.png", "conditioning_image_file_name": data / "sub" / "b.png"}
    for column, name in [("file_name", "../other/c.png"), ("file_name", str(other / "c.png")),
                         ("edited_image_file_name", "sub/../../other/c.png"), ("file_name", 5), ("file_name", None)]:
        row = {"file_name": "a.png", column: name}
        meta.write_text(json.dumps({"file_name": "a.png"}) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(CaptionError, match=rf'line 2: "{column}" '):
            metadata_rows(data)
    meta.write_text("".join(json.dumps({"file_name": n, "text": t}) + "\n" for n, t in [("a.png", "x"), ("./a.png", "y")]))
    with pytest.raises(CaptionError, match=r"line 2: names 'a\.png' again \(line 1"):
        read_metadata(data)
    meta.write_text(json.dumps({"file_name": "../other/c.png", "text": "x"}) + "\n")
    with pytest.raises(CaptionError, match="is outside"):  # a datasets-library imagefolder gets the same rule
        ImageCaptionDataset.from_hf(str(data), 16)


def test_any_image_mode_becomes_rgb_in_range(tmp_path):
    paths = [
        _img(tmp_path / "rgba.png", mode="RGBA"), _img(tmp_path / "l.png", mode="L"),
        _img(tmp_path / "p.png", mode="P"), _img(tmp_path / "cmyk.jpg", mode="CMYK"),
    ]
    Image.fromarray(np.full((20, 24), 65535, dtype=np.uint16)).save(tmp_path / "grey16.png")
    paths.append(tmp_path / "grey16.png")
    ds = ImageCaptionDataset.from_folder(tmp_path, 16, prompt="p", center_crop=True)
    names = [p.name for p in ds._paths]
    for i in range(len(ds)):
        x = ds[i]["pixel_values"]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
    white = ds[names.index("grey16.png")]["pixel_values"]
    assert torch.equal(white, torch.ones_like(white))  # 16-bit full scale is white, not clipped garbage


def test_exif_orientation_is_applied(tmp_path):
    img = _coordinate_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    ex = ImageCaptionDataset.from_folder(tmp_path, 10, prompt="p", center_crop=True)[0]
    assert ex["original_size"].tolist() == [40, 20]  # (h, w) of the upright picture


def test_sdxl_crop_conditioning_is_the_crop_applied():
    """Random crops and flips of a coordinate image: the pixels that come out are exactly those at the reported
    crop (SDXL convention: after a flip, `left` is measured in the flipped image)."""
    w, h, res = 56, 40, 40  # the shorter side is the resolution: no resize, pixels are exact
    img = _coordinate_image(w, h)
    transform = ImageTransform(res, center_crop=False, random_flip=True)
    seen_flips = set()
    for seed in range(12):
        import random

        random.seed(seed)
        ex = transform(img)
        top, left = ex["crop_top_left"].tolist()
        assert ex["original_size"].tolist() == [h, w] and ex["target_size"].tolist() == [res, res]
        out = _to_uint8(ex["pixel_values"])  # (3, res, res)
        flipped = bool(out[0, 0, 0] > out[0, 0, 1])
        seen_flips.add(flipped)
        cols = torch.arange(res)
        expected_x = (w - left - 1 - cols) if flipped else (left + cols)
        assert torch.equal(out[0], expected_x.expand(res, res)), (seed, flipped)
        assert torch.equal(out[1], (top + torch.arange(res)).unsqueeze(1).expand(res, res))
    assert seen_flips == {True, False}

    for target, corner in (((40, 30), [0, 13]), ((36, 56), [2, 0])):  # (h, w) targets that need no resize
        ex = ImageTransform(target, center_crop=True)(img)
        assert ex["crop_top_left"].tolist() == corner and ex["target_size"].tolist() == list(target)
        assert _to_uint8(ex["pixel_values"])[:2, 0, 0].tolist() == corner[::-1]  # (R, G) = (x, y) of the corner
    # With a resize (shorter side 80 -> 32, so x 2.5) the crop is reported in resized pixels.
    res = 32
    big = _coordinate_image(120, 80)
    ex = ImageTransform(res, center_crop=True)(big)
    top, left = ex["crop_top_left"].tolist()
    assert ex["original_size"].tolist() == [80, 120] and (top, left) == (0, 8)
    out = _to_uint8(ex["pixel_values"])
    assert abs(out[0, 0, res // 2].item() - (left + res // 2 + 0.5) * 2.5) <= 2


def test_pixel_range_round_trip():
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = pil_to_tensor(Image.fromarray(arr))
    assert x.shape == (3, 5, 7) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_pil(x)), arr)


def test_dreambooth_pairs_and_collate(tmp_path):
    inst, cls = tmp_path / "inst", tmp_path / "cls"
    inst.mkdir(), cls.mkdir()
    for i in range(2):
        _img(inst / f"i{i}.png")
    for i in range(5):
        _img(cls / f"c{i}.png")
    ds = dreambooth_dataset(inst, "a photo of sks dog", 16, class_data_dir=cls, class_prompt="a photo of dog",
                            center_crop=True)
    assert len(ds) == 5  # every class image once per epoch; instance images cycle
    batch = collate_examples([ds[0], ds[3]])
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["prompt"] == ["a photo of sks dog"] * 2 + ["a photo of dog"] * 2
    assert batch["num_prior"] == 2
    assert torch.equal(batch["pixel_values"][1], ds.instance[1]["pixel_values"])  # 3 % 2
    assert torch.equal(batch["pixel_values"][3], ds.class_data[3]["pixel_values"])
    assert batch["original_size"].shape == (4, 2)
    solo = PairedDataset(ds.instance)
    assert len(solo) == 2 and collate_examples([solo[0]])["num_prior"] == 0
    with pytest.raises(ValueError, match="class prompt"):
        dreambooth_dataset(inst, "sks", 16, class_data_dir=cls)

    # captioned class images (kohya's regularization folders): with use_captions a .txt beside a class image is its
    # prompt, the others keep the class prompt; without, every class image gets the class prompt
    (cls / "c1.txt").write_text("a photo of dog on a beach")
    captioned = dreambooth_dataset(inst, "a photo of sks dog", 16, class_data_dir=cls, class_prompt="a photo of dog",
                                   use_captions=True)
    assert [captioned.class_data.prompt(i) for i in range(2)] == ["a photo of dog", "a photo of dog on a beach"]
    plain = dreambooth_dataset(inst, "a photo of sks dog", 16, class_data_dir=cls, class_prompt="a photo of dog")
    assert plain.class_data.prompt(1) == "a photo of dog"


def test_datasets_library_source(tmp_path):
    import datasets

    images = [_coordinate_image(30, 20), _coordinate_image(20, 30)]
    table = datasets.Dataset.from_dict({"img": images, "caption": ["wide", "tall"]})
    table = table.cast_column("img", datasets.Image())
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "dd"))
    ds = ImageCaptionDataset.from_hf(str(tmp_path / "dd"), 16, image_column="img", caption_column="caption",
                                     center_crop=True)
    assert len(ds) == 2 and ds[1]["prompt"] == "tall" and ds[1]["original_size"].tolist() == [30, 20]
    with pytest.raises(KeyError, match=r"'text'.*\['img', 'caption'\]"):
        ImageCaptionDataset.from_hf(str(tmp_path / "dd"), 16, image_column="img", caption_column="text")


def test_feature_cache_flips_disk_and_rng(tmp_path):
    for i in range(3):
        _img(tmp_path / f"{i}.png", w=20, h=16)
    ds = ImageCaptionDataset.from_folder(tmp_path, 16, prompt="p", random_flip=True)
    calls = []

    def encode(batch):
        calls.append(len(batch["prompt"]))
        return {"feat": batch["pixel_values"][:, :, :, :4] * 2}  # (B, 3, 16, 4): left edge

    rng_before = torch.get_rng_state()
    cached = cache_features(ds, encode, batch_size=4, cache_file=tmp_path / "cache.safetensors",
                            fingerprint="model-a")
    assert torch.equal(torch.get_rng_state(), rng_before), "building the cache must not draw from the global RNG"
    assert sum(calls) == 6  # both flips of 3 examples
    plain, mirrored = cached.variants[0]
    assert "pixel_values" not in plain and plain["prompt"] == "p"
    # Same random crop for both versions: the flipped one's crop_top_left is the mirror of the plain one.
    assert plain["crop_top_left"][1] + mirrored["crop_top_left"][1] == 20 - 16
    kept = cache_features(ds, encode, drop=())
    for plain_i, mirrored_i in kept.variants:
        assert torch.equal(mirrored_i["pixel_values"], plain_i["pixel_values"].flip(-1))
        assert torch.equal(plain_i["feat"], plain_i["pixel_values"][:, :, :4] * 2)
    calls.clear()
    picks = {bool(torch.equal(SeededDataset(cached)[(0, s)]["feat"], plain["feat"])) for s in range(16)}
    assert picks == {True, False}, "training must see both flips"

    again = cache_features(ds, encode, cache_file=tmp_path / "cache.safetensors", fingerprint="model-a")
    assert sum(calls) == 0, "a matching cache file must be reused"
    assert all(torch.equal(a["feat"], b["feat"]) and a["prompt"] == b["prompt"]
               for va, vb in zip(cached.variants, again.variants) for a, b in zip(va, vb))
    cache_features(ds, encode, cache_file=tmp_path / "cache.safetensors", fingerprint="model-b")
    assert sum(calls) == 6, "another fingerprint must recompute"
    one = cache_features(ds, encode, both_flips=False)
    assert all(len(v) == 1 for v in one.variants)


class _Augmented(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        import random

        return {"i": i, "noise": torch.randn(2), "coin": random.random()}


def test_seeded_stream_order_sharding_skip_and_workers():
    n, b = 10, 2
    one = EpochBatchSampler(n, b, seed=3)
    one.set_epoch(1)
    epoch1 = [i for batch in one for i, _ in batch]
    assert sorted(epoch1) == list(range(n))
    one.set_epoch(2)
    assert [i for batch in one for i, _ in batch] != epoch1, "each epoch is reshuffled"
    # Two ranks split every global batch of 2 x 2 (padded by wrapping to 12 positions).
    ranks = [EpochBatchSampler(n, b, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for r in ranks:
        r.set_epoch(1)
    pos = [[i for batch in r for i, _ in batch] for r in ranks]
    order = ranks[0].epoch_order(1)
    assert len(order) == 12 and order[:n] == epoch1
    assert pos[0] == [order[k] for k in (0, 1, 4, 5, 8, 9)] and pos[1] == [order[k] for k in (2, 3, 6, 7, 10, 11)]
    # A resumed epoch replays the same tail, item seeds included.
    full = list(one)
    one.set_epoch(2, skip=3)
    assert list(one) == full[3:]

    def batches(workers):
        sampler = EpochBatchSampler(n, b, seed=0)
        loader = DataLoader(SeededDataset(_Augmented()), batch_sampler=sampler, num_workers=workers,
                            generator=torch.Generator().manual_seed(0))
        return list(loader)

    serial, parallel = batches(0), batches(2)
    for s, p in zip(serial, parallel):
        assert torch.equal(s["noise"], p["noise"]) and torch.equal(s["coin"], p["coin"])
    assert not torch.equal(serial[0]["noise"][0], serial[0]["noise"][1])


def test_seeded_rng_draws_from_the_seed_and_restores_the_streams():
    import random

    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    outside = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    with seeded_rng(123):
        inside = (torch.rand(3), np.random.rand(3), random.random())
    after = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(inside[0], torch.rand(3, generator=torch.Generator().manual_seed(123)))
    assert np.array_equal(inside[1], np.random.RandomState(123).rand(3)) and inside[2] == random.Random(123).random()
    assert torch.equal(after[0], outside[0]) and np.array_equal(after[1], outside[1]) and after[2] == outside[2], \
        "the surrounding streams go on as if the block had not run"
