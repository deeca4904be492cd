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
