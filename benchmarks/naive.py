"""A naive SpectralMoE, written the way the released reference code is written, but with the paper's (correct) math.

It computes exactly what ``spectralmoe_peft`` computes (DESIGN.md section 1) -- same gates, same top-k and gate
weights, same sink-token experts, same cross-attention fusion, same update and balance loss -- so the two can be
timed side by side and checked for equality (tests/test_benchmark_baseline.py). What it keeps from the released code
is the *implementation style*, the thing the benchmark measures:

* one Python loop over experts, each expert a separate set of parameters;
* dispatch per expert with ``nonzero`` + ``index_select`` and combine with ``index_add_`` (a host sync per expert);
* gate distances with a plain ``torch.cdist``;
* fusion through a materialized N x N attention matrix: ``softmax(Dv Dd^T / sqrt(D)) @ Dd``.

Usage::

    naive = NaiveSpectralMoE(vit, num_experts=6, top_k=1, ...)   # installs forward hooks on vit's blocks
    naive.set_depth_model(depth_model)                             # or pass depth_hidden_states= to forward
    out = naive(pixel_values=x)                                    # runs vit with the refinement
    loss = task_loss + naive.aux_loss
    naive.load_from_peft(peft_model)                               # copy a SpectralMoE adapter's weights in

The backbone is frozen by the constructor; ``naive.adapter_parameters()`` are the trainable ones.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The ViT's block list (HF ViT / DeiT / DINOv2 / BEiT: ``encoder.layer``; CLIP/SigLIP: ``encoder.layers``)."""
    for path in ("encoder.layer", "encoder.layers", "vit.encoder.layer", "backbone.encoder.layer"):
        module = model
        try:
            for part in path.split("."):
                module = getattr(module, part)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"Cannot find the blocks of {type(model).__name__}")


def _cv_squared(values: Tensor) -> Tensor:
    if values.numel() <= 1:
        return values.new_zeros(())
    return values.var() / (values.mean() ** 2 + 1e-10)


class NaiveExpert(nn.Module):
    """One expert: its own low-rank tokens T = A B (M x D)."""

    def __init__(self, num_tokens: int, rank: int, dim: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(num_tokens, rank))
        self.B = nn.Parameter(torch.zeros(rank, dim))
        nn.init.uniform_(self.A, -1.0 / math.sqrt(rank), 1.0 / math.sqrt(rank))


class NaiveBlockAdapter(nn.Module):
    """Per-block parameters: E experts and the two gates (visual, depth) with their noise projections."""

    def __init__(self, num_experts: int, num_tokens: int, rank: int, dim: int, use_depth: bool) -> None:
        super().__init__()
        self.experts = nn.ModuleList(NaiveExpert(num_tokens, rank, dim) for _ in range(num_experts))
        self.gate_visual = nn.Parameter(torch.randn(num_experts, dim) / math.sqrt(dim))
        self.noise_visual = nn.Parameter(torch.zeros(dim, num_experts))
        self.use_depth = use_depth
        if use_depth:
            self.gate_depth = nn.Parameter(torch.randn(num_experts, dim) / math.sqrt(dim))
            self.noise_depth = nn.Parameter(torch.zeros(dim, num_experts))


class NaiveSpectralMoE(nn.Module):
    def __init__(
        self,
        vit: nn.Module,
        *,
        num_experts: int = 6,
        top_k: int = 1,
        expert_rank: int = 16,
        num_tokens: int = 100,
        gating: str = "laplace",
        noisy_gating: bool = True,
        use_depth: bool = True,
        depth_hidden_size: Optional[int] = None,
        scale_init: float = 1e-3,
        balance_loss_weight: float = 1e-2,
        num_prefix_tokens: Optional[int] = None,
        depth_num_prefix_tokens: Optional[int] = None,
        rgb_band_indices: Sequence[int] = (0, 1, 2),
        depth_image_mean: Sequence[float] = IMAGENET_MEAN,
        depth_image_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        config = vit.config
        dim = config.hidden_size
        self.vit = vit
        vit.requires_grad_(False)
        self.blocks = find_blocks(vit)
        self.num_experts, self.top_k, self.gating, self.noisy_gating = num_experts, top_k, gating, noisy_gating
        self.use_depth, self.balance_loss_weight = use_depth, balance_loss_weight
        self.dim = dim
        patch = config.patch_size
        self.patch_size = (patch, patch) if isinstance(patch, int) else tuple(patch)
        if num_prefix_tokens is None:
            num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.num_prefix_tokens = num_prefix_tokens
        self.depth_num_prefix_tokens = depth_num_prefix_tokens
        self.rgb_band_indices = list(rgb_band_indices)
        self.register_buffer("depth_mean", torch.tensor(depth_image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("depth_std", torch.tensor(depth_image_std).view(1, 3, 1, 1), persistent=False)
        self.layers = nn.ModuleList(
            NaiveBlockAdapter(num_experts, num_tokens, expert_rank, dim, use_depth) for _ in self.blocks
        )
        self.token_to_feature = nn.Linear(dim, dim)
        self.delta = nn.Linear(dim, dim)
        self.scale = nn.Parameter(torch.full((1,), float(scale_init)))  # (1,) like the package's
        self.depth_projection = (
            nn.Linear(depth_hidden_size, dim) if use_depth and depth_hidden_size not in (None, dim) else None
        )
        self._depth_model: Optional[nn.Module] = None
        self._depth_states: Optional[list[Tensor]] = None
        self._depth_grid: Optional[tuple[int, int]] = None
        self._depth_prefix = 0
        self._grid: Optional[tuple[int, int]] = None
        self._aux: list[Tensor] = []
        self.aux_loss: Optional[Tensor] = None
        self._disabled = False
        for index, block in enumerate(self.blocks):
            block.register_forward_hook(self._make_hook(index), prepend=True)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("vit.")]

    def set_depth_model(self, depth_model: nn.Module) -> None:
        depth_model.requires_grad_(False)
        depth_model.eval()
        object.__setattr__(self, "_depth_model", depth_model)  # not a submodule: never trained or saved

    @contextmanager
    def disable_adapter(self):
        """The plain backbone inside the block (no refinement, no depth model), like ``PeftModel.disable_adapter``;
        bench_inference.py times the backbone alone this way."""
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False

    # --- forward -------------------------------------------------------------------------------------------------

    def forward(self, pixel_values: Tensor, depth_hidden_states: Optional[Sequence[Tensor]] = None, **kwargs):
        if self._disabled:
            return self.vit(pixel_values=pixel_values, **kwargs)
        self._grid = (pixel_values.shape[-2] // self.patch_size[0], pixel_values.shape[-1] // self.patch_size[1])
        self._aux = []
        self._depth_states = None
        if self.use_depth:
            if depth_hidden_states is not None:
                self._depth_states = list(depth_hidden_states)
                self._depth_prefix = self.depth_num_prefix_tokens
                if self._depth_prefix is None:
                    self._depth_prefix = 1 + int(getattr(self._depth_model.config, "num_register_tokens", 0) or 0)
                self._depth_grid = None
            else:
                self._run_depth_model(pixel_values)
        out = self.vit(pixel_values=pixel_values, **kwargs)
        self.aux_loss = torch.stack(self._aux).sum() if self._aux else None
        return out

    @torch.no_grad()
    def _run_depth_model(self, pixel_values: Tensor) -> None:
        depth_model = self._depth_model
        rgb = pixel_values[:, self.rgb_band_indices]
        rgb = (rgb - self.depth_mean.to(rgb.dtype)) / self.depth_std.to(rgb.dtype)
        patch = depth_model.config.patch_size
        height, width = rgb.shape[-2:]
        target = (max(patch, round(height / patch) * patch), max(patch, round(width / patch) * patch))
        if target != (height, width):
            rgb = F.interpolate(rgb, size=target, mode="bilinear", align_corners=False)
        states = depth_model(pixel_values=rgb, output_hidden_states=True).hidden_states
        self._depth_states = list(states)
        self._depth_grid = (target[0] // patch, target[1] // patch)
        self._depth_prefix = states[-1].shape[1] - self._depth_grid[0] * self._depth_grid[1]

    def _depth_tokens(self, index: int) -> Tensor:
        """Depth hidden state of layer round((l+1) L_d / L), prefix dropped, bilinearly resampled to the grid."""
        states = self._depth_states
        num_depth_layers = len(states) - 1
        depth_index = int(math.floor((index + 1) * num_depth_layers / len(self.blocks) + 0.5))
        hidden = states[depth_index]
        if hidden.ndim == 3:
            patches = hidden[:, self._depth_prefix :]
            grid = self._depth_grid
            if grid is None or grid[0] * grid[1] != patches.shape[1]:
                side = int(round(patches.shape[1] ** 0.5))
                grid = (side, side)
            hidden = patches.transpose(1, 2).reshape(patches.shape[0], -1, grid[0], grid[1])
        if tuple(hidden.shape[-2:]) != self._grid:
            hidden = F.interpolate(hidden, size=self._grid, mode="bilinear", align_corners=False)
        tokens = hidden.flatten(2).transpose(1, 2)  # B, N, C
        if self.depth_projection is not None:
            tokens = self.depth_projection(tokens)
        return tokens

    def _make_hook(self, index: int):
        def hook(block, args, output):
            if self._disabled:
                return None  # output unchanged
            hidden = output[0] if isinstance(output, tuple) else output
            prefix, feats = hidden[:, : self.num_prefix_tokens], hidden[:, self.num_prefix_tokens :]
            depth = self._depth_tokens(index) if self.use_depth else None
            feats = self.refine(index, feats, depth)
            hidden = torch.cat([prefix, feats], dim=1)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    # --- the math, naively ---------------------------------------------------------------------------------------

    def refine(self, index: int, feats: Tensor, depth: Optional[Tensor]) -> Tensor:
        layer = self.layers[index]
        delta_visual = self.stream_delta(layer, feats, layer.gate_visual, layer.noise_visual)
        if depth is not None:
            delta_depth = self.stream_delta(layer, depth, layer.gate_depth, layer.noise_depth)
            attention = torch.softmax(delta_visual @ delta_depth.transpose(1, 2) / math.sqrt(self.dim), dim=-1)
            phi = delta_visual + attention @ delta_depth  # the full B x N x N matrix is materialized
        else:
            phi = delta_visual
        return feats + self.scale * self.delta(phi + feats)

    def stream_delta(self, layer: NaiveBlockAdapter, x: Tensor, gate: Tensor, noise: Tensor) -> Tensor:
        batch, num, dim = x.shape
        # gates: plain torch.cdist (not the package's one-matmul expansion, but also linear in N)
        if self.gating == "softmax":
            clean = x @ gate.t()
        elif self.gating == "laplace":
            clean = -torch.cdist(x, gate.unsqueeze(0).expand(batch, -1, -1))
        else:
            clean = -torch.cdist(x, gate.unsqueeze(0).expand(batch, -1, -1)) ** 2
        noisy = self.noisy_gating and self.training
        if noisy:
            noise_std = F.softplus(x @ noise) + 1e-2
            logits = clean + torch.randn_like(clean) * noise_std
        else:
            logits = clean
        probs = torch.softmax(logits, dim=-1)
        top_probs, top_idx = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            top_probs = top_probs / top_probs.sum(-1, keepdim=True)
        self._aux.append(self.balance_loss_weight * self._balance(clean, logits, noise_std if noisy else None,
                                                                  top_probs, top_idx))

        flat = x.reshape(-1, dim)
        flat_idx = top_idx.reshape(-1, self.top_k)
        flat_gate = top_probs.reshape(-1, self.top_k)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(layer.experts):  # Python loop over experts, a host sync each
            hits = (flat_idx == e).nonzero()  # (n_e, 2): token, slot
            if hits.shape[0] == 0:
                continue
            rows = hits[:, 0]
            x_e = flat.index_select(0, rows)
            g_e = flat_gate[rows, hits[:, 1]]
            tokens = expert.A @ expert.B  # M, D
            values = self.token_to_feature(tokens)  # M, D
            attention = torch.softmax(x_e @ tokens.t() / math.sqrt(dim), dim=-1)[:, 1:]  # sink dropped
            out = out.index_add(0, rows, g_e.unsqueeze(-1) * (attention @ values[1:]))
        return out.view(batch, num, dim)

    def _balance(self, clean, logits, noise_std, top_probs, top_idx) -> Tensor:
        num_experts = clean.shape[-1]
        combine = torch.zeros_like(clean).scatter(-1, top_idx, top_probs)
        importance = combine.sum(dim=(0, 1))
        if noise_std is not None and self.top_k < num_experts:
            top_values = logits.topk(self.top_k + 1, dim=-1).values
            threshold_in = top_values[..., self.top_k : self.top_k + 1]
            threshold_out = top_values[..., self.top_k - 1 : self.top_k]
            normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()), validate_args=False)
            load = torch.where(
                logits > threshold_in,
                normal.cdf((clean - threshold_in) / noise_std),
                normal.cdf((clean - threshold_out) / noise_std),
            ).sum(dim=(0, 1))
        else:
            load = torch.zeros_like(clean).scatter(-1, top_idx, 1.0).sum(dim=(0, 1))
        return _cv_squared(importance) + _cv_squared(load)

    # --- weights from a peft SpectralMoE model -------------------------------------------------------------------

    @torch.no_grad()
    def load_from_peft(self, peft_model: nn.Module, adapter_name: str = "default") -> None:
        """Copy a ``get_peft_model(..., SpectralMoEConfig)`` adapter's weights into this naive version."""
        tuner = peft_model.base_model
        layers = [m for m in peft_model.modules() if hasattr(m, "spectralmoe_A") and adapter_name in m.spectralmoe_A]
        layers.sort(key=lambda m: m.block_index)
        if len(layers) != len(self.layers):
            raise ValueError(f"{len(layers)} adapted blocks in the peft model, {len(self.layers)} here")
        for mine, theirs in zip(self.layers, layers):
            a, b = theirs.spectralmoe_A[adapter_name], theirs.spectralmoe_B[adapter_name]
            for e, expert in enumerate(mine.experts):
                expert.A.copy_(a[e])
                expert.B.copy_(b[e])
            mine.gate_visual.copy_(theirs.spectralmoe_gate_visual[adapter_name])
            if adapter_name in theirs.spectralmoe_gate_visual_noise:  # absent when the router is not noisy
                mine.noise_visual.copy_(theirs.spectralmoe_gate_visual_noise[adapter_name])
            if mine.use_depth:
                depth_gates = theirs.spectralmoe_gate_depth
                gate = depth_gates[adapter_name] if adapter_name in depth_gates else mine.gate_visual
                noise_container = theirs.spectralmoe_gate_depth_noise
                noise = noise_container[adapter_name] if adapter_name in noise_container else mine.noise_visual
                mine.gate_depth.copy_(gate)
                mine.noise_depth.copy_(noise)
        self.token_to_feature.load_state_dict(tuner.spectralmoe_token_to_feature[adapter_name].state_dict())
        self.delta.load_state_dict(tuner.spectralmoe_delta[adapter_name].state_dict())
        self.scale.copy_(tuner.spectralmoe_scale[adapter_name])
        if self.depth_projection is not None:
            self.depth_projection.load_state_dict(tuner.spectralmoe_depth_projection[adapter_name].state_dict())
