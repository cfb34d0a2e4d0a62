"""Test-wide settings: never touch the network, keep runs deterministic and quiet."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`-n auto`, the default in pyproject.toml), each worker gets its share of the cores, set before
# torch starts its thread pool: two workers with two OpenMP threads each on two cores run slower than one.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_configure(config):
    """On an install known to break (e.g. a transformers release that refuses the installed peft), stop with one
    message naming the fix instead of a traceback per affected test."""
    from customize import env

    bad = [p for p in env.problems() if p.fatal]
    if bad and os.environ.get("CUSTOMIZE_RUN_ON_KNOWN_BAD", "") in ("", "0"):
        pytest.exit("the installed libraries are a combination known to break, so the suite does not run: "
                    + "; ".join(str(p) for p in bad)
                    + " (CUSTOMIZE_RUN_ON_KNOWN_BAD=1 runs it anyway, to see what breaks)", returncode=3)


@pytest.fixture(autouse=True)
def _deterministic():
    """Seed torch, and give the next test the process-wide torch settings this one found: a test (or a command it
    runs in-process, e.g. `customize demo`, which sets one thread when OMP_NUM_THREADS is unset) that changes the
    thread count would otherwise run every later test on other float kernels than when run alone."""
    threads, dtype, grad = torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture
def tiny_sd():
    from customize.models import tiny_pipeline

    return tiny_pipeline("sd", seed=0)


@pytest.fixture
def tiny_sdxl():
    from customize.models import tiny_pipeline

    return tiny_pipeline("sdxl", seed=0)
