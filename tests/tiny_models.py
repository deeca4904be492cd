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


def _vision(model_cls, config_cls, **fixed):
    def factory(**kw):
        return model_cls(config_cls(**{**COMMON, "image_size": 32, "patch_size": 8, **fixed, **kw}))

    return factory


def _upernet(backbone_config_cls, **backbone_kw):
    def factory(**kw):
        backbone = backbone_config_cls(
            **{**COMMON, "image_size": 32, "patch_size": 8, "out_features": ["stage1", "stage2"], **backbone_kw, **kw}
        )
        config = tf.UperNetConfig(backbone_config=backbone, hidden_size=16, pool_scales=[1, 2], num_labels=3,
                                  use_auxiliary_head=False)
        return tf.UperNetForSemanticSegmentation(config)

    return factory


FAMILIES: dict[str, Family] = {
    "vit": Family(_vision(tf.ViTModel, tf.ViTConfig), (32, 32), 1),
    "vit_classifier": Family(_vision(tf.ViTForImageClassification, tf.ViTConfig, num_labels=3), (32, 32), 1),
    "deit": Family(_vision(tf.DeiTModel, tf.DeiTConfig), (32, 32), 2),
    "dinov2": Family(_dinov2, (32, 32), 1),
    "dinov2_backbone": Family(_vision(tf.Dinov2Backbone, tf.Dinov2Config, out_features=["stage1", "stage2"]),
                              (32, 32), 1),
    "dinov2_registers": Family(
        _vision(tf.Dinov2WithRegistersModel, tf.Dinov2WithRegistersConfig, num_register_tokens=2), (32, 32), 3
    ),
    "dinov3": Family(_vision(tf.DINOv3ViTModel, tf.DINOv3ViTConfig, num_register_tokens=2), (32, 48), 3),
    "clip_vision": Family(_vision(tf.CLIPVisionModel, tf.CLIPVisionConfig), (32, 32), 1),
    "siglip_vision": Family(_vision(tf.SiglipVisionModel, tf.SiglipVisionConfig), (32, 32), 0),
    "beit": Family(_vision(tf.BeitModel, tf.BeitConfig), (32, 32), 1),
    "upernet_dinov2": Family(_upernet(tf.Dinov2Config), (32, 32), 1),
    "upernet_dinov3": Family(_upernet(tf.DINOv3ViTConfig, num_register_tokens=1), (32, 32), 2),
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


def _depth_anything():
    backbone = tf.Dinov2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                               patch_size=7, image_size=63, out_indices=[1, 2], reshape_hidden_states=False)
    return tf.DepthAnythingForDepthEstimation(tf.DepthAnythingConfig(
        backbone_config=backbone, patch_size=7, reassemble_hidden_size=24, fusion_hidden_size=16,
        head_hidden_size=8, neck_hidden_sizes=[12, 24], reassemble_factors=[2, 1]))


def _dpt():
    return tf.DPTForDepthEstimation(tf.DPTConfig(
        hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, image_size=32, patch_size=8,
        neck_hidden_sizes=[8, 8, 8, 8], reassemble_factors=[4, 2, 1, 0.5], backbone_out_indices=[0, 1, 1, 1],
        fusion_hidden_size=8, head_hidden_size=8))


def _plain_vit():
    return tf.ViTModel(tf.ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                    image_size=28, patch_size=7))


# depth models of every supported family, 24 wide: (name -> factory); Depth Anything and DPT carry a neck and head
DEPTH_FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    "dinov2": lambda: make_depth_model(hidden_size=24, num_layers=2),
    "depth_anything": _depth_anything,
    "dpt": _dpt,
    "vit": _plain_vit,
}


def make_depth_family(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return DEPTH_FAMILIES[name]().eval()
