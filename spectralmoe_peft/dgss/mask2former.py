"""Mask2Former over a SpectralMoE-adapted ViT, its object queries linked to the adapter's expert tokens.

``query_link="paper"`` (default) is the paper's decoder as the released code implements it (``DepthMoE.return_auto``
with ``link_token_to_query=True``, and ``DepthMoEMask2FormerHead``): Rein's link, with each block's expert tokens
averaged where Rein has one token set per block. Each adapted block's expert tokens ``T_e = A_e B_e`` (E x M x D)
are averaged over experts (M x D), mapped by ``transform`` (Linear D -> hidden), pooled across blocks three ways
(max, mean, last block), concatenated and mapped by ``merge`` (Linear 3*hidden -> hidden) into the M query
embeddings. They are the queries' *positional* embeddings (Mask2Former's learned ``queries_embedder`` is dropped,
its learned query features stay). Both linears start as torch's default ``nn.Linear``, as in the released code;
with ``B_e = 0`` at init every block's tokens are zero, so the positional embeddings start equal for every query
(``merge`` of ``transform``'s bias), and a disabled adapter gives the link zero tokens too.

``query_link="mean_last"`` is a simpler variant (not the paper's): the last adapted block's tokens, averaged over
experts, through a zero-initialized projection, added to Mask2Former's own query *features*: before training the
decoder is exactly the plain Mask2Former.

``reduce="concat"`` (either link) keeps the experts apart instead of averaging them: E*M queries.

Call :func:`attach_expert_token_queries` on the base model before ``get_peft_model`` (and before
``PeftModel.from_pretrained``, so the saved decoder finds the same modules), and put the decoder in
``modules_to_save``; :func:`build_mask2former` does both. ``Mask2FormerForUniversalSegmentation``'s loss needs scipy.
"""

from __future__ import annotations

import weakref
from typing import Literal

import torch
import transformers as tf
from einops import rearrange
from torch import Tensor, nn

from ..experts import expert_tokens
from ..layer import SpectralMoELayer
from .models import tiny_backbone_config

DECODER_MODULES = ["model.pixel_level_module.decoder", "model.transformer_module", "class_predictor"]
QUERY_LINKS = ("paper", "mean_last")
REDUCTIONS = ("mean", "concat")


def adapted_block_tokens(root: nn.Module | None) -> list[Tensor]:
    """(E, M, D) expert tokens of each block with an enabled, active SpectralMoE adapter, in block order (the first
    active adapter of a block); empty if none."""
    layers = [m for m in root.modules() if isinstance(m, SpectralMoELayer)] if root is not None else []
    tokens = []
    for layer in sorted(layers, key=lambda m: m.block_index):
        active = [name for name in layer.active_adapters if name in layer.spectralmoe_A]
        if active and not layer.disable_adapters:
            tokens.append(expert_tokens(layer.spectralmoe_A[active[0]], layer.spectralmoe_B[active[0]]))
    return tokens


def _queries(tokens: Tensor, reduce: str, num_queries: int, link: str) -> Tensor:
    """One block's (E, M, D) expert tokens -> (Q, D) query tokens, Q checked against Mask2Former's num_queries."""
    queries = tokens.mean(0) if reduce == "mean" else rearrange(tokens, "e m d -> (e m) d")
    if queries.shape[0] != num_queries:
        raise ValueError(
            f"Mask2Former has {num_queries} queries but the adapter gives {queries.shape[0]} expert tokens "
            f"(query_link={link!r}, reduce={reduce!r}): set Mask2FormerConfig(num_queries=...) to "
            "SpectralMoEConfig.num_tokens (mean) or num_experts * num_tokens (concat)."
        )
    return queries


def _check_reduce(reduce: str) -> None:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}; got {reduce!r}.")


class ExpertTokenQueryPositions(nn.Module):
    """The paper's link (the released code's, after Rein): stands in for Mask2Former's ``queries_embedder``; its
    ``.weight`` (num_queries, hidden) is computed from the expert tokens of every adapted block of ``root`` (held by
    weak reference: not a submodule, not saved twice). Parameter names follow the released code."""

    def __init__(
        self, num_queries: int, token_width: int, hidden_dim: int, root: nn.Module, reduce: str = "mean", **factory
    ) -> None:
        super().__init__()
        _check_reduce(reduce)
        self.num_queries = num_queries
        self.transform = nn.Linear(token_width, hidden_dim, **factory)  # released: DepthMoE.transform (D -> 256)
        self.merge = nn.Linear(3 * hidden_dim, hidden_dim, **factory)  # released: DepthMoE.merge (768 -> 256)
        self.reduce = reduce
        self._root = weakref.ref(root)  # deepcopy (modules_to_save) keeps the same reference

    @property
    def weight(self) -> Tensor:  # read by Mask2FormerTransformerModule.forward: (num_queries, hidden_dim)
        dtype = self.transform.weight.dtype
        blocks = [_queries(t, self.reduce, self.num_queries, "paper") for t in adapted_block_tokens(self._root())]
        if blocks:
            tokens = torch.stack(blocks).to(dtype)  # L, Q, D
        else:  # adapter disabled: zero tokens, what B_e = 0 gives, so disabling an untrained adapter changes nothing
            tokens = self.transform.weight.new_zeros(1, self.num_queries, self.transform.in_features)
        mapped = self.transform(tokens)  # L, Q, C
        # max_pool1d / avg_pool1d over all L blocks and the last block, as the released code; the concatenation is
        # channel-major, (c, pool), so released weights of `merge` load as they are
        pooled = torch.stack([mapped.max(0).values, mapped.mean(0), mapped[-1]], dim=-1)  # Q, C, 3
        return self.merge(rearrange(pooled, "q c p -> q (c p)"))  # Q, C


class ExpertTokenQueryFeatures(nn.Module):
    """The simpler variant (``query_link="mean_last"``): stands in for Mask2Former's ``queries_features`` embedding;
    ``.weight`` is its own learned features plus a zero-initialized projection of the last adapted block's tokens."""

    def __init__(self, original: nn.Embedding, token_width: int, root: nn.Module, reduce: str = "mean") -> None:
        super().__init__()
        _check_reduce(reduce)
        self.query = original  # Mask2Former's own learned query features
        self.projection = nn.Linear(token_width, original.embedding_dim)
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)
        self.reduce = reduce
        self._root = weakref.ref(root)

    @property
    def num_embeddings(self) -> int:
        return self.query.num_embeddings

    @property
    def weight(self) -> Tensor:  # read by Mask2FormerTransformerModule.forward: (num_queries, hidden_dim)
        base = self.query.weight
        blocks = adapted_block_tokens(self._root())
        if not blocks:
            return base
        queries = _queries(blocks[-1], self.reduce, base.shape[0], "mean_last")
        return base + self.projection(queries.to(self.projection.weight.dtype))


def attach_expert_token_queries(
    model: tf.Mask2FormerForUniversalSegmentation,
    reduce: str = "mean",
    query_link: Literal["paper", "mean_last"] = "paper",
) -> None:
    """Link ``model``'s decoder queries to the SpectralMoE expert tokens (in place, idempotent): ``"paper"`` replaces
    its learned query positional embeddings, ``"mean_last"`` adds to its query features."""
    if query_link not in QUERY_LINKS:
        raise ValueError(f"query_link must be one of {QUERY_LINKS}; got {query_link!r}.")
    _check_reduce(reduce)
    module = model.model.transformer_module
    links = {"paper": module.queries_embedder, "mean_last": module.queries_features}
    present = [(name, link) for name, link in links.items()
               if isinstance(link, (ExpertTokenQueryPositions, ExpertTokenQueryFeatures))]
    if present:
        name, link = present[0]
        if (name, link.reduce) != (query_link, reduce):
            raise ValueError(
                f"This Mask2Former already has query_link={name!r}, reduce={link.reduce!r}; build a fresh model for "
                f"query_link={query_link!r}, reduce={reduce!r}."
            )
        return
    width = model.config.backbone_config.hidden_size
    if query_link == "paper":
        embedder = module.queries_embedder  # dropped: the expert tokens give the positional embeddings
        factory = {"device": embedder.weight.device, "dtype": embedder.weight.dtype}
        module.queries_embedder = ExpertTokenQueryPositions(
            embedder.num_embeddings, width, embedder.embedding_dim, model, reduce, **factory
        )
    else:
        module.queries_features = ExpertTokenQueryFeatures(module.queries_features, width, model, reduce)


def build_mask2former(
    num_bands: int,
    num_classes: int,
    num_queries: int,
    image_size: int = 64,
    hidden_dim: int = 64,
    seed: int = 0,
    expert_token_queries: bool = True,
    reduce: str = "mean",
    query_link: Literal["paper", "mean_last"] = "paper",
) -> tuple[tf.Mask2FormerForUniversalSegmentation, list[str]]:
    """A small Mask2Former over the tiny random DINOv2-shaped backbone (4 feature maps), frozen, its queries linked
    to the expert tokens (``query_link``, ``reduce``: see the module docstring) unless ``expert_token_queries`` is
    False; returns it and the decoder paths for ``modules_to_save``."""
    torch.manual_seed(seed)
    config = tf.Mask2FormerConfig(
        backbone_config=tiny_backbone_config(num_bands, image_size), num_labels=num_classes, num_queries=num_queries,
        hidden_dim=hidden_dim, feature_size=hidden_dim, mask_feature_size=hidden_dim, encoder_layers=1,
        decoder_layers=3, dim_feedforward=2 * hidden_dim, encoder_feedforward_dim=2 * hidden_dim,
        num_attention_heads=4, train_num_points=256,
    )
    model = tf.Mask2FormerForUniversalSegmentation(config)
    if expert_token_queries:
        attach_expert_token_queries(model, reduce, query_link)
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
