"""A plain, per-token implementation of one SpectralMoE refinement, written straight from DESIGN.md section 1.

Deliberately slow and obvious: Python loops over tokens and chosen experts, one softmax at a time, explicit
attention weights. The package's batched implementation is checked against this, for outputs and gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ReferenceParams:
    a: Tensor  # E, M, r
    b: Tensor  # E, r, D
    gate_visual: Tensor  # E, D
    noise_visual: Tensor  # D, E
    gate_depth: Optional[Tensor]  # E, D (None: the visual gate is shared)
    noise_depth: Optional[Tensor]
    t2f_weight: Tensor  # D, D
    t2f_bias: Tensor
    delta_weight: Tensor
    delta_bias: Tensor
    scale: Tensor  # scalar


def gate_logit(x: Tensor, w: Tensor, gating: str) -> Tensor:
    if gating == "softmax":
        return torch.dot(x, w)
    distance = torch.sqrt(((x - w) ** 2).sum())
    return -distance if gating == "laplace" else -(distance**2)


def token_delta(x, tokens, values, gate, noise, top_k, gating, eps: Optional[Tensor]) -> Tensor:
    num_experts, dim = gate.shape[0], x.shape[0]
    h = torch.stack([gate_logit(x, gate[e], gating) for e in range(num_experts)])
    if eps is not None:
        h = h + eps * (F.softplus(x @ noise) + 1e-2)
    p = torch.softmax(h, dim=0)
    chosen = torch.argsort(p, descending=True)[:top_k].tolist()
    g = torch.stack([p[e] for e in chosen])
    if top_k > 1:
        g = g / g.sum()
    out = torch.zeros_like(x)
    for weight, e in zip(g, chosen):
        s = torch.softmax(torch.stack([torch.dot(x, tokens[e][t]) for t in range(len(tokens[e]))]) / math.sqrt(dim), 0)
        expert_out = sum(s[t] * values[e][t] for t in range(1, len(tokens[e])))  # token 1 (index 0) is the sink
        out = out + weight * expert_out
    return out


def reference_refine(
    feats: Tensor,
    depth: Optional[Tensor],
    params: ReferenceParams,
    *,
    top_k: int,
    gating: str,
    fusion: str = "cross_attention",
    eps_visual: Optional[Tensor] = None,
    eps_depth: Optional[Tensor] = None,
) -> Tensor:
    """feats, depth: (B, N, D). eps_*: (B, N, E) standard-normal gate noise, or None for no noise."""
    batch, num, dim = feats.shape
    tokens = [params.a[e] @ params.b[e] for e in range(params.a.shape[0])]
    values = [t @ params.t2f_weight.T + params.t2f_bias for t in tokens]
    gate_d = params.gate_depth if params.gate_depth is not None else params.gate_visual
    noise_d = params.noise_depth if params.noise_depth is not None else params.noise_visual
    out = []
    for b in range(batch):
        dv = [
            token_delta(feats[b, n], tokens, values, params.gate_visual, params.noise_visual, top_k, gating,
                        None if eps_visual is None else eps_visual[b, n])
            for n in range(num)
        ]
        if depth is None:
            phi = dv
        else:
            dd = [
                token_delta(depth[b, n], tokens, values, gate_d, noise_d, top_k, gating,
                            None if eps_depth is None else eps_depth[b, n])
                for n in range(num)
            ]
            phi = []
            for n in range(num):
                if fusion == "add":
                    phi.append(dv[n] + dd[n])
                    continue
                scores = torch.stack([torch.dot(dv[n], dd[m]) for m in range(num)]) / math.sqrt(dim)
                attn = torch.softmax(scores, dim=0)
                phi.append(dv[n] + sum(attn[m] * dd[m] for m in range(num)))
        rows = []
        for n in range(num):
            update = params.delta_weight @ (phi[n] + feats[b, n]) + params.delta_bias
            rows.append(feats[b, n] + params.scale * update)
        out.append(torch.stack(rows))
    return torch.stack(out)
