"""Factories for tiny random HF vision models of every supported family (configs only, no downloads)."""

from __future__ import annotations

import torch
import transformers as tf

HIDDEN = 32
COMMON = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _dinov2(**kw):
    return tf.Dinov2Model(tf.Dinov2Config(**{**COMMON, "image_size": 32, "patch_size": 8, **kw}))


# family -> (factory, image size (H, W), number of prefix tokens)
FAMILIES = {
    "dinov2": (_dinov2, (32, 32), 1),
}


def make_model(family: str = "dinov2", seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    factory = FAMILIES[family][0]
    return factory(**kw).eval()


def image_size(family: str) -> tuple[int, int]:
    return FAMILIES[family][1]


def make_depth_model(hidden_size: int = 48, num_layers: int = 3, patch_size: int = 7, seed: int = 1):
    """A Depth-Anything-shaped stand-in: a DINOv2 encoder with another width, depth and patch size."""
    torch.manual_seed(seed)
    config = tf.Dinov2Config(
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=2, intermediate_size=64,
        image_size=28, patch_size=patch_size,
    )
    return tf.Dinov2Model(config).eval()
