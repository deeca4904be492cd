"""Gates and balance losses, checked against independent computations."""

from __future__ import annotations

import pytest
import torch

from spectralmoe_peft.routing import _prob_in_top_k, cv_squared, gate_logits, route


def test_gate_logits_match_definitions():
    x, w = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    distance = torch.cdist(x, w.unsqueeze(0).expand(2, 3, 8))
    torch.testing.assert_close(gate_logits(x, w, "softmax"), x @ w.T)
    torch.testing.assert_close(gate_logits(x, w, "laplace"), -distance)
    torch.testing.assert_close(gate_logits(x, w, "gaussian"), -distance**2)
    with pytest.raises(ValueError, match="gating"):
        gate_logits(x, w, "cosine")


def test_cv_squared():
    values = torch.tensor([1.0, 2.0, 3.0, 6.0])
    torch.testing.assert_close(cv_squared(values), values.var() / values.mean() ** 2)
    assert cv_squared(torch.tensor([5.0])) == 0  # one expert: nothing to balance
    assert cv_squared(torch.full((4,), 2.0)) == 0


def test_prob_in_top_k_matches_monte_carlo():
    """P(e in top-k) when only e's noise is redrawn, against sampling that noise many times."""
    torch.manual_seed(0)
    clean = torch.tensor([[[0.3, -0.2, 0.9, 0.1]]], dtype=torch.float64)
    std = torch.tensor([[[0.5, 0.7, 0.4, 0.6]]], dtype=torch.float64)
    noisy = clean + torch.randn_like(clean) * std
    top_k = 2
    prob = _prob_in_top_k(clean, noisy, std, top_k)[0, 0]
    samples = 200_000
    for e in range(4):
        others = noisy[0, 0].clone().expand(samples, 4).clone()
        others[:, e] = clean[0, 0, e] + torch.randn(samples, dtype=torch.float64) * std[0, 0, e]
        in_top = (others.topk(top_k, dim=-1).indices == e).any(-1).double().mean()
        assert abs(in_top - prob[e]) < 5e-3


def test_route_statistics_without_noise():
    torch.manual_seed(0)
    x, gate = torch.randn(2, 6, 8), torch.randn(3, 8)
    out = route(x, gate, None, top_k=2, gating="softmax", noisy=False)
    probs = (x @ gate.T).softmax(-1)
    top = probs.topk(2, dim=-1)
    dense = torch.zeros_like(probs).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(out.combine_weights, dense)
    load = torch.zeros(3).index_add_(0, top.indices.flatten(), torch.ones(24))
    torch.testing.assert_close(out.balance_loss, cv_squared(dense.sum((0, 1))) + cv_squared(load))
    torch.testing.assert_close(out.expert_load, load / 24)
    torch.testing.assert_close(out.z_loss, (x @ gate.T).logsumexp(-1).pow(2).mean())
    torch.testing.assert_close(out.switch_loss, 3 * (load / 24 * probs.mean((0, 1))).sum())


def test_masked_tokens_do_not_count():
    torch.manual_seed(0)
    x, gate = torch.randn(1, 6, 8), torch.randn(3, 8)
    valid = torch.tensor([[True, True, True, False, False, False]])
    masked = route(x, gate, None, top_k=1, gating="laplace", noisy=False, valid=valid)
    kept = route(x[:, :3], gate, None, top_k=1, gating="laplace", noisy=False)
    torch.testing.assert_close(masked.balance_loss, kept.balance_loss)
    torch.testing.assert_close(masked.expert_load, kept.expert_load)


def test_balance_loss_has_gradient_through_noisy_load():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8)
    gate = torch.randn(4, 8, requires_grad=True)
    noise = torch.zeros(8, 4, requires_grad=True)
    route(x, gate, noise, top_k=1, gating="laplace", noisy=True).balance_loss.backward()
    assert gate.grad.abs().sum() > 0 and noise.grad.abs().sum() > 0


def _monte_carlo_load(noisy: torch.Tensor, clean: torch.Tensor, std: torch.Tensor, valid: torch.Tensor, top_k: int,
                      samples: int, generator: torch.Generator) -> torch.Tensor:
    """Noisy top-k's load, sampled: for each valid token and expert e, redraw e's noise only (the others keep theirs)
    and count how often e lands in the top-k; sum the frequencies over valid tokens. (E,)"""
    tokens = noisy[valid]  # T, E: the noisy logits of the valid tokens
    clean_v, std_v = clean[valid], std[valid]
    num_tokens, num_experts = tokens.shape
    load = torch.zeros(num_experts, dtype=noisy.dtype)
    for e in range(num_experts):
        draws = tokens.unsqueeze(1).repeat(1, samples, 1)  # T, S, E
        fresh = torch.randn(num_tokens, samples, generator=generator, dtype=noisy.dtype)
        draws[..., e] = clean_v[:, e : e + 1] + fresh * std_v[:, e : e + 1]
        in_top = (draws.topk(top_k, dim=-1).indices == e).any(-1)  # T, S
        load[e] = in_top.to(noisy.dtype).mean(1).sum()
    return load


@pytest.mark.parametrize("top_k", [1, 2])
def test_noisy_balance_loss_value_matches_monte_carlo(top_k):
    """The value of cv^2(importance) + cv^2(load) in training, with noise and a nodata mask, against an independent
    computation: importance from the noisy top-k weights of the valid tokens, load by sampling each expert's noise.

    Kills: clean and noisy logits swapped in the load estimate; the noisy load counting masked (nodata) tokens."""
    batch, num, dim, num_experts = 2, 6, 8, 4
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(batch, num, dim, generator=generator, dtype=torch.float64)
    # unbalanced gates (so cv^2 is far from 0) and noise of the size of the logit gaps (so the noise matters)
    gate = torch.randn(num_experts, dim, generator=generator, dtype=torch.float64) * torch.tensor(
        [[0.5], [1.0], [1.5], [2.0]], dtype=torch.float64)
    noise_weight = torch.randn(dim, num_experts, generator=generator, dtype=torch.float64) * 0.3
    valid = torch.ones(batch, num, dtype=torch.bool)
    valid[0, :4] = False  # masked tokens: they count for neither importance nor load
    valid[1, 5] = False
    x[~valid] = gate[3]  # as nodata patches do: one value, routed alike (here near expert 3), so counting them shows

    torch.manual_seed(5)
    out = route(x, gate, noise_weight, top_k=top_k, gating="laplace", noisy=True, valid=valid)
    torch.manual_seed(5)  # route's only random draw is its gate noise: the same seed gives the same noise
    eps = torch.randn(batch, num, num_experts, dtype=torch.float64)

    clean = -torch.cdist(x, gate.unsqueeze(0).expand(batch, -1, -1))  # Laplace gate: -||x - w_e||
    std = torch.nn.functional.softplus(x @ noise_weight) + 1e-2
    noisy = clean + eps * std
    probs = noisy.softmax(-1)
    top = probs.topk(top_k, dim=-1)
    top_values = top.values / top.values.sum(-1, keepdim=True) if top_k > 1 else top.values  # k=1: g = p, not 1
    weights = torch.zeros_like(probs).scatter(-1, top.indices, top_values)
    torch.testing.assert_close(out.combine_weights, weights)  # the noise was reproduced
    importance = weights[valid].sum(0)

    load = _monte_carlo_load(noisy, clean, std, valid, top_k, samples=100_000, generator=generator)
    expected = cv_squared(importance) + cv_squared(load)
    # sampling error of each load entry <= sqrt(7 tokens * 0.25 / 1e5) ~ 4e-3 on loads of O(1); measured agreement
    # 3e-4 on losses of ~2.5. Planted bugs move the loss by 5-6 % (clean/noisy swapped in the load) and 30 %
    # (masked tokens counted in the load, or in the importance)
    assert cv_squared(load) > 0.5
    torch.testing.assert_close(out.balance_loss, expected, rtol=0.01, atol=0)
