"""bench/toy_attention.py: it finds the words of a scene in the toy tokenizer's tokens (the recording processor
it uses is tested in tests/test_toy_grounding.py)."""

import importlib.util
from pathlib import Path

import pytest
from customize.toy import experiments

pytestmark = pytest.mark.skipif(not experiments.base_available(), reason="no toy base model in data/toy/base")


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "toy_attention.py"
    spec = importlib.util.spec_from_file_location("toy_attention_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_word_positions_find_the_scene_words():
    bench = _bench()
    pipe = experiments.load_base()
    prompt = "a large red circle at the top left on a blue background"
    assert bench.word_positions(pipe.tokenizer, prompt, ["red", "circle"]) == [3, 4]
    assert bench.word_positions(pipe.tokenizer, prompt, ["blue", "background"]) == [11, 12]
