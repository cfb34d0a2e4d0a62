"""bench/toy_attention.py: one in/out ratio pair per cross-attention layer, the pipeline left as it was (the
recording controller and the word regions it uses are tested in tests/test_toy_grounding.py)."""

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


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread, given back afterwards (set and left at 1, every later test in the process
    ran on one thread, with other float kernels than when run alone)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_committed_base_localises_words_in_every_cross_attention_layer_and_processors_are_restored(one_thread):
    import math

    bench = _bench()
    pipe = experiments.load_base()
    before = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    rows = bench.locality(pipe, n=4)
    layers = sorted(n.removesuffix(".processor") for n in before if ".attn2." in n)
    assert sorted(rows) == layers  # one row per cross-attention layer, no self-attention
    assert all(math.isfinite(a) and math.isfinite(b) and b >= 0 for a, b in rows.values())
    # the committed base was trained with the grounding loss: in every layer the shape's words look at the shape
    # (hundreds of times more than off it) and the background's words away from it
    assert all(a > 10 and b < 0.5 for a, b in rows.values()), rows
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == before
