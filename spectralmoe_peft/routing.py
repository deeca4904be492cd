"""Gates, noisy top-k routing and the balance losses of one stream.

Everything here runs in fp32 (also under autocast): routing decisions and their statistics are where low precision
flips choices and overflows exponentials. No host syncs and no data-dependent control flow, so it compiles.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed
import torch.nn.functional as F
from torch import Tensor

_NOISE_EPSILON = 1e-2  # floor on the learned noise std, as in noisy top-k gating (Shazeer et al., 2017)
_CV_EPSILON = 1e-10


class RouterOutput(NamedTuple):
    combine_weights: Tensor  # B, N, E: g_e(x) at the top-k experts, 0 elsewhere (fp32)
    topk_indices: Tensor  # B, N, k
    probs: Tensor  # B, N, E: softmax over all E (noisy in training) logits
    balance_loss: Tensor  # scalar: cv^2(importance) + cv^2(load)
    switch_loss: Tensor  # scalar: E * sum_e f_e P_e
    z_loss: Tensor  # scalar: mean logsumexp(h)^2
    expert_load: Tensor  # E: fraction of (valid) token-slots routed to each expert, detached


def at_least_fp32(tensor: Tensor) -> Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 stay as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def gate_logits(x: Tensor, weight: Tensor, gating: str) -> Tensor:
    """Clean gate logits h_e(x) in (at least) fp32. x: (B, N, D); weight: (E, D) -> (B, N, E)."""
    # contiguous: otherwise matmul's fold-or-batch choice (which also looks at requires_grad) changes the rounding,
    # and a reloaded adapter (frozen) would differ from the trained one in the last bit
    x = at_least_fp32(x).contiguous()
    weight = weight.to(x.dtype)
    if gating == "softmax":
        return x @ weight.t()
    # squared distances through one matmul (memory linear in N); clamped against cancellation below zero
    sq_dist = (x.pow(2).sum(-1, keepdim=True) - 2.0 * (x @ weight.t()) + weight.pow(2).sum(-1)).clamp_min(0.0)
    if gating == "gaussian":
        return -sq_dist
    if gating == "laplace":
        return -(sq_dist + 1e-12).sqrt()
    raise ValueError(f"Unknown gating {gating!r}; expected 'softmax', 'laplace' or 'gaussian'.")


def cv_squared(values: Tensor) -> Tensor:
    """Squared coefficient of variation; 0 for a single expert (where it is undefined and meaningless)."""
    if values.numel() <= 1:
        return values.new_zeros(())
    values = at_least_fp32(values)
    return values.var() / (values.mean().pow(2) + _CV_EPSILON)


def _prob_in_top_k(clean: Tensor, noisy: Tensor, noise_std: Tensor, top_k: int) -> Tensor:
    """P(expert e is in the top-k | fresh noise on e only): the differentiable 'load' of noisy top-k gating."""
    top_values = noisy.topk(top_k + 1, dim=-1).values  # B, N, k+1
    threshold_if_in = top_values[..., top_k : top_k + 1]  # the (k+1)-th value: e stays in if it beats it
    threshold_if_out = top_values[..., top_k - 1 : top_k]  # the k-th value: e gets in if it beats it
    is_in = noisy > threshold_if_in
    # validate_args=False: a NaN input propagates to the output (and the loss) instead of raising mid-layer
    normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()), validate_args=False)
    prob_if_in = normal.cdf((clean - threshold_if_in) / noise_std)
    prob_if_out = normal.cdf((clean - threshold_if_out) / noise_std)
    return torch.where(is_in, prob_if_in, prob_if_out)


def route(
    x: Tensor,
    gate_weight: Tensor,
    noise_weight: Optional[Tensor],
    *,
    top_k: int,
    gating: str,
    noisy: bool,
    valid: Optional[Tensor] = None,
    selection_bias: Optional[Tensor] = None,
) -> RouterOutput:
    """Route tokens x (B, N, D) to their top-k experts.

    The gate values multiply the expert outputs (unlike the released code), so the router learns from the task loss
    even with top_k = 1. ``noisy`` adds learned noise (training only). ``valid`` (B, N) keeps masked tokens (nodata)
    out of the balance statistics. ``selection_bias`` (E), the aux-free balancing bias, shifts which experts are
    chosen, not their weights (DeepSeek-V3).
    """
    clean = gate_logits(x, gate_weight, gating)  # B, N, E
    num_experts = clean.shape[-1]
    use_noise = noisy and noise_weight is not None
    if use_noise:
        noise_std = F.softplus(at_least_fp32(x) @ noise_weight.to(clean.dtype)) + _NOISE_EPSILON  # B, N, E
        logits = clean + torch.randn_like(clean) * noise_std
    else:
        logits = clean
    probs = logits.softmax(dim=-1)  # B, N, E
    if selection_bias is None:
        topk_probs, topk_indices = probs.topk(top_k, dim=-1)  # B, N, k
    else:
        topk_indices = (logits + selection_bias.to(logits.dtype)).topk(top_k, dim=-1).indices  # B, N, k
        topk_probs = probs.gather(-1, topk_indices)
    if top_k > 1:
        topk_probs = topk_probs / topk_probs.sum(dim=-1, keepdim=True)
    combine_weights = torch.zeros_like(probs).scatter(-1, topk_indices, topk_probs)  # B, N, E
    dispatch = torch.zeros_like(probs).scatter(-1, topk_indices, 1.0)  # B, N, E in {0, 1}

    weight = clean.new_ones(clean.shape[:-1]) if valid is None else valid.to(clean.dtype)  # B, N
    weight = weight.unsqueeze(-1)
    importance = (combine_weights * weight).sum(dim=(0, 1))  # E
    if use_noise and top_k < num_experts:
        load = (_prob_in_top_k(clean, logits, noise_std, top_k) * weight).sum(dim=(0, 1))
    else:
        load = (dispatch * weight).sum(dim=(0, 1))
    balance_loss = cv_squared(importance) + cv_squared(load)

    num_valid = weight.sum().clamp_min(1.0)
    dispatch_fraction = (dispatch * weight).sum(dim=(0, 1)) / (num_valid * top_k)  # E, sums to 1
    mean_probs = (probs * weight).sum(dim=(0, 1)) / num_valid  # E
    switch_loss = num_experts * (dispatch_fraction * mean_probs).sum()
    z_loss = (logits.logsumexp(dim=-1).pow(2) * weight.squeeze(-1)).sum() / num_valid
    return RouterOutput(
        combine_weights=combine_weights,
        topk_indices=topk_indices,
        probs=probs,
        balance_loss=balance_loss,
        switch_loss=switch_loss,
        z_loss=z_loss,
        expert_load=dispatch_fraction.detach(),
    )


class _AuxLossInGraph(torch.autograd.Function):
    """Identity on the tokens; in backward it also feeds a gradient of 1 into the auxiliary loss.

    So the balance loss trains the routers whenever the task loss is backpropagated through the block, with no
    trainer code (Megatron-LM's ``MoEAuxLossAutoScaler``). Nothing is saved for backward: the aux loss is a scalar.
    """

    @staticmethod
    def forward(ctx, tokens: Tensor, aux_loss: Tensor) -> Tensor:
        ctx.aux_dtype, ctx.aux_device = aux_loss.dtype, aux_loss.device
        return tokens.view_as(tokens)

    @staticmethod
    def backward(ctx, grad_tokens: Tensor):
        return grad_tokens, torch.ones((), dtype=ctx.aux_dtype, device=ctx.aux_device)


def update_selection_bias(bias: Tensor, expert_load: Tensor, rate: float) -> None:
    """Aux-free balancing step (in place, no host sync): raise the bias of under-loaded experts, lower that of
    over-loaded ones, by ``rate`` (DeepSeek-V3). Under torch.distributed the load is averaged over ranks first, so the
    bias stays identical on every rank."""
    load = expert_load.detach().to(bias.dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        load = load.clone()
        torch.distributed.all_reduce(load)
        load = load / torch.distributed.get_world_size()
    with torch.no_grad():
        bias.add_(rate * torch.sign(load.mean() - load))


def attach_aux_loss(tokens: Tensor, aux_loss: Tensor) -> Tensor:
    """``tokens``, unchanged, carrying ``aux_loss`` into any backward that passes through them (see above).
    Without a graph (no_grad, eval, frozen routers) there is nothing to attach."""
    if not (torch.is_grad_enabled() and aux_loss.requires_grad):
        return tokens
    return _AuxLossInGraph.apply(tokens, aux_loss)
