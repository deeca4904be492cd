"""Tiny random models for the tests: nothing is downloaded, every model is built from a config."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))

import spectralmoe_peft  # noqa: E402,F401  (registers the method)
from tiny_models import FAMILIES, make_depth_model, make_model  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


__all__ = ["make_model", "make_depth_model", "FAMILIES"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and on a shared 2-core machine far steadier, than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
