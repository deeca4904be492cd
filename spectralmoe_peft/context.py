"""State that one forward shares across the adapted blocks: depth features in, routing statistics and losses out.

The tuner fills it in a forward pre-hook on the base model; each block's adapter reads its depth tokens and writes
its routing statistics and auxiliary losses. It is plain Python (no nn.Module), so nothing in it is ever saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor

from .depth import depth_layer_index, encode_elevation, resample_to_grid, tokens_to_grid


@dataclass
class RoutingStats:
    """Routing of one stream in one block, from the last forward (detached; for logging and routing maps)."""

    expert_load: Tensor  # E: fraction of token slots routed to each expert
    topk_indices: Tensor  # B, N, k: chosen experts per patch token (row-major over the patch grid)
    gate_entropy: Tensor  # scalar: mean entropy of the gate distribution over experts
    grid: Optional[tuple[int, int]]  # (H, W) patch grid, to draw topk_indices as a map


@dataclass
class DepthInput:
    """Depth hidden states of one forward, as the depth model returned them (before resampling)."""

    hidden_states: list[Tensor]  # L_d + 1 entries: (B, P_d + h*w, C) tokens or (B, C, h, w) grids
    num_prefix_tokens: int
    grid: Optional[tuple[int, int]]  # (h, w) of the depth patch grid, when known
    _resampled: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.hidden_states) - 1


class ForwardContext:
    def __init__(self) -> None:
        self.depth: Optional[DepthInput] = None
        self.visual_grid: Optional[tuple[int, int]] = None
        self.token_mask: Optional[Tensor] = None  # B, N bool: valid patch tokens (nodata masked out)
        self.elevation: Optional[Tensor] = None  # B, 1, H, W raster for depth_source="elevation"
        self._elevation_tokens: dict = {}
        self.aux_losses: dict[tuple[str, int, str], Tensor] = {}
        self.routing: dict[str, dict[int, dict[str, RoutingStats]]] = {}
        self.num_forwards = 0
        self.completed = False  # False while a forward runs, and after one that raised

    def start_forward(
        self,
        depth: Optional[DepthInput],
        visual_grid: Optional[tuple[int, int]],
        elevation: Optional[Tensor] = None,
        token_mask: Optional[Tensor] = None,
    ) -> None:
        self.depth = depth
        self.visual_grid = visual_grid
        self.elevation = elevation
        self._elevation_tokens = {}
        self.token_mask = token_mask
        self.aux_losses = {}
        self.routing = {}
        self.num_forwards += 1
        self.completed = False

    def grid_for(self, num_patches: int) -> Optional[tuple[int, int]]:
        grid = self.visual_grid
        if grid is not None and grid[0] * grid[1] == num_patches:
            return grid
        side = int(round(num_patches**0.5))
        return (side, side) if side * side == num_patches else None

    def elevation_tokens(self, adapter_name: str, encoder, grid_hw: tuple[int, int]) -> Tensor:
        """The elevation raster patch-embedded by an adapter's encoder: (B, H*W, D), computed once per forward."""
        if self.elevation is None:
            raise ValueError("This SpectralMoE adapter uses depth_source='elevation' but no elevation= was passed.")
        key = (adapter_name, tuple(grid_hw))
        if key not in self._elevation_tokens:
            self._elevation_tokens[key] = encode_elevation(self.elevation, encoder, grid_hw)
        return self._elevation_tokens[key]

    def depth_tokens(self, block_index: int, num_blocks: int, grid_hw: tuple[int, int]) -> Tensor:
        """Depth tokens for a visual block, resampled in 2-D onto its (H, W) grid: (B, H*W, C). Cached per forward."""
        depth = self.depth
        if depth is None:
            raise ValueError(
                "This SpectralMoE adapter uses depth (use_depth=True) but this forward has none: attach a depth model "
                "with model.set_depth_model(...), pass depth_hidden_states= or depth_pixel_values=, or set "
                "use_depth=False."
            )
        index = depth_layer_index(block_index, num_blocks, depth.num_layers)
        key = (index, tuple(grid_hw))
        if key not in depth._resampled:
            grid = tokens_to_grid(depth.hidden_states[index], depth.num_prefix_tokens, depth.grid, grid_hw)
            depth._resampled[key] = resample_to_grid(grid, tuple(grid_hw))
        return depth._resampled[key]
