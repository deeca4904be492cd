"""Fusion of the visual and depth adjustments.

Cross-attention with the visual adjustments as queries and the depth adjustments as keys and values,
Phi = Dv + softmax(Dv Dd^T / sqrt(D)) Dd, through ``scaled_dot_product_attention`` so no N x N matrix is kept
(the released code materialized one and then used only its diagonal).
"""

from __future__ import annotations

import math
from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def fuse(delta_visual: Tensor, delta_depth: Optional[Tensor], mode: str) -> Tensor:
    """delta_visual, delta_depth: (B, N, D) -> Phi (B, N, D). No depth stream: Phi = delta_visual."""
    if delta_depth is None:
        return delta_visual
    if mode == "add":
        return delta_visual + delta_depth
    if mode == "cross_attention":
        query = delta_visual.unsqueeze(1)  # B, 1 head, N, D
        key_value = delta_depth.unsqueeze(1).to(query.dtype)
        attended = F.scaled_dot_product_attention(query, key_value, key_value)  # default scale 1/sqrt(D)
        return delta_visual + attended.squeeze(1)
    raise ValueError(f"Unknown fusion {mode!r}; expected 'cross_attention' or 'add'.")


def fused_coefficients(
    coefficients_visual: Tensor, coefficients_depth: Optional[Tensor], basis: Tensor, mode: str
) -> Tensor:
    """The coordinates of the same Phi as :func:`fuse` over a shared basis: Phi = fused_coefficients(...) @ basis, for
    adjustments given as coefficients over that basis (Delta = U @ basis).

    With Dv = Uv K and Dd = Ud K: softmax(Dv Dd^T / sqrt(D)) Dd = softmax((Uv K K^T) Ud^T / sqrt(D)) Ud K, i.e.
    attention with head width E*r + 1 instead of D (about 4x less work at D=384, 10x at D=1024).
    coefficients_*: (B, N, K); basis: (K, D) -> (B, N, K).
    """
    if coefficients_depth is None:
        return coefficients_visual
    if mode == "add":
        return coefficients_visual + coefficients_depth
    if mode == "cross_attention":
        gram = basis @ basis.t()  # K, K
        query = (coefficients_visual @ gram).unsqueeze(1)  # B, 1 head, N, K
        key_value = coefficients_depth.unsqueeze(1).to(query.dtype)
        attended = F.scaled_dot_product_attention(query, key_value, key_value, scale=1.0 / math.sqrt(basis.shape[1]))
        return coefficients_visual + attended.squeeze(1)
    raise ValueError(f"Unknown fusion {mode!r}; expected 'cross_attention' or 'add'.")


def fuse_coefficients(
    coefficients_visual: Tensor, coefficients_depth: Optional[Tensor], basis: Tensor, mode: str
) -> Tensor:
    """The same Phi as :func:`fuse`, for adjustments given as coefficients over a shared basis: (B, N, D)."""
    return fused_coefficients(coefficients_visual, coefficients_depth, basis, mode) @ basis
