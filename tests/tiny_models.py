"""Factories for tiny random HF vision models of every supported family (configs only, no downloads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import transformers as tf

HIDDEN = 32
COMMON = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@dataclass(frozen=True)
class Family:
    factory: Callable[..., torch.nn.Module]
    image_size: tuple[int, int]
    num_prefix_tokens: int
    num_blocks: int = 2


def _dinov2(**kw):
    return tf.Dinov2Model(tf.Dinov2Config(**{**COMMON, "image_size": 32, "patch_size": 8, **kw}))


FAMILIES: dict[str, Family] = {
    "dinov2": Family(_dinov2, (32, 32), 1),
}


def make_model(family: str = "dinov2", seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family].factory(**kw).eval()


def image_size(family: str) -> tuple[int, int]:
    return FAMILIES[family].image_size


def main_output(output) -> torch.Tensor:
    """The tensor a user would look at: features for backbones, logits for task models."""
    for name in ("last_hidden_state", "logits", "feature_maps"):
        value = getattr(output, name, None)
        if value is not None:
            return torch.cat([v.flatten(1) for v in value], 1) if isinstance(value, tuple) else value
    return output[0]


def make_depth_model(hidden_size: int = 48, num_layers: int = 3, patch_size: int = 7, seed: int = 1):
    """A Depth-Anything-shaped stand-in: a DINOv2 encoder with another width, depth and patch size."""
    torch.manual_seed(seed)
    config = tf.Dinov2Config(
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=2, intermediate_size=64,
        image_size=28, patch_size=patch_size,
    )
    return tf.Dinov2Model(config).eval()
