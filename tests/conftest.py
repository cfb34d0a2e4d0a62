"""Test-wide settings: never touch the network, keep runs deterministic and quiet."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_sd():
    from customize.models import tiny_pipeline

    return tiny_pipeline("sd", seed=0)


@pytest.fixture
def tiny_sdxl():
    from customize.models import tiny_pipeline

    return tiny_pipeline("sdxl", seed=0)
