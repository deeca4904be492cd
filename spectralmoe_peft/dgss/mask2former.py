"""Mask2Former over a SpectralMoE-adapted ViT, with the adapter's expert tokens as its object queries.

As in Rein, the paper's decoder reads its queries from the learnable tokens of the last adapted block: here the
expert tokens ``T_e = A_e B_e`` (E x M x D), averaged over experts (``reduce="mean"``, M queries) or concatenated
(``"concat"``, E*M queries), projected to the decoder width and added to Mask2Former's own query features. The
projection starts at zero, so before training the decoder is exactly the plain Mask2Former (PEFT's identity-at-init
convention), and with the adapter disabled it is the plain Mask2Former again.

Call :func:`attach_expert_token_queries` on the base model before ``get_peft_model`` (and before
``PeftModel.from_pretrained``, so the saved decoder finds the same modules), and put the decoder in
``modules_to_save``; :func:`build_mask2former` does both. ``Mask2FormerForUniversalSegmentation``'s loss needs scipy.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import transformers as tf
from einops import rearrange
from torch import Tensor, nn

from ..experts import expert_tokens
from ..layer import SpectralMoELayer
from .models import tiny_backbone_config

DECODER_MODULES = ["model.pixel_level_module.decoder", "model.transformer_module", "class_predictor"]


class ExpertTokenQueries(nn.Module):
    """Stands in for Mask2Former's ``queries_features`` embedding: ``.weight`` is computed from the expert tokens of
    the last active SpectralMoE block of ``root`` (held by weak reference: not a submodule, not saved twice)."""

    def __init__(self, original: nn.Embedding, token_width: int, root: nn.Module, reduce: str = "mean") -> None:
        super().__init__()
        if reduce not in ("mean", "concat"):
            raise ValueError(f"reduce must be 'mean' or 'concat'; got {reduce!r}.")
        self.query = original  # Mask2Former's own learned query features
        self.projection = nn.Linear(token_width, original.embedding_dim)
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)
        self.reduce = reduce
        self._root = weakref.ref(root)  # deepcopy (modules_to_save) keeps the same reference

    @property
    def num_embeddings(self) -> int:
        return self.query.num_embeddings

    def last_adapter_tokens(self) -> Optional[Tensor]:
        """(E, M, D) expert tokens of the last block with an enabled, active SpectralMoE adapter; None if none."""
        root = self._root()
        layers = [m for m in root.modules() if isinstance(m, SpectralMoELayer)] if root is not None else []
        for layer in sorted(layers, key=lambda m: m.block_index, reverse=True):
            active = [name for name in layer.active_adapters if name in layer.spectralmoe_A]
            if active and not layer.disable_adapters:
                return expert_tokens(layer.spectralmoe_A[active[0]], layer.spectralmoe_B[active[0]])
        return None

    @property
    def weight(self) -> Tensor:  # read by Mask2FormerTransformerModule.forward: (num_queries, hidden_dim)
        base = self.query.weight
        tokens = self.last_adapter_tokens()
        if tokens is None:
            return base
        queries = tokens.mean(0) if self.reduce == "mean" else rearrange(tokens, "e m d -> (e m) d")
        if queries.shape[0] != base.shape[0]:
            raise ValueError(
                f"Mask2Former has {base.shape[0]} queries but the adapter gives {queries.shape[0]} expert tokens "
                f"(reduce={self.reduce!r}): set Mask2FormerConfig(num_queries=...) to SpectralMoEConfig.num_tokens "
                "(mean) or num_experts * num_tokens (concat)."
            )
        return base + self.projection(queries.to(self.projection.weight.dtype))


def attach_expert_token_queries(model: tf.Mask2FormerForUniversalSegmentation, reduce: str = "mean") -> None:
    """Make ``model``'s decoder read its queries from the SpectralMoE expert tokens (in place, idempotent)."""
    module = model.model.transformer_module
    if isinstance(module.queries_features, ExpertTokenQueries):
        return
    width = model.config.backbone_config.hidden_size
    module.queries_features = ExpertTokenQueries(module.queries_features, width, model, reduce)


def build_mask2former(
    num_bands: int,
    num_classes: int,
    num_queries: int,
    image_size: int = 64,
    hidden_dim: int = 64,
    seed: int = 0,
    expert_token_queries: bool = True,
    reduce: str = "mean",
) -> tuple[tf.Mask2FormerForUniversalSegmentation, list[str]]:
    """A small Mask2Former over the tiny random DINOv2-shaped backbone (4 feature maps), frozen; returns it and the
    decoder paths for ``modules_to_save``."""
    torch.manual_seed(seed)
    config = tf.Mask2FormerConfig(
        backbone_config=tiny_backbone_config(num_bands, image_size), num_labels=num_classes, num_queries=num_queries,
        hidden_dim=hidden_dim, feature_size=hidden_dim, mask_feature_size=hidden_dim, encoder_layers=1,
        decoder_layers=3, dim_feedforward=2 * hidden_dim, encoder_feedforward_dim=2 * hidden_dim,
        num_attention_heads=4, train_num_points=256,
    )
    model = tf.Mask2FormerForUniversalSegmentation(config)
    if expert_token_queries:
        attach_expert_token_queries(model, reduce)
    model.requires_grad_(False)
    return model.eval(), list(DECODER_MODULES)


def semantic_logits(outputs, size: tuple[int, int]) -> Tensor:
    """Per-pixel class scores (B, num_classes, H, W) from Mask2Former's query classes and masks (its semantic
    inference: sum over queries of p(class | query) * sigmoid(mask))."""
    classes = outputs.class_queries_logits.softmax(-1)[..., :-1]  # B, Q, C: drop the "no object" class
    masks = outputs.masks_queries_logits.sigmoid()  # B, Q, h, w
    scores = torch.einsum("bqc,bqhw->bchw", classes, masks)
    return nn.functional.interpolate(scores, size=size, mode="bilinear", align_corners=False)


def mask2former_targets(labels: Tensor, ignore_index: int = 255) -> tuple[list[Tensor], list[Tensor]]:
    """Dense labels (B, H, W) -> per-image binary masks and class ids, as Mask2Former's loss takes them; ignored
    pixels belong to no mask."""
    mask_labels, class_labels = [], []
    for image_labels in labels:
        present = [c for c in image_labels.unique().tolist() if c != ignore_index]
        class_labels.append(torch.tensor(present, dtype=torch.long))
        if present:
            mask_labels.append(torch.stack([(image_labels == c).float() for c in present]))
        else:
            mask_labels.append(torch.zeros(0, *image_labels.shape))
    return mask_labels, class_labels
