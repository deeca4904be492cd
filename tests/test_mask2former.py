"""Mask2Former with the adapter's expert tokens as its queries (the paper's decoder)."""

from __future__ import annotations

import pytest
import scipy  # noqa: F401  Mask2Former's Hungarian matching needs it (the test extra installs it)
import torch
from peft import PeftModel, get_peft_model

from spectralmoe_peft import SpectralMoEConfig
from spectralmoe_peft.dgss.mask2former import (
    ExpertTokenQueries,
    build_mask2former,
    mask2former_targets,
    semantic_logits,
)


def build(num_queries=8, reduce="mean", **overrides):
    base, to_save = build_mask2former(6, 6, num_queries=num_queries, image_size=64, hidden_dim=32, reduce=reduce)
    config = SpectralMoEConfig(**{"num_experts": 3, "num_tokens": 8, "expert_rank": 4, "use_depth": False,
                                  "modules_to_save": to_save, "init_weights": False, **overrides})
    return get_peft_model(base, config), to_save


def queries_module(model) -> ExpertTokenQueries:
    wrapper = model.base_model.model.model.transformer_module
    return wrapper.modules_to_save["default"].queries_features


def reference_queries(model, reduce="mean"):
    """From first principles: T_e = A_e B_e of the last block, reduced, projected, added to the base queries."""
    layer = model.base_model.model.model.pixel_level_module.encoder.encoder.layer[-1]
    a, b = layer.spectralmoe_A["default"], layer.spectralmoe_B["default"]
    tokens = torch.stack([a[e] @ b[e] for e in range(a.shape[0])])  # E, M, D
    pooled = tokens.mean(0) if reduce == "mean" else tokens.reshape(-1, tokens.shape[-1])
    module = queries_module(model)
    return module.query.weight + pooled @ module.projection.weight.t() + module.projection.bias


@pytest.mark.parametrize("reduce, num_queries", [("mean", 8), ("concat", 24)])
def test_queries_come_from_the_last_blocks_expert_tokens(reduce, num_queries):
    model, _ = build(num_queries, reduce)
    module = queries_module(model)
    torch.nn.init.normal_(module.projection.weight)
    torch.testing.assert_close(module.weight, reference_queries(model, reduce))
    with model.disable_adapter():
        assert torch.equal(module.weight, module.query.weight)  # adapter off: the plain Mask2Former


def test_identity_at_init_and_training_reaches_adapter_through_the_queries():
    model, _ = build()
    module = queries_module(model)
    assert torch.equal(module.weight, module.query.weight)  # zero projection: plain Mask2Former before training
    x = torch.randn(2, 6, 64, 64)
    labels = torch.randint(0, 6, (2, 64, 64))
    labels[0, :16] = 255
    mask_labels, class_labels = mask2former_targets(labels)
    assert all(m.shape[0] == len(c) for m, c in zip(mask_labels, class_labels))
    assert 255 not in class_labels[0].tolist()
    model.train()
    out = model(pixel_values=x, mask_labels=mask_labels, class_labels=class_labels)
    (out.loss + model.get_aux_loss()).backward()
    assert module.projection.weight.grad.abs().sum() > 0
    # once the projection is non-zero, the last block's expert tokens get a gradient from the queries alone
    with torch.no_grad():
        module.projection.weight.normal_()
    model.zero_grad()
    module.weight.sum().backward()
    last = model.base_model.model.model.pixel_level_module.encoder.encoder.layer[-1]
    assert last.spectralmoe_B["default"].grad.abs().sum() > 0


def test_wrong_query_count_is_named():
    model, _ = build(num_queries=5)
    with pytest.raises(ValueError, match="Mask2Former has 5 queries but the adapter gives 8 expert tokens"):
        model(pixel_values=torch.randn(1, 6, 64, 64))


def test_semantic_logits_and_reload(tmp_path):
    model, _ = build()
    with torch.no_grad():
        queries_module(model).projection.weight.normal_()
    model.eval()
    x = torch.randn(2, 6, 64, 64)
    with torch.no_grad():
        scores = semantic_logits(model(pixel_values=x), (64, 64))
    assert scores.shape == (2, 6, 64, 64) and torch.isfinite(scores).all()
    model.save_pretrained(tmp_path)
    base, _ = build_mask2former(6, 6, num_queries=8, image_size=64, hidden_dim=32)
    # is_trainable: same requires_grad as the trained model, so even the last bit matches (transformers' decoder
    # matmuls round differently for frozen weights; a frozen load agrees to ~1e-7)
    loaded = PeftModel.from_pretrained(base, tmp_path, is_trainable=True).eval()
    with torch.no_grad():
        assert torch.equal(semantic_logits(loaded(pixel_values=x), (64, 64)), scores)
