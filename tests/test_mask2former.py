"""Mask2Former with its queries linked to the adapter's expert tokens (the paper's decoder, and a simpler variant)."""

from __future__ import annotations

import math

import pytest
import scipy  # noqa: F401  Mask2Former's Hungarian matching needs it (the test extra installs it)
import torch
import torch.nn.functional as F
import transformers as tf
from peft import PeftModel, get_peft_model

from spectralmoe_peft import SpectralMoEConfig
from spectralmoe_peft.dgss.mask2former import (
    ExpertTokenQueryFeatures,
    ExpertTokenQueryPositions,
    attach_expert_token_queries,
    build_mask2former,
    mask2former_targets,
    semantic_logits,
)


def build(num_queries=8, reduce="mean", query_link="paper", **overrides):
    base, to_save = build_mask2former(6, 6, num_queries=num_queries, image_size=64, hidden_dim=32, reduce=reduce,
                                      query_link=query_link)
    config = SpectralMoEConfig(**{"num_experts": 3, "num_tokens": 8, "expert_rank": 4, "use_depth": False,
                                  "modules_to_save": to_save, "init_weights": False, **overrides})
    return get_peft_model(base, config), to_save


def transformer_module(model):
    return model.base_model.model.model.transformer_module.modules_to_save["default"]


def blocks(model):
    return list(model.base_model.model.model.pixel_level_module.encoder.encoder.layer)


def block_tokens(layer):
    a, b = layer.spectralmoe_A["default"], layer.spectralmoe_B["default"]
    return torch.stack([a[e] @ b[e] for e in range(a.shape[0])])  # E, M, D


def labelled_batch():
    torch.manual_seed(1)
    x = torch.randn(2, 6, 64, 64)
    labels = torch.randint(0, 6, (2, 64, 64))
    labels[0, :16] = 255
    mask_labels, class_labels = mask2former_targets(labels)
    return x, mask_labels, class_labels


# --- the paper's link -----------------------------------------------------------------------------------------------


def released_link(model, reduce="mean"):
    """As the released DepthMoE.return_auto writes it: per block the tokens averaged over experts, transform, then
    max_pool1d / avg_pool1d over blocks and the last block, cat, flatten(-2, -1), merge."""
    link = transformer_module(model).queries_embedder
    per_block = []
    for layer in blocks(model):
        tokens = block_tokens(layer)
        per_block.append(tokens.mean(0) if reduce == "mean" else tokens.reshape(-1, tokens.shape[-1]))
    all_tokens = torch.stack(per_block)  # L, Q, D
    num_layers = all_tokens.shape[0]
    tokens = F.linear(all_tokens, link.transform.weight, link.transform.bias).permute(1, 2, 0)  # Q, C, L
    tokens = torch.cat([F.max_pool1d(tokens, kernel_size=num_layers), F.avg_pool1d(tokens, kernel_size=num_layers),
                        tokens[:, :, -1].unsqueeze(-1)], dim=-1)
    return F.linear(tokens.flatten(-2, -1), link.merge.weight, link.merge.bias)


@pytest.mark.parametrize("reduce, num_queries", [("mean", 8), ("concat", 24)])
def test_paper_link_equals_the_released_code(reduce, num_queries):
    model, _ = build(num_queries, reduce)
    link = transformer_module(model).queries_embedder
    assert isinstance(link, ExpertTokenQueryPositions) and len(blocks(model)) == 4
    torch.testing.assert_close(link.weight, released_link(model, reduce), rtol=1e-6, atol=1e-6)


def test_paper_link_is_the_decoders_query_positions_and_its_learned_ones_are_gone():
    model, _ = build()
    module = transformer_module(model)
    assert isinstance(module.queries_features, torch.nn.Embedding)  # the learned query features stay
    assert not any(isinstance(m, torch.nn.Embedding) and name.endswith("queries_embedder")
                   for name, m in model.named_modules())
    seen = {}
    hook = module.decoder.register_forward_pre_hook(
        lambda _, args, kwargs: seen.update(kwargs), with_kwargs=True)
    x = torch.randn(2, 6, 64, 64)
    with torch.no_grad():
        out = model(pixel_values=x)
    hook.remove()
    expected = module.queries_embedder.weight.unsqueeze(1).expand(-1, 2, -1)  # Q, B, C
    torch.testing.assert_close(seen["query_position_embeddings"], expected, rtol=0, atol=0)
    torch.testing.assert_close(seen["inputs_embeds"], module.queries_features.weight.unsqueeze(1).expand(-1, 2, -1))
    assert out.class_queries_logits.shape == (2, 8, 7)  # 6 classes + "no object"
    assert out.masks_queries_logits.shape == (2, 8, 8, 8)  # the ViT's 8x8 patch grid (patch 8, 64 px)


@pytest.mark.parametrize("init_weights", [True, False])
def test_paper_link_gradient_reaches_every_adapted_block(init_weights):
    model, _ = build(init_weights=init_weights)
    transformer_module(model).queries_embedder.weight.pow(2).sum().backward()
    for layer in blocks(model):
        assert layer.spectralmoe_B["default"].grad.abs().min() > 0  # every expert, every token width
        if not init_weights:  # with B = 0 the gradient of A (= dT B^T) is zero, as in the released code
            assert layer.spectralmoe_A["default"].grad.abs().sum() > 0


def test_paper_link_trains_with_the_mask2former_loss():
    model, _ = build(init_weights=True)
    link = transformer_module(model).queries_embedder
    x, mask_labels, class_labels = labelled_batch()
    model.train()
    out = model(pixel_values=x, mask_labels=mask_labels, class_labels=class_labels)
    (out.loss + model.get_aux_loss()).backward()
    for parameter in (link.transform.bias, link.merge.weight, link.merge.bias):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert torch.equal(link.transform.weight.grad, torch.zeros_like(link.transform.weight))  # its input: T = 0
    for layer in blocks(model):  # W_delta = 0 at init: the link is the experts' only path to the loss
        assert layer.spectralmoe_B["default"].grad.abs().sum() > 0


def test_paper_link_init_is_the_released_codes():
    """transform and merge are torch's default nn.Linear, as in the released code (not zero); with B_e = 0 the
    tokens are zero, so every query starts at the same positional embedding, merge([b, b, b]); a disabled adapter
    gives the link zero tokens too, so an untrained adapter changes nothing whether enabled or not."""
    model, _ = build(init_weights=True)
    link = transformer_module(model).queries_embedder
    for linear in (link.transform, link.merge):
        bound = 1 / math.sqrt(linear.in_features)  # kaiming_uniform(a=sqrt(5)) weight, uniform bias, both +-bound
        for tensor in (linear.weight, linear.bias):
            assert tensor.abs().max() <= bound and tensor.abs().max() > 0.9 * bound
    expected = link.merge(link.transform.bias.repeat_interleave(3))  # channel-major (c, pool) concatenation
    torch.testing.assert_close(link.weight, expected.expand(8, -1))
    with model.disable_adapter():
        torch.testing.assert_close(link.weight, expected.expand(8, -1))
    x = torch.randn(2, 6, 64, 64)
    model.eval()
    with torch.no_grad():
        on = model(pixel_values=x).masks_queries_logits
        with model.disable_adapter():
            off = model(pixel_values=x).masks_queries_logits
    # not bitwise: the disabled path runs the frozen original decoder, whose matmuls round differently
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-6)


def test_trainable_parameters_at_vit_large_equal_the_released_code():
    """Released configuration (configs/_base_/models/depthmoe_dinov3_mask2former_*.py): 24 blocks of width 1024,
    num_experts=6, lora_dims=16, token_length=100, two gates per block (visual, depth), Mask2Former width 256 with
    100 queries. The released DepthMoE module holds the adapter and the link: 5,737,985 parameters."""
    backbone = tf.Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                               image_size=512, patch_size=16, num_channels=4,
                               out_features=["stage8", "stage12", "stage16", "stage24"])
    config = tf.Mask2FormerConfig(backbone_config=backbone, num_labels=24, num_queries=100, hidden_dim=256)
    with torch.device("meta"):
        base = tf.Mask2FormerForUniversalSegmentation(config)
        plain_decoder = sum(p.numel() for p in base.model.transformer_module.parameters())
        attach_expert_token_queries(base)
        linked_decoder = sum(p.numel() for p in base.model.transformer_module.parameters())
    base.requires_grad_(False)
    link_path = "model.transformer_module.queries_embedder"
    model = get_peft_model(base, SpectralMoEConfig(num_experts=6, num_tokens=100, expert_rank=16,
                                                   modules_to_save=[link_path]))
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    adapter = sum(n for name, n in trainable.items() if "spectralmoe_" in name)
    link = sum(n for name, n in trainable.items() if "queries_embedder" in name)
    # per block: A 6x100x16 + B 6x16x1024 + 2 gates and 2 noise weights of 1024x6; shared: W_t2f, W_delta, s
    assert adapter == 24 * (6 * 100 * 16 + 6 * 16 * 1024 + 4 * 1024 * 6) + 2 * (1024 * 1024 + 1024) + 1 == 5_278_721
    assert link == (1024 * 256 + 256) + (768 * 256 + 256) == 459_264  # transform + merge
    assert sum(trainable.values()) == adapter + link == 5_737_985
    # the decoder lost its learned positional query embeddings (100 x 256) and gained the link
    assert linked_decoder == plain_decoder - 100 * 256 + link


# --- the simpler variant and what both share ------------------------------------------------------------------------


def reference_query_features(model, reduce="mean"):
    """From first principles: T_e = A_e B_e of the last block, reduced, projected, added to the base queries."""
    tokens = block_tokens(blocks(model)[-1])
    pooled = tokens.mean(0) if reduce == "mean" else tokens.reshape(-1, tokens.shape[-1])
    module = transformer_module(model).queries_features
    return module.query.weight + pooled @ module.projection.weight.t() + module.projection.bias


@pytest.mark.parametrize("reduce, num_queries", [("mean", 8), ("concat", 24)])
def test_mean_last_queries_come_from_the_last_blocks_expert_tokens(reduce, num_queries):
    model, _ = build(num_queries, reduce, query_link="mean_last")
    module = transformer_module(model).queries_features
    assert isinstance(module, ExpertTokenQueryFeatures)
    assert isinstance(transformer_module(model).queries_embedder, torch.nn.Embedding)  # positions stay learned
    torch.nn.init.normal_(module.projection.weight)
    torch.testing.assert_close(module.weight, reference_query_features(model, reduce))
    with model.disable_adapter():
        assert torch.equal(module.weight, module.query.weight)  # adapter off: the plain Mask2Former


def test_mean_last_identity_at_init_and_training_reaches_adapter_through_the_queries():
    model, _ = build(query_link="mean_last")
    module = transformer_module(model).queries_features
    assert torch.equal(module.weight, module.query.weight)  # zero projection: plain Mask2Former before training
    x, mask_labels, class_labels = labelled_batch()
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
    assert blocks(model)[-1].spectralmoe_B["default"].grad.abs().sum() > 0
    assert blocks(model)[0].spectralmoe_B["default"].grad is None  # only the last block feeds this variant


@pytest.mark.parametrize("query_link", ["paper", "mean_last"])
def test_wrong_query_count_is_named(query_link):
    model, _ = build(num_queries=5, query_link=query_link)
    with pytest.raises(ValueError, match="Mask2Former has 5 queries but the adapter gives 8 expert tokens"):
        model(pixel_values=torch.randn(1, 6, 64, 64))


def test_bad_link_arguments_are_named():
    base, _ = build_mask2former(6, 6, num_queries=8, hidden_dim=32)
    with pytest.raises(ValueError, match="query_link must be one of"):
        attach_expert_token_queries(base, query_link="rein")
    with pytest.raises(ValueError, match="reduce must be one of"):
        attach_expert_token_queries(base, reduce="max")
    attach_expert_token_queries(base)  # idempotent
    with pytest.raises(ValueError, match="already has query_link='paper', reduce='mean'"):
        attach_expert_token_queries(base, query_link="mean_last")
    with pytest.raises(ValueError, match="already has query_link='paper', reduce='mean'"):
        attach_expert_token_queries(base, reduce="concat")
    assert isinstance(base.model.transformer_module.queries_embedder, ExpertTokenQueryPositions)


@pytest.mark.parametrize("query_link", ["paper", "mean_last"])
def test_semantic_logits_and_reload(tmp_path, query_link):
    model, _ = build(query_link=query_link)
    with torch.no_grad():
        for parameter in transformer_module(model).parameters():
            parameter.normal_()
    model.eval()
    x = torch.randn(2, 6, 64, 64)
    with torch.no_grad():
        scores = semantic_logits(model(pixel_values=x), (64, 64))
    assert scores.shape == (2, 6, 64, 64) and torch.isfinite(scores).all()
    model.save_pretrained(tmp_path)
    base, _ = build_mask2former(6, 6, num_queries=8, image_size=64, hidden_dim=32, query_link=query_link)
    # is_trainable: same requires_grad as the trained model, so even the last bit matches (transformers' decoder
    # matmuls round differently for frozen weights; a frozen load agrees to ~1e-7)
    loaded = PeftModel.from_pretrained(base, tmp_path, is_trainable=True).eval()
    with torch.no_grad():
        assert torch.equal(semantic_logits(loaded(pixel_values=x), (64, 64)), scores)
