"""N-band inputs for RGB-pretrained ViTs: widen the patch embedding so multispectral images go in whole."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .architectures import _is_patch_embedding, find_block_stack


def find_patch_embedding(model: nn.Module) -> str:
    """Path of the ViT's patch-embedding convolution (the one nearest its blocks, e.g. not a decoder's)."""
    stack = find_block_stack(model)
    convolutions = [name for name, module in model.named_modules() if _is_patch_embedding(module)]
    if not convolutions:
        raise ValueError(f"No patch-embedding convolution found in {type(model).__name__}.")

    def shared_depth(name: str) -> int:
        return sum(1 for _ in zip(name.split("."), stack.path.split(".")) if _[0] == _[1])

    return max(convolutions, key=shared_depth)


@torch.no_grad()
def widen_patch_embedding(
    model: nn.Module, num_bands: int, rgb_band_indices: Sequence[int] = (0, 1, 2), path: Optional[str] = None
) -> str:
    """Give an RGB ViT a patch embedding for ``num_bands`` input bands, in place; returns its module path.

    The R, G, B filters are copied to the bands ``rgb_band_indices``; every other band gets the mean of the three;
    all are scaled by 3 / num_bands, so an image whose bands all carry the same signal gives exactly the RGB model's
    activations. Put the returned path in ``SpectralMoEConfig(modules_to_save=[...])`` to train and save it with
    the adapter, and widen a fresh base model the same way before ``PeftModel.from_pretrained``.
    """
    path = path or find_patch_embedding(model)
    old: nn.Conv2d = model.get_submodule(path)
    if old.in_channels != 3:
        raise ValueError(f"widen_patch_embedding expects an RGB (3-band) patch embedding; '{path}' has {old.in_channels}.")
    if num_bands < 3 or len(set(rgb_band_indices)) != 3 or max(rgb_band_indices) >= num_bands:
        raise ValueError(f"Need num_bands >= 3 and three distinct rgb_band_indices < num_bands; got {num_bands}, "
                         f"{list(rgb_band_indices)}.")
    new = nn.Conv2d(
        num_bands, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
        bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype,
    )
    weight = old.weight.mean(dim=1, keepdim=True).expand(-1, num_bands, -1, -1).clone()  # out, N, p, p
    for rgb, band in enumerate(rgb_band_indices):
        weight[:, band] = old.weight[:, rgb]
    new.weight.copy_(weight * (3.0 / num_bands))
    if old.bias is not None:
        new.bias.copy_(old.bias)
    parent_name, _, child_name = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new)
    # HF patch embeddings check the channel count against their own attribute and the config
    for module in (parent, *(m for m in model.modules() if m is not parent)):
        if hasattr(module, "num_channels") and not isinstance(module, nn.Conv2d) and module.num_channels == 3:
            module.num_channels = num_bands
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "num_channels", None) == 3:
            config.num_channels = num_bands
    return path
