"""customize.inference.generate, the one seeded sampling function, on the tiny SD and SDXL pipelines (2 steps,
32 pixels) and on a stand-in pipeline that records what it is called with."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from customize.inference import generate

PROMPTS = ["a photo of a dog", "a red circle", "a blue square"]
STEPS = 2


def _pixels(images) -> list[np.ndarray]:
    return [np.asarray(im.convert("RGB")).astype(int) for im in images]


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """The project's rule for one seed's image drawn in two batch shapes (tests/test_dreambooth.py, class images):
    batched float32 kernels are not bitwise batch-invariant, the pipeline output moves by ~1e-6, so a pixel can
    only round to the neighbouring 8-bit level, and rarely."""
    diff = np.abs(a - b)
    return diff.max() <= 1 and diff.mean() < 0.01


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_image_i_depends_on_its_prompt_and_seed_only(kind, request):
    pipe = request.getfixturevalue(f"tiny_{kind}")
    seeds = [11, 12, 13]
    together = _pixels(generate(pipe, PROMPTS, seeds, num_inference_steps=STEPS, batch_size=3))
    alone = [_pixels(generate(pipe, p, [s], num_inference_steps=STEPS))[0] for p, s in zip(PROMPTS, seeds)]
    for i in range(3):
        assert _close(alone[i], together[i]), (i, np.abs(alone[i] - together[i]).max())

    # the same batch shape: bitwise. Batches of 2 are [0, 1], [2]: image 2 alone, images 0 and 1 as a pair
    pairs = _pixels(generate(pipe, PROMPTS, seeds, num_inference_steps=STEPS, batch_size=2))
    assert np.array_equal(pairs[2], alone[2])
    first_two = _pixels(generate(pipe, PROMPTS[:2], seeds[:2], num_inference_steps=STEPS))
    assert all(np.array_equal(a, b) for a, b in zip(first_two, pairs[:2]))

    # image i is the pipeline's image from torch.Generator(device).manual_seed(seeds[i])
    pipe.set_progress_bar_config(disable=True)
    direct = pipe(PROMPTS[1], generator=[torch.Generator("cpu").manual_seed(12)], num_inference_steps=STEPS).images
    assert np.array_equal(_pixels(direct)[0], alone[1])

    # other seeds (same prompt): other images, far beyond the rounding level
    other = _pixels(generate(pipe, [PROMPTS[0]] * 3, [1, 2, 3], num_inference_steps=STEPS))
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert np.abs(other[i] - other[j]).mean() > 10, (i, j)  # measured: ~44 levels


def test_defaults_and_refusals(tiny_sd):
    # seeds default to range(len(prompts)); a str prompt is one image
    default = _pixels(generate(tiny_sd, PROMPTS[:2], num_inference_steps=STEPS))
    explicit = _pixels(generate(tiny_sd, PROMPTS[:2], [0, 1], num_inference_steps=STEPS))
    assert all(np.array_equal(a, b) for a, b in zip(default, explicit))
    assert len(generate(tiny_sd, "a dog", num_inference_steps=1)) == 1
    assert generate(tiny_sd, [], num_inference_steps=1) == []
    with pytest.raises(ValueError, match="got 2 seeds for 3 prompts"):
        generate(tiny_sd, PROMPTS, [0, 1])
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        generate(tiny_sd, PROMPTS, negative_prompt=["x", "y"])
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        generate(tiny_sd, PROMPTS, num_images_per_prompt=2)
    with pytest.raises(ValueError, match="batch_size"):
        generate(tiny_sd, PROMPTS, batch_size=0)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_pipe_kwargs_pass_through(kind, request):
    pipe = request.getfixturevalue(f"tiny_{kind}")
    calls = []

    def count(pipeline, step, timestep, callback_kwargs):
        calls.append(step)
        return callback_kwargs

    images = generate(pipe, PROMPTS, num_inference_steps=STEPS, batch_size=2, callback_on_step_end=count,
                      negative_prompt="blurry", output_type="np")
    assert calls == [0, 1, 0, 1]  # two batches of two steps each
    assert len(images) == 3 and images[0].shape == (32, 32, 3)



class _Recorder:
    """A stand-in pipeline: records each call's keyword arguments and returns one black image per prompt."""

    def __init__(self):
        self.calls = []
        self._execution_device = torch.device("cpu")

    def set_progress_bar_config(self, **kwargs):
        self._progress_bar_config = kwargs

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        from PIL import Image

        return SimpleNamespace(images=[Image.new("RGB", (8, 8)) for _ in kwargs["prompt"]])


def test_unset_arguments_are_not_passed_and_batches_are_sliced():
    pipe = _Recorder()
    generate(pipe, ["a", "b", "c"], [7, 8, 9], negative_prompt=["na", "nb", "nc"], batch_size=2,
             cross_attention_kwargs={"scale": 0.5})
    assert [c["prompt"] for c in pipe.calls] == [["a", "b"], ["c"]]
    assert [c["negative_prompt"] for c in pipe.calls] == [["na", "nb"], ["nc"]]
    first = pipe.calls[0]
    assert set(first) == {"prompt", "negative_prompt", "generator", "output_type", "cross_attention_kwargs"}
    assert first["cross_attention_kwargs"] == {"scale": 0.5} and first["output_type"] == "pil"
    # each generator is in the state manual_seed(seed) leaves it in
    assert [torch.equal(g.get_state(), torch.Generator().manual_seed(s).get_state())
            for c, seeds in zip(pipe.calls, ([7, 8], [9])) for g, s in zip(c["generator"], seeds)] == [True] * 3

    pipe = _Recorder()
    generate(pipe, "x", guidance_scale=3.0, num_inference_steps=4, height=16, width=24)
    assert {k: v for k, v in pipe.calls[0].items() if k not in ("generator",)} == {
        "prompt": ["x"], "guidance_scale": 3.0, "num_inference_steps": 4, "height": 16, "width": 24,
        "output_type": "pil"}


def test_progress_bar_only_when_asked_and_the_pipeline_config_comes_back(tiny_sd, capsys):
    tiny_sd.set_progress_bar_config(leave=False)
    generate(tiny_sd, PROMPTS[:2], num_inference_steps=STEPS)
    assert capsys.readouterr().err == ""  # neither a bar of ours nor the pipeline's per-step bar
    assert tiny_sd._progress_bar_config == {"leave": False}

    generate(tiny_sd, PROMPTS[:2], num_inference_steps=STEPS, progress=True)
    err = capsys.readouterr().err
    assert "generating" in err and "2/2" in err and "image" in err

    fresh = _Recorder()  # a pipeline whose bar was never configured is left unconfigured
    generate(fresh, ["a"])
    assert not hasattr(fresh, "_progress_bar_config")
