"""Low-rank token experts, computed for all experts at once (no per-expert loops, no host syncs).

Expert e owns M tokens T_e = A_e B_e (M x D). A token x attends over them, S = softmax(x T_e^T / sqrt(D)), and its
adjustment is the attention-weighted sum of the value table W_t2f(T_e), skipping token 1 (the sink). For the small
E*M of this method, scoring every token against every expert's tokens in one matmul and zeroing unchosen experts
through the gate weights is exact, sync-free, and gives every parameter a gradient each step (DDP-safe).

Three ways to compute it: the plain one (``expert_tokens`` / ``expert_values`` / ``expert_mixture``, literally the
formula); the factored one (``expert_coefficients`` over ``expert_basis``), which never forms T_e or the value
table and is what the layer runs whenever ``use_low_rank`` says it is cheaper; and the factored one for the chosen
experts only (``chosen_expert_coefficients``), whose softmax and saved tensors are k*M per token instead of E*M, what
the layer runs whenever ``use_chosen_experts`` says so (few experts chosen out of many). Tests hold them equal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

from .routing import at_least_fp32


def expert_tokens(a: Tensor, b: Tensor) -> Tensor:
    """T = A B per expert. a: (E, M, r), b: (E, r, D) -> (E, M, D)."""
    return einsum(a, b, "e m r, e r d -> e m d")


def expert_values(tokens: Tensor, token_to_feature: nn.Linear) -> Tensor:
    """Value table W_t2f(T_e), computed once per layer and forward and shared by both streams. -> (E, M, D)."""
    return token_to_feature(tokens)


def expert_mixture(x: Tensor, tokens: Tensor, values: Tensor, combine_weights: Tensor) -> Tensor:
    """Delta(x) = sum_e g_e(x) sum_{t>=2} S_t(x) W_t2f(T_e[t]).

    x: (B, N, D); tokens, values: (E, M, D); combine_weights: (B, N, E), zero outside each token's top-k.
    """
    scores = einsum(x, tokens, "b n d, e m d -> b n e m") / math.sqrt(x.shape[-1])
    attention = at_least_fp32(scores).softmax(dim=-1)[..., 1:]  # B, N, E, M-1: the sink's share is dropped
    weights = (attention * combine_weights.unsqueeze(-1)).to(values.dtype)
    return einsum(weights, values[:, 1:], "b n e m, e m d -> b n d")


def expert_value_factors(b: Tensor, token_to_feature: nn.Linear) -> Tensor:
    """C_e = B_e W_t2f^T, so that W_t2f(T_e) = A_e C_e + bias: the value table in factored form. -> (E, r, D).

    Computed once per layer and forward and shared by both streams, like the value table it stands for.
    """
    return einsum(b, token_to_feature.weight, "e r d, o d -> e r o")


def use_low_rank(num_tokens: int, rank: int, hidden_size: int) -> bool:
    """The factored path costs ~r(D + M) per token and expert, the dense one ~M D: take the cheaper."""
    return rank * (hidden_size + num_tokens) < num_tokens * hidden_size


def expert_projections(x: Tensor, b: Tensor) -> Tensor:
    """x B_e^T for every expert: one matmul, E*r wide. x: (B, N, D); b: (E, r, D) -> (B, N, E, r)."""
    return einsum(x, b, "b n d, e r d -> b n e r")


def expert_coefficients(x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None, combine_weights: Tensor) -> Tensor:
    """Delta(x) in the coordinates of :func:`expert_basis`: Delta(x) = coefficients @ basis. -> (B, N, E*r [+1]).

    Every expert adjustment lies in the span of the rows of C_e (and the bias): keeping the (E*r + 1)-dim
    coordinates lets the fusion attend in that small space instead of in D dimensions (exact, see fusion.py).
    """
    return coefficients_of_projections(expert_projections(x, b), a, bias, combine_weights, x.shape[-1], b.dtype)


def coefficients_of_projections(
    projected: Tensor, a: Tensor, bias: Tensor | None, combine_weights: Tensor, hidden_size: int, dtype: torch.dtype
) -> Tensor:
    """:func:`expert_coefficients` from the projections x B_e^T (B, N, E, r), scoring every expert."""
    scores = einsum(projected, a, "b n e r, e m r -> b n e m") / math.sqrt(hidden_size)
    attention = at_least_fp32(scores).softmax(dim=-1)  # B, N, E, M
    weights = (attention * combine_weights.unsqueeze(-1)).to(dtype)
    a_values = torch.cat([torch.zeros_like(a[:, :1]), a[:, 1:]], dim=1).to(dtype)  # the sink contributes nothing
    mixed = einsum(weights, a_values, "b n e m, e m r -> b n e r")
    coefficients = rearrange(mixed, "b n e r -> b n (e r)")
    if bias is None:
        return coefficients
    mass = (combine_weights * (1.0 - attention[..., 0])).sum(-1, keepdim=True)  # B, N, 1: weight off the sink
    return torch.cat([coefficients, mass.to(dtype)], dim=-1)


def expert_basis(value_factors: Tensor, bias: Tensor | None) -> Tensor:
    """The rows C_e[j] of every expert (and the W_t2f bias): (E*r [+1], D)."""
    basis = rearrange(value_factors, "e r d -> (e r) d")
    return basis if bias is None else torch.cat([basis, bias.to(basis.dtype).unsqueeze(0)], dim=0)


# what one elementwise op (with its backward, memory-bound) costs next to one multiply-add of a matmul, on a CPU; a
# rough weight for the choice below, not a measurement of any one machine
_ELEMENTWISE_COST = 16


def use_chosen_experts(num_experts: int, top_k: int, num_tokens: int, rank: int) -> bool:
    """Per token, scoring every expert costs E*r*M multiply-adds twice (scores, mixing) and ~E*M elementwise work
    (softmax, weights, their gradients, what backward keeps); scoring the k chosen ones costs k times those matmuls
    (one masked matmul per chosen slot) and ~k*(M + E*r) elementwise work (the one-hot masks live in the E*r rank
    space). Take the cheaper: the chosen path for top_k = 1, the all-expert one as k grows."""
    matmul = 2 * num_experts * rank * num_tokens
    every = matmul + _ELEMENTWISE_COST * num_experts * num_tokens
    chosen = top_k * (matmul + _ELEMENTWISE_COST * (num_tokens + num_experts * rank))
    return chosen < every


def chosen_expert_coefficients(
    x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None, combine_weights: Tensor, topk_indices: Tensor
) -> Tensor:
    """:func:`expert_coefficients` computed for each token's k chosen experts only. -> (B, N, E*r [+1]).

    No gather of per-token expert weights and no per-expert loop: the chosen expert's projection is kept by a one-hot
    mask in the (E*r)-dim rank space, so scoring is one matmul against all experts' A stacked, (E*r) x M, whose
    output is the chosen expert's M scores only (the other experts' rows meet zeros). The mixing goes back the same way.
    x: (B, N, D); a: (E, M, r); b: (E, r, D); combine_weights: (B, N, E); topk_indices: (B, N, k).
    """
    return chosen_coefficients_of_projections(
        expert_projections(x, b), a, bias, combine_weights, topk_indices, x.shape[-1], b.dtype
    )


def chosen_coefficients_of_projections(
    projected: Tensor,
    a: Tensor,
    bias: Tensor | None,
    combine_weights: Tensor,
    topk_indices: Tensor,
    hidden_size: int,
    dtype: torch.dtype,
) -> Tensor:
    """:func:`chosen_expert_coefficients` from the projections x B_e^T (B, N, E, r)."""
    num_experts = a.shape[0]
    chosen = F.one_hot(topk_indices, num_experts).to(dtype).unsqueeze(-1)  # B, N, k, E, 1
    masked = rearrange(projected.unsqueeze(2) * chosen, "b n k e r -> b n k (e r)")  # B, N, k, E*r
    a_stacked = rearrange(a, "e m r -> (e r) m")
    scores = (masked @ a_stacked) / math.sqrt(hidden_size)  # B, N, k, M: the chosen expert's scores
    attention = at_least_fp32(scores).softmax(dim=-1)  # B, N, k, M
    chosen_weights = combine_weights.gather(-1, topk_indices)  # B, N, k: g at the chosen experts
    weights = (attention * chosen_weights.unsqueeze(-1)).to(dtype)
    a_values = torch.cat([torch.zeros_like(a[:, :1]), a[:, 1:]], dim=1).to(dtype)  # the sink contributes nothing
    mixed = weights @ rearrange(a_values, "e m r -> m (e r)")  # B, N, k, E*r: every expert's rows, weighted alike
    coefficients = (rearrange(mixed, "b n k (e r) -> b n k e r", e=num_experts) * chosen).sum(2)  # chosen rows only
    coefficients = rearrange(coefficients, "b n e r -> b n (e r)")
    if bias is None:
        return coefficients
    mass = (chosen_weights * (1.0 - attention[..., 0])).sum(-1, keepdim=True)  # B, N, 1
    return torch.cat([coefficients, mass.to(dtype)], dim=-1)
