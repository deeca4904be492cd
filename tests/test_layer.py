"""The batched layer equals the plain per-token reference, in outputs and gradients (float64)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from reference import ReferenceParams, reference_refine
from tiny_models import HIDDEN, make_model

from spectralmoe_peft import SpectralMoEConfig, SpectralMoELayer

B, N = 2, 9


def build(**overrides):
    settings = dict(num_experts=4, expert_rank=3, num_tokens=5, init_weights=False, scale_init=0.7)
    config = SpectralMoEConfig(**{**settings, **overrides})
    model = get_peft_model(make_model(), config).double()
    layer = next(m for m in model.modules() if isinstance(m, SpectralMoELayer))
    return model, layer


def params_of(model, layer, name="default") -> ReferenceParams:
    tuner = model.base_model
    return ReferenceParams(
        a=layer.spectralmoe_A[name],
        b=layer.spectralmoe_B[name],
        gate_visual=layer.spectralmoe_gate_visual[name],
        noise_visual=layer.spectralmoe_gate_visual_noise[name] if name in layer.spectralmoe_gate_visual_noise else None,
        gate_depth=layer.spectralmoe_gate_depth[name] if name in layer.spectralmoe_gate_depth else None,
        noise_depth=layer.spectralmoe_gate_depth_noise[name] if name in layer.spectralmoe_gate_depth_noise else None,
        t2f_weight=tuner.spectralmoe_token_to_feature[name].weight,
        t2f_bias=tuner.spectralmoe_token_to_feature[name].bias,
        delta_weight=tuner.spectralmoe_delta[name].weight,
        delta_bias=tuner.spectralmoe_delta[name].bias,
        scale=tuner.spectralmoe_scale[name],
    )


def compare(model, layer, *, with_depth: bool, top_k: int, gating: str, fusion: str = "cross_attention",
            noisy: bool = False):
    feats = torch.randn(B, N, HIDDEN, dtype=torch.float64, requires_grad=True)
    depth = torch.randn(B, N, HIDDEN, dtype=torch.float64, requires_grad=True) if with_depth else None
    probe = torch.randn(B, N, HIDDEN, dtype=torch.float64)
    model.train(noisy)
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = [feats] + ([depth] if with_depth else [])

    torch.manual_seed(123)
    fast = layer.refine_patch_tokens(feats, depth, "default")
    fast_grads = torch.autograd.grad((fast * probe).sum(), inputs + params, allow_unused=True)

    torch.manual_seed(123)  # the layer draws the visual stream's noise first, then the depth stream's
    num_experts = layer.spectralmoe_A["default"].shape[0]
    eps_v = torch.randn(B, N, num_experts, dtype=torch.float64) if noisy else None
    eps_d = torch.randn(B, N, num_experts, dtype=torch.float64) if noisy and with_depth else None
    slow = reference_refine(
        feats, depth, params_of(model, layer), top_k=top_k, gating=gating, fusion=fusion, eps_visual=eps_v,
        eps_depth=eps_d,
    )
    slow_grads = torch.autograd.grad((slow * probe).sum(), inputs + params, allow_unused=True)

    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9)
    checked = 0
    for fast_grad, slow_grad, tensor in zip(fast_grads, slow_grads, inputs + params):
        if slow_grad is None:  # parameters of the other layer, untouched by both
            assert fast_grad is None or torch.count_nonzero(fast_grad) == 0
            continue
        torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-8, atol=1e-9)
        checked += 1
    assert checked >= 9  # A, B, gate (+noise), t2f, delta, scale, and the inputs were all compared


@pytest.mark.parametrize("gating", ["softmax", "laplace", "gaussian"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("with_depth", [True, False])
def test_fast_layer_matches_reference(gating, top_k, with_depth):
    model, layer = build(top_k=top_k, gating=gating, use_depth=with_depth)
    compare(model, layer, with_depth=with_depth, top_k=top_k, gating=gating)


@pytest.mark.parametrize("low_rank", [True, False])
@pytest.mark.parametrize("with_depth", [True, False])
def test_both_expert_paths_match_reference(low_rank, with_depth, monkeypatch):
    """The layer takes the factored or the dense expert path by arithmetic cost; force each in turn."""
    import spectralmoe_peft.layer as layer_module

    chosen = []
    monkeypatch.setattr(layer_module, "use_low_rank", lambda *args: chosen.append(low_rank) or low_rank)
    model, layer = build(top_k=2, use_depth=with_depth)
    compare(model, layer, with_depth=with_depth, top_k=2, gating="laplace")
    assert chosen and all(c == low_rank for c in chosen)


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("chosen_only", [True, False])
@pytest.mark.parametrize("top_k", [1, 2])
def test_chosen_and_all_expert_paths_match_reference(chosen_only, top_k, recompute, monkeypatch):
    """The factored path scores every expert or only the chosen ones, by cost; force each in turn (noisy routing,
    both streams)."""
    import spectralmoe_peft.layer as layer_module

    chosen = []
    monkeypatch.setattr(layer_module, "use_chosen_experts", lambda *args: chosen.append(chosen_only) or chosen_only)
    model, layer = build(top_k=top_k, gating="laplace", recompute_expert_attention=recompute)
    compare(model, layer, with_depth=True, top_k=top_k, gating="laplace", noisy=True)
    assert chosen and all(c == chosen_only for c in chosen)


@pytest.mark.parametrize("top_k", [1, 2])
def test_many_experts_fuse_in_feature_space_and_match_reference(top_k):
    """With E*r + 1 wider than the ViT (here 4*9 + 1 > 32) the fusion attends in feature space, not coefficient space;
    the result is the same."""
    assert 4 * 9 + 1 > HIDDEN
    model, layer = build(top_k=top_k, gating="laplace", expert_rank=9, num_tokens=40)
    compare(model, layer, with_depth=True, top_k=top_k, gating="laplace", noisy=True)


@pytest.mark.parametrize("recompute", [True, False])
def test_expert_attention_is_recomputed_not_kept_for_backward(recompute):
    """With recompute_expert_attention=True, what backward keeps of a training forward has no (B, N, *, M)
    expert-attention tensor in it: the attention is recomputed in backward (the refined tokens still match the
    reference, above). With it off, backward keeps the attention (the probe sees it)."""
    num_tokens = 11  # M, a size nothing else in this model has
    model, layer = build(top_k=1, num_tokens=num_tokens, recompute_expert_attention=recompute)
    model.train()
    feats = torch.randn(B, N, HIDDEN, dtype=torch.float64, requires_grad=True)
    depth = torch.randn(B, N, HIDDEN, dtype=torch.float64, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer.refine_patch_tokens(feats, depth, "default")
    assert saved, "nothing was saved for backward: the probe is broken"
    per_token = [shape for shape in saved if len(shape) >= 3 and shape[:2] == (B, N) and shape[-1] == num_tokens]
    if recompute:
        assert not per_token, f"expert attention kept for backward: {per_token}"
    else:
        assert per_token, "the probe does not see the expert attention it should find kept"
    out.sum().backward()  # and backward still works (recomputing it)
    assert layer.spectralmoe_A["default"].grad is not None


@pytest.mark.parametrize("top_k", [1, 2])
def test_noisy_gating_matches_reference(top_k):
    model, layer = build(top_k=top_k, gating="laplace")
    compare(model, layer, with_depth=True, top_k=top_k, gating="laplace", noisy=True)


def test_add_fusion_matches_reference():
    model, layer = build(top_k=2, gating="laplace", fusion="add")
    compare(model, layer, with_depth=True, top_k=2, gating="laplace", fusion="add")


def test_shared_gate_matches_reference():
    model, layer = build(top_k=1, gating="softmax", share_gates=True)
    assert "default" not in layer.spectralmoe_gate_depth
    compare(model, layer, with_depth=True, top_k=1, gating="softmax")


def test_single_expert_is_rein_like():
    model, layer = build(num_experts=1, top_k=1)
    compare(model, layer, with_depth=True, top_k=1, gating="laplace")


def test_prefix_tokens_pass_through_unchanged():
    model, _ = build(top_k=2)
    model.eval()
    captured = {}

    def capture(name):
        def hook(module, args, output):
            captured[name] = output[0] if isinstance(output, tuple) else output

        return hook

    layer = model.base_model.model.encoder.layer[0]
    layer.base_layer.register_forward_hook(capture("block"), prepend=True)  # runs before the refinement
    layer.register_forward_hook(capture("adapted"))
    model(pixel_values=torch.randn(2, 3, 32, 32, dtype=torch.float64), depth_hidden_states=_grid_depth(3))
    assert torch.equal(captured["adapted"][:, :1], captured["block"][:, :1])
    assert not torch.allclose(captured["adapted"][:, 1:], captured["block"][:, 1:])


def _grid_depth(num: int, width: int = HIDDEN):
    return tuple(torch.randn(2, width, 4, 4, dtype=torch.float64) for _ in range(num))
