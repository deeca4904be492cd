"""The factored (low-rank) expert path equals the plain dense one, in outputs and gradients; the layer uses
whichever is cheaper and both agree with the per-token reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spectralmoe_peft.experts import (
    chosen_expert_coefficients,
    expert_basis,
    expert_coefficients,
    expert_mixture,
    expert_tokens,
    expert_value_factors,
    expert_values,
    use_chosen_experts,
    use_low_rank,
)


def inputs(seed=0, batch=2, tokens=7, experts=3, m=5, rank=4, dim=12, top_k=2, with_indices=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, dim, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(experts, m, rank, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(experts, rank, dim, generator=g, dtype=torch.float64, requires_grad=True)
    linear = nn.Linear(dim, dim).double()
    logits = torch.randn(batch, tokens, experts, generator=g, dtype=torch.float64, requires_grad=True)
    probs = logits.softmax(-1)
    top = probs.topk(top_k, -1)
    combine = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
    if with_indices:
        return x, a, b, linear, logits, combine, top.indices
    return x, a, b, linear, logits, combine


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("top_k", [1, 2])
def test_low_rank_equals_dense_in_outputs_and_gradients(bias, top_k):
    x, a, b, linear, logits, combine = inputs(top_k=top_k)
    if not bias:
        linear.bias = None
    dense = expert_mixture(x, expert_tokens(a, b), expert_values(expert_tokens(a, b), linear), combine)
    basis = expert_basis(expert_value_factors(b, linear), linear.bias)
    fast = expert_coefficients(x, a, b, linear.bias, combine) @ basis
    torch.testing.assert_close(fast, dense, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(dense)
    params = [x, a, b, logits, linear.weight] + ([linear.bias] if bias else [])
    grads_dense = torch.autograd.grad((dense * upstream).sum(), params, retain_graph=True)
    grads_fast = torch.autograd.grad((fast * upstream).sum(), params)
    for g_dense, g_fast in zip(grads_dense, grads_fast):
        torch.testing.assert_close(g_fast, g_dense, rtol=1e-10, atol=1e-12)


def test_path_choice_follows_the_arithmetic():
    assert use_low_rank(num_tokens=100, rank=16, hidden_size=1024)  # the paper's setting: ~5x fewer FLOPs
    assert not use_low_rank(num_tokens=4, rank=64, hidden_size=32)  # rank above M: dense is cheaper


@pytest.mark.parametrize("mode", ["cross_attention", "add", None])
@pytest.mark.parametrize("bias", [True, False])
def test_fusion_in_coefficient_space_equals_fusion_in_feature_space(mode, bias):
    from spectralmoe_peft.fusion import fuse, fuse_coefficients

    x, a, b, linear, _, combine = inputs(top_k=2, tokens=11)
    depth = torch.randn_like(x)
    if not bias:
        linear.bias = None
    basis = expert_basis(expert_value_factors(b, linear), linear.bias)
    u_visual = expert_coefficients(x, a, b, linear.bias, combine)
    u_depth = expert_coefficients(depth, a, b, linear.bias, combine.flip(1)) if mode else None
    tokens = expert_tokens(a, b)
    values = expert_values(tokens, linear)  # the plain path is the judge
    delta_visual = expert_mixture(x, tokens, values, combine)
    torch.testing.assert_close(u_visual @ basis, delta_visual, rtol=1e-10, atol=1e-12)
    delta_depth = expert_mixture(depth, tokens, values, combine.flip(1)) if mode else None
    expected = fuse(delta_visual, delta_depth, mode or "cross_attention")
    actual = fuse_coefficients(u_visual, u_depth, basis, mode or "cross_attention")
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(expected.sum(), [x, a, b], retain_graph=True)
    for g_expected, g_actual in zip(grads, torch.autograd.grad(actual.sum(), [x, a, b])):
        torch.testing.assert_close(g_actual, g_expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_chosen_experts_equal_all_experts_in_outputs_and_gradients(bias, top_k):
    """Scoring only each token's k chosen experts gives the all-expert coefficients (and their gradients, gate
    included) exactly: the unchosen experts' weights are zero in both."""
    x, a, b, linear, logits, combine, indices = inputs(experts=5, top_k=top_k, with_indices=True)
    if not bias:
        linear.bias = None
    every = expert_coefficients(x, a, b, linear.bias, combine)
    chosen = chosen_expert_coefficients(x, a, b, linear.bias, combine, indices)
    torch.testing.assert_close(chosen, every, rtol=1e-12, atol=1e-13)
    upstream = torch.randn_like(every)
    params = [x, a, b, logits]
    grads_every = torch.autograd.grad((every * upstream).sum(), params, retain_graph=True)
    grads_chosen = torch.autograd.grad((chosen * upstream).sum(), params)
    for g_every, g_chosen in zip(grads_every, grads_chosen):
        torch.testing.assert_close(g_chosen, g_every, rtol=1e-12, atol=1e-13)


def test_chosen_experts_path_is_taken_where_it_is_cheaper():
    assert use_chosen_experts(num_experts=6, top_k=1, num_tokens=100, rank=16)  # the paper's setting
    assert use_chosen_experts(num_experts=24, top_k=1, num_tokens=100, rank=16)
    # k masked matmuls per token cost k times the all-expert ones (measured slower at E=6, k=3 and E=24, k=4)
    assert not use_chosen_experts(num_experts=6, top_k=3, num_tokens=100, rank=16)
    assert not use_chosen_experts(num_experts=24, top_k=4, num_tokens=100, rank=16)
    assert not use_chosen_experts(num_experts=4, top_k=4, num_tokens=100, rank=16)  # every expert is chosen
    assert not use_chosen_experts(num_experts=2, top_k=1, num_tokens=4, rank=16)  # masks wider than the scores
