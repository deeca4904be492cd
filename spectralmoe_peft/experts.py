"""Low-rank token experts, computed for all experts at once (no per-expert loops, no host syncs).

Expert e owns M tokens T_e = A_e B_e (M x D). A token x attends over them, S = softmax(x T_e^T / sqrt(D)), and its
adjustment is the attention-weighted sum of the value table W_t2f(T_e), skipping token 1 (the sink). For the small
E*M of this method, scoring every token against every expert's tokens in one matmul and zeroing unchosen experts
through the gate weights is exact, sync-free, and gives every parameter a gradient each step (DDP-safe).
"""

from __future__ import annotations

import math

from einops import einsum
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
