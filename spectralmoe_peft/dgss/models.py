"""Segmentation models for the workflow: UperNet over a (frozen) ViT backbone, and the depth model.

Offline, the defaults are small randomly initialized models (nothing can be downloaded); ``backbone`` and
``depth_model`` also take Hub ids or local paths of real foundation models (DINOv2/DINOv3, Depth Anything V2).
"""

from __future__ import annotations

from typing import Optional

import torch
import transformers as tf
from torch import Tensor, nn

from ..bands import widen_patch_embedding
from ..depth import load_depth_model

try:  # transformers >= 5
    from transformers.backbone_utils import BackboneMixin
except ImportError:  # pragma: no cover - transformers 4
    from transformers.utils.backbone_utils import BackboneMixin

TINY = "tiny"  # the built-in random backbone / depth model


def tiny_backbone_config(num_bands: int, image_size: int = 64, hidden_size: int = 96, num_layers: int = 4,
                         patch_size: int = 8) -> tf.Dinov2Config:
    """A DINOv2-shaped backbone small enough to train on 2 CPU cores in minutes."""
    return tf.Dinov2Config(
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4, intermediate_size=2 * hidden_size,
        image_size=image_size, patch_size=patch_size, num_channels=num_bands, drop_path_rate=0.0,
        out_features=[f"stage{i}" for i in range(1, num_layers + 1)],
    )


def build_upernet(
    num_bands: int,
    num_classes: int,
    backbone: str = TINY,
    image_size: int = 64,
    head_hidden_size: int = 64,
    seed: int = 0,
    ignore_index: int = 255,
    rgb_band_indices: tuple[int, ...] = (2, 1, 0),
) -> tuple[tf.UperNetForSemanticSegmentation, list[str]]:
    """UperNet over a ViT backbone with ``num_bands`` input bands; returns the model and the module paths to train
    and save beside the adapter (``modules_to_save``): the decode head and, for a widened RGB backbone, its patch
    embedding (its R, G, B filters go to ``rgb_band_indices``)."""
    torch.manual_seed(seed)
    to_save = ["decode_head"]
    if backbone == TINY:
        backbone_config = tiny_backbone_config(num_bands, image_size)
        pretrained = None
    else:
        backbone_config = tf.AutoConfig.from_pretrained(backbone)
        depth = backbone_config.num_hidden_layers
        picks = sorted({max(1, round(depth * f)) for f in (0.25, 0.5, 0.75, 1.0)})
        backbone_config.out_indices = picks
        backbone_config.out_features = [f"stage{i}" for i in picks]
        # the backbone class of that config (AutoBackbone.from_pretrained rejects local folders in transformers 5.24)
        backbone_class = tf.AutoBackbone._model_mapping[type(backbone_config)]
        pretrained = backbone_class.from_pretrained(backbone, out_indices=picks)
    config = tf.UperNetConfig(
        backbone_config=backbone_config, hidden_size=head_hidden_size, pool_scales=[1, 2, 3, 6], num_labels=num_classes,
        use_auxiliary_head=False, loss_ignore_index=ignore_index,
    )
    model = tf.UperNetForSemanticSegmentation(config)
    if pretrained is not None:
        model.backbone = pretrained
        if pretrained.config.num_channels != num_bands:
            to_save.append("backbone." + widen_patch_embedding(model.backbone, num_bands, rgb_band_indices))
    model.requires_grad_(False)
    return model.eval(), to_save


def build_depth_model(depth_model: str = TINY, seed: int = 1) -> tuple[nn.Module, Optional[tuple[list, list]]]:
    """The frozen depth model run on the R, G, B bands, and its processor's (mean, std) when it has one: a tiny
    random DINOv2 (other width and patch size than the backbone, as Depth Anything's ViT vs a DINOv3 backbone), or
    a Hub id / local path of a model that returns ``hidden_states`` (Depth Anything, DPT, DINOv2, ...)."""
    if depth_model == TINY:
        torch.manual_seed(seed)
        config = tf.Dinov2Config(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                                 image_size=63, patch_size=7)
        return tf.Dinov2Model(config).eval().requires_grad_(False), None
    model, normalization = load_depth_model(depth_model)
    return model.eval().requires_grad_(False), normalization


def segmentation_logits(model: nn.Module, batch: dict[str, Tensor], extra_inputs: Optional[dict] = None) -> Tensor:
    """(B, num_classes, H, W) logits at input resolution. ``extra_inputs`` carries SpectralMoE-only inputs
    (``nodata_mask``); plain and LoRA models get pixel values only."""
    outputs = model(pixel_values=batch["pixel_values"], **(extra_inputs or {}))
    logits = outputs.logits
    size = batch["pixel_values"].shape[-2:]
    if logits.shape[-2:] != size:
        logits = nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits


def find_backbone(model: nn.Module) -> nn.Module:
    """The ViT inside a segmentation model (or a PeftModel of one): ``model.backbone`` for UperNet / DPT,
    ``model.model.pixel_level_module.encoder`` for Mask2Former (found as its ``BackboneMixin`` submodule), the model
    itself for a bare ViT. This is where gradient checkpointing goes: the heads do not support it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, "backbone", None)
    if isinstance(backbone, nn.Module):
        return backbone
    for module in base.modules():
        if isinstance(module, BackboneMixin):
            return module
    if getattr(base, "supports_gradient_checkpointing", False):
        return base
    raise ValueError(f"No ViT backbone found in {type(base).__name__}: expected a `.backbone`, a transformers "
                     "backbone submodule, or a model that supports gradient checkpointing itself.")


def enable_gradient_checkpointing(model: nn.Module, use_reentrant: bool = False) -> nn.Module:
    """Turn on gradient checkpointing in the ViT of ``model`` (see :func:`find_backbone`) and return that ViT; the
    gradients are those without it. (transformers 5 checkpoints each block's ``forward``: the SpectralMoE
    refinement, a forward hook on the block, keeps its activations.) ``use_reentrant=False`` is PyTorch's
    recommended variant."""
    backbone = find_backbone(model)
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return backbone
