"""The depth stream: band selection, the depth model's input, the layer map and 2-D grid resampling.

Depth tokens are resampled on their own 2-D grid (bilinear) to the visual grid, so a patch-14 depth model lines up
with a patch-16 ViT at any aspect ratio (the released code flattened and interpolated in 1-D, misaligning rows).
"""

from __future__ import annotations

import json
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def depth_layer_index(block_index: int, num_blocks: int, num_depth_layers: int) -> int:
    """Depth hidden state paired with visual block ``block_index`` (0-based): round(l * L_d / L), l = index + 1.

    Rounds half up (Python's round() rounds half to even). Index 0 is the depth model's embedding output, as in the
    ``hidden_states`` tuples of HF models.
    """
    return int(math.floor((block_index + 1) * num_depth_layers / num_blocks + 0.5))


def _per_band(value: Union[float, Sequence[float]], like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    tensor = torch.as_tensor(value, dtype=dtype or like.dtype, device=like.device)
    return tensor.reshape(1, -1, 1, 1) if tensor.ndim else tensor


def as_float(values: Tensor) -> Tensor:
    """Integer rasters (uint8 digital numbers, int16 reflectance x 1e4) -> float32; float inputs stay as they are.
    Rescale factors like 1e-4 and a mean of 0.485 would truncate to 0 in an integer dtype."""
    return values if values.is_floating_point() else values.to(torch.float32)


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
    """(rgb * rescale + offset - mean) / std: map sensor values to [0, 1], then to the depth model's statistics.
    Computed in float (at least float32 for integer input)."""
    rgb = as_float(rgb)
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


def _round_up(value: float, digits: int = 3) -> float:
    """``value`` rounded up to ``digits`` decimals: a suggested minimum scale that, as printed, still works."""
    return math.ceil(value * 10**digits) / 10**digits


def resize_for_depth(
    images: Tensor,
    patch_size: tuple[int, int],
    scale: float = 1.0,
    size: Optional[Union[int, Sequence[int]]] = None,
) -> Tensor:
    """The depth model's input size: the images resized by ``scale`` (or to ``size``, (H, W) pixels), snapped to the
    nearest multiple of the patch size, in one resampling. Scale 1.0 and no size: ``resize_to_patch_multiple``."""
    if scale == 1.0 and size is None:
        return resize_to_patch_multiple(images, patch_size)
    height, width = images.shape[-2:]
    if size is not None:
        wanted, name = ((size, size) if isinstance(size, int) else tuple(size)), f"depth_input_size={size!r}"
    else:
        wanted, name = (height * scale, width * scale), f"depth_input_scale={scale}"
    if wanted[0] < patch_size[0] or wanted[1] < patch_size[1]:
        fix = (
            f"use depth_input_scale >= {_round_up(max(patch_size[0] / height, patch_size[1] / width))} for this input "
            "(1.0, the default, keeps full resolution)"
            if size is None
            else f"use a size of at least {patch_size[0]}x{patch_size[1]} px (None: the input's own size)"
        )
        raise ValueError(
            f"SpectralMoEConfig.{name} makes the {height}x{width} px depth input {wanted[0]:g}x{wanted[1]:g} px, "
            f"smaller than one {patch_size[0]}x{patch_size[1]} patch of the depth model: {fix}."
        )
    target = (round(wanted[0] / patch_size[0]) * patch_size[0], round(wanted[1] / patch_size[1]) * patch_size[1])
    if target == (height, width):
        return images
    # antialias: plain bilinear reads only the 2x2 pixels nearest each output one, so a downscale aliases (by 1/2 it
    # skips 3 pixels in 4); antialiasing averages over each output pixel's whole footprint. In float32 for half
    # precision input: the CPU has no half-precision antialiased kernel
    low_precision = images.dtype in (torch.float16, torch.bfloat16)
    resized = F.interpolate(images.float() if low_precision else images, size=target, mode="bilinear",
                            align_corners=False, antialias=True)
    return resized.to(images.dtype)


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


def load_depth_model(name_or_path: str):
    """A depth model from the Hub or a local path, and its processor's (mean, std) when it has one."""
    from transformers import AutoModel, AutoModelForDepthEstimation
    from transformers.utils import cached_file

    # never run code from the repository: an adapter config names this model, and adapters are shared
    try:
        model = AutoModelForDepthEstimation.from_pretrained(name_or_path, trust_remote_code=False)
    except (ValueError, KeyError):  # not a depth-estimation architecture: a plain encoder (e.g. Dinov2Model)
        model = AutoModel.from_pretrained(name_or_path, trust_remote_code=False)
    normalization = None
    try:  # the processor's JSON, read directly: instantiating the processor class would need PIL/torchvision
        path = cached_file(name_or_path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    except OSError:
        path = None
    if path is not None:
        with open(path) as file:
            processor = json.load(file)
        mean, std = processor.get("image_mean"), processor.get("image_std")
        if isinstance(mean, list) and isinstance(std, list) and len(mean) == 3 and len(std) == 3:
            try:
                mean, std = [float(v) for v in mean], [float(v) for v in std]
            except (TypeError, ValueError):
                mean = std = None
            valid = mean is not None and all(math.isfinite(v) for v in mean + std) and all(v > 0 for v in std)
            if not valid:
                raise ValueError(
                    f"The image processor of {name_or_path} has an unusable normalization (image_mean={mean}, "
                    f"image_std={std}; expected finite values, std > 0): fix its preprocessor_config.json."
                )
            normalization = (mean, std)
    return model, normalization


def check_elevation(elevation: Optional[Tensor], pixel_values: Optional[Tensor]) -> Tensor:
    """An elevation raster (B, 1, H, W) or (B, H, W), with a clear error when missing or misshapen."""
    if elevation is None:
        raise ValueError(
            "This SpectralMoE adapter uses depth_source='elevation': pass the nDSM/DEM raster as "
            "model(pixel_values=..., elevation=raster) with shape (batch, 1, height, width)."
        )
    if elevation.ndim == 3:
        elevation = elevation.unsqueeze(1)
    if elevation.ndim != 4 or elevation.shape[1] != 1:
        raise ValueError(f"elevation must be (batch, 1, height, width); got {tuple(elevation.shape)}.")
    if pixel_values is not None and elevation.shape[0] != pixel_values.shape[0]:
        raise ValueError(f"elevation has batch size {elevation.shape[0]}, the images {pixel_values.shape[0]}.")
    return elevation


def elevation_voids(elevation: Tensor, nodata_value: Optional[Union[float, Sequence[float]]]) -> Tensor:
    """(B, 1, H, W) bool: void pixels of an elevation raster: NaN/Inf, or equal to the (first) nodata value."""
    voids = ~torch.isfinite(as_float(elevation))
    if nodata_value is not None:
        marker = nodata_value[0] if isinstance(nodata_value, (list, tuple)) else nodata_value
        if marker == marker:  # not NaN (NaN voids are caught above)
            voids |= elevation == marker
    return voids


def encode_elevation(
    elevation: Tensor, encoder: torch.nn.Conv2d, grid_hw: tuple[int, int], voids: Optional[Tensor] = None
) -> Tensor:
    """Standardize each raster over its valid pixels (heights in any unit; voids set to the mean, i.e. 0), resize to
    the visual grid x patch, patch-embed -> (B, N, D)."""
    elevation = as_float(elevation).to(encoder.weight.dtype)
    valid = torch.isfinite(elevation) if voids is None else ~voids
    weight = valid.to(elevation.dtype).flatten(1)  # B, H*W
    flat = torch.where(valid, elevation, torch.zeros_like(elevation)).flatten(1)
    count = weight.sum(1).clamp_min(1.0)
    mean = (flat * weight).sum(1) / count
    var = ((flat - mean[:, None]).pow(2) * weight).sum(1) / count
    mean, std = mean.view(-1, 1, 1, 1), var.sqrt().view(-1, 1, 1, 1)
    standardized = torch.where(valid, (elevation - mean) / (std + 1e-6), torch.zeros_like(elevation))
    size = (grid_hw[0] * encoder.stride[0], grid_hw[1] * encoder.stride[1])
    if tuple(standardized.shape[-2:]) != size:
        standardized = F.interpolate(standardized, size=size, mode="bilinear", align_corners=False)
    return rearrange(encoder(standardized), "b d h w -> b (h w) d")


def patch_validity(
    pixel_values: Tensor,
    nodata_mask: Optional[Tensor],
    nodata_value: Optional[Union[float, Sequence[float]]],
    patch_size: tuple[int, int],
) -> Tensor:
    """(B, N) bool: patches with at least half their pixels valid. Invalid: nodata_mask True, or any band equal
    to its nodata value."""
    invalid = torch.zeros(pixel_values.shape[0], *pixel_values.shape[-2:], dtype=torch.bool, device=pixel_values.device)
    if nodata_mask is not None:
        if nodata_mask.ndim == 4:
            nodata_mask = nodata_mask.any(1)
        if tuple(nodata_mask.shape) != tuple(invalid.shape):
            raise ValueError(
                f"nodata_mask must be (batch, height, width) = {tuple(invalid.shape)}; got {tuple(nodata_mask.shape)}."
            )
        invalid |= nodata_mask.to(torch.bool)
    if nodata_value is not None:
        # integer rasters: compare in float64 (a NaN marker has no integer value); float ones in their own dtype
        marker = _per_band(nodata_value, pixel_values, None if pixel_values.is_floating_point() else torch.float64)
        if marker.ndim and marker.shape[1] != pixel_values.shape[1]:
            raise ValueError(
                f"nodata_value has {marker.shape[1]} per-band values but the input has {pixel_values.shape[1]} bands: "
                "give one value, or one per band."
            )
        # NaN is a common nodata marker and never equals itself: match it explicitly
        invalid |= ((pixel_values == marker) | (as_float(pixel_values).isnan() & marker.isnan())).any(1)
    valid_fraction = F.avg_pool2d((~invalid).unsqueeze(1).float(), patch_size, stride=patch_size)  # B, 1, H, W
    return rearrange(valid_fraction >= 0.5, "b 1 h w -> b (h w)")


def area_validity(valid: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """(B, 1, H, W) bool pixel validity at any resolution -> (B, N) bool: patches of the visual grid that are at least
    half valid (the nodata rule, for rasters such as elevation that need not match the image's size)."""
    fraction = F.interpolate(valid.float(), size=tuple(grid_hw), mode="area")  # B, 1, H, W
    return rearrange(fraction >= 0.5, "b 1 h w -> b (h w)")


def depth_hidden_size(depth_model: nn.Module) -> Optional[int]:
    """Width of a depth model's features: its hidden_size, or its backbone's (Depth Anything, DPT); None if unknown."""
    config = getattr(depth_model, "config", None)
    for candidate in (config, getattr(config, "backbone_config", None)):
        size = getattr(candidate, "hidden_size", None) if candidate is not None else None
        if isinstance(size, int):
            return size
    return None
