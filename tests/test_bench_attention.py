"""bench/toy_attention.py: its recording attention processor is a pure observer, and what it records is the
attention that the layer computes."""

import importlib.util
from pathlib import Path

import pytest
import torch

from customize.toy import experiments, quality, world

pytestmark = pytest.mark.skipif(not experiments.base_available(), reason="no toy base model in data/toy/base")


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "toy_attention.py"
    spec = importlib.util.spec_from_file_location("toy_attention_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recorder_leaves_images_unchanged_and_records_attention_distributions():
    from diffusers.models.attention_processor import AttnProcessor

    bench = _bench()
    torch.set_num_threads(1)
    pipe = experiments.load_base()
    prompts = [p for p, _ in world.heldout_prompts(2)]
    pipe.unet.set_attn_processor(AttnProcessor())
    plain = quality.sample(pipe, prompts, num_inference_steps=4)
    store = {}
    pipe.unet.set_attn_processor({n: bench.CrossAttentionRecorder(n, AttnProcessor(), store)
                                  for n in pipe.unet.attn_processors})
    recorded = quality.sample(pipe, prompts, num_inference_steps=4)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(plain, recorded))
    cross = [n for n in pipe.unet.attn_processors if "attn2" in n]
    assert sorted(store) == sorted(cross)  # cross-attention layers only, every one
    for steps in store.values():
        assert len(steps) == 4  # one record per sampling step
        probs = steps[0]  # (prompts, N pixels, L tokens)
        assert probs.shape[0] == 2 and probs.shape[2] == pipe.tokenizer.model_max_length
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]))


def test_word_positions_find_the_scene_words():
    bench = _bench()
    pipe = experiments.load_base()
    prompt = "a large red circle at the top left on a blue background"
    assert bench.word_positions(pipe.tokenizer, prompt, ["red", "circle"]) == [3, 4]
    assert bench.word_positions(pipe.tokenizer, prompt, ["blue", "background"]) == [11, 12]
