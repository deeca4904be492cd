"""The depth stream: band selection, the depth model's input, the layer map and 2-D grid resampling.

Depth tokens are resampled on their own 2-D grid (bilinear) to the visual grid, so a patch-14 depth model lines up
with a patch-16 ViT at any aspect ratio (the released code flattened and interpolated in 1-D, misaligning rows).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def depth_layer_index(block_index: int, num_blocks: int, num_depth_layers: int) -> int:
    """Depth hidden state paired with visual block ``block_index`` (0-based): round(l * L_d / L), l = index + 1.

    Rounds half up (Python's round() rounds half to even). Index 0 is the depth model's embedding output, as in the
    ``hidden_states`` tuples of HF models.
    """
    return int(math.floor((block_index + 1) * num_depth_layers / num_blocks + 0.5))


def _per_band(value: Union[float, Sequence[float]], like: Tensor) -> Tensor:
    tensor = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return tensor.reshape(1, -1, 1, 1) if tensor.ndim else tensor


def select_rgb(pixel_values: Tensor, rgb_band_indices: Sequence[int]) -> Tensor:
    """The three bands used as R, G, B: (B, C, H, W) -> (B, 3, H, W), with a clear error for bad input."""
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be (batch, bands, height, width); got shape {tuple(pixel_values.shape)}.")
    num_bands = pixel_values.shape[1]
    if num_bands < 3:
        raise ValueError(f"The depth model needs 3 bands (R, G, B) but the input has {num_bands}.")
    if max(rgb_band_indices) >= num_bands:
        raise ValueError(
            f"rgb_band_indices={list(rgb_band_indices)} is out of range for an input with {num_bands} bands."
        )
    return pixel_values[:, list(rgb_band_indices)]


def normalize_for_depth(
    rgb: Tensor,
    rescale: Union[float, Sequence[float]],
    offset: Union[float, Sequence[float]],
    mean: Sequence[float],
    std: Sequence[float],
) -> Tensor:
    """(rgb * rescale + offset - mean) / std: map sensor values to [0, 1], then to the depth model's statistics."""
    rgb = rgb * _per_band(rescale, rgb) + _per_band(offset, rgb)
    return (rgb - _per_band(mean, rgb)) / _per_band(std, rgb)


def resize_to_patch_multiple(images: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """Resize (bilinear) to the nearest size both of whose sides the depth model's patch size divides."""
    height, width = images.shape[-2:]
    target = (
        max(patch_size[0], round(height / patch_size[0]) * patch_size[0]),
        max(patch_size[1], round(width / patch_size[1]) * patch_size[1]),
    )
    if target == (height, width):
        return images
    return F.interpolate(images, size=target, mode="bilinear", align_corners=False)


def infer_grid(num_patches: int, aspect_hw: tuple[int, int]) -> tuple[int, int]:
    """The h x w grid with h*w = num_patches whose aspect ratio matches ``aspect_hw`` (h, w)."""
    target = math.log(aspect_hw[0] / aspect_hw[1])
    best, best_error = None, float("inf")
    for h in range(1, num_patches + 1):
        if num_patches % h:
            continue
        error = abs(math.log(h / (num_patches // h)) - target)
        if error < best_error:
            best, best_error = (h, num_patches // h), error
    if best is None or best_error > math.log(1.34):
        raise ValueError(
            f"Cannot arrange {num_patches} depth tokens on a grid with the visual aspect ratio {aspect_hw}: pass "
            "depth hidden states as (batch, channels, h, w) grids or set depth_num_prefix_tokens."
        )
    return best


def tokens_to_grid(tokens: Tensor, num_prefix_tokens: int, grid_hw: Optional[tuple[int, int]], aspect_hw) -> Tensor:
    """Depth hidden state (B, P + h*w, C) or grid (B, C, h, w) -> grid (B, C, h, w), prefix tokens dropped."""
    if tokens.ndim == 4:
        return tokens
    if tokens.ndim != 3:
        raise ValueError(f"Depth hidden states must be (B, tokens, C) or (B, C, h, w); got {tuple(tokens.shape)}.")
    patches = tokens[:, num_prefix_tokens:]
    if grid_hw is None or grid_hw[0] * grid_hw[1] != patches.shape[1]:
        grid_hw = infer_grid(patches.shape[1], aspect_hw)
    return rearrange(patches, "b (h w) c -> b c h w", h=grid_hw[0], w=grid_hw[1])


def resample_to_grid(grid: Tensor, target_hw: tuple[int, int]) -> Tensor:
    """Bilinear 2-D resampling of (B, C, h, w) onto the visual grid -> tokens (B, H*W, C) in row-major order."""
    if tuple(grid.shape[-2:]) != tuple(target_hw):
        grid = F.interpolate(grid, size=target_hw, mode="bilinear", align_corners=False)
    return rearrange(grid, "b c h w -> b (h w) c")
