"""bench/toy_attention.py: one in/out ratio pair per cross-attention layer, the pipeline left as it was (the
recording controller and the word regions it uses are tested in tests/test_toy_grounding.py); bench/toy_position.py
on the committed base."""

import importlib.util
from pathlib import Path

import pytest

from customize.toy import experiments

pytestmark = pytest.mark.skipif(not experiments.base_available(), reason="no toy base model in data/toy/base")


def _bench(name: str = "toy_attention"):
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
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
    # 16 captions: the 4x4 layers score a caption only where its shape covers a whole 8x8-pixel cell, and a base
    # that follows position and size words draws many small shapes in corners
    rows = bench.locality(pipe, n=16)
    layers = sorted(n.removesuffix(".processor") for n in before if ".attn2." in n)
    assert sorted(rows) == layers  # one row per cross-attention layer, no self-attention
    assert all(math.isfinite(a) and math.isfinite(b) and b >= 0 for a, b in rows.values())
    # the committed base was trained with the grounding loss: in every layer the shape's words look at the shape
    # (hundreds of times more than off it) and the background's words away from it
    assert all(a > 10 and b < 0.5 for a, b in rows.values()), rows
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == before


def test_position_bench_measures_sensitivity_against_a_colour_swap(one_thread, capsys):
    import torch

    bench = _bench("toy_position")
    pipe = experiments.load_base()
    rows = bench.sensitivity(pipe, n_noise=2)
    assert [t for t, _, _ in rows] == list(bench.SENSITIVITY_TIMESTEPS)
    assert all(colour > 0.05 and spread >= 0 for _, spread, colour in rows)  # a colour swap always shows
    # the same phrase five times: no spread at all
    bench.world.POSITION_PHRASES, saved = {k: "in the center" for k in bench.world.POSITION_PHRASES}, bench.world.POSITION_PHRASES
    try:
        assert all(spread < 1e-6 for _, spread, _ in bench.sensitivity(pipe, n_noise=2))
    finally:
        bench.world.POSITION_PHRASES = saved
    quadrants = bench.first_guess_quadrants(pipe, n_noise=2)
    assert list(quadrants) == list(saved) and all(len(q) == 4 for q in quadrants.values())
    assert bench.main(["--n", "5"]) == 0
    out = capsys.readouterr().out
    assert "position" in out and "| 999 |" in out
    assert torch.is_grad_enabled()

