"""Fusion of the visual and depth adjustments.

Cross-attention with the visual adjustments as queries and the depth adjustments as keys and values,
Phi = Dv + softmax(Dv Dd^T / sqrt(D)) Dd, through ``scaled_dot_product_attention`` so no N x N matrix is kept
(the released code materialized one and then used only its diagonal).
"""

from __future__ import annotations

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
