"""The depth stream as one component: a forward's inputs -> each adapter's depth features -> per-block depth tokens.

pixels --(R, G, B bands, rescale, normalization, depth_input_scale / _size: per adapter)--> depth model input --(resized
to its patch multiple, its ViT encoder only)--> hidden states --(layer map, prefix dropped, 2-D resampling onto the
visual grid)--> tokens.

``DepthStream`` holds the attached depth model (frozen, never saved) and computes, for one forward, the hidden
states every depth-using adapter needs: adapters whose band choice, normalization and input scale/size agree share one
run of the depth model. ``DepthFeatures`` belongs to that forward only; it resamples lazily, once per block and grid.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import Tensor, nn

from .architectures import patch_size_of, prefix_tokens_of
from .depth import (
    depth_layer_index,
    normalize_for_depth,
    resample_to_grid,
    resize_for_depth,
    select_rgb,
    tokens_to_grid,
)

if TYPE_CHECKING:
    from .config import SpectralMoEConfig


def depth_encoder(depth_model: nn.Module) -> nn.Module:
    """The part of the depth model whose hidden_states the adapters read. A depth-estimation model computes them in
    its ViT encoder (Depth Anything: ``.backbone``; DPT: ``.dpt`` or ``.backbone``): run only that, not the neck and
    head whose output would be discarded."""
    for name in ("backbone", "dpt"):
        encoder = getattr(depth_model, name, None)
        if isinstance(encoder, nn.Module) and patch_size_of(getattr(encoder, "config", None)) is not None:
            return encoder
    return depth_model


def encoder_options(encoder: nn.Module) -> dict:
    """Keyword arguments for the depth encoder's forward: hidden states, and position embeddings interpolated to the
    input size where the model asks for it (a plain ViT; DINOv2 and Depth Anything always interpolate). Read from the
    signature once per encoder (torch.compile cannot trace ``inspect``)."""
    options = getattr(encoder, "_spectralmoe_encoder_options", None)
    if options is None:
        options = {"output_hidden_states": True}
        if "interpolate_pos_encoding" in inspect.signature(encoder.forward).parameters:
            options["interpolate_pos_encoding"] = True
        object.__setattr__(encoder, "_spectralmoe_encoder_options", options)
    return options


def install_output_hooks(encoder: nn.Module) -> None:
    """Install transformers' hidden-state capturing hooks on the depth encoder now. transformers 5 installs them
    lazily, on the first call asking for hidden states, under a ``threading.Lock`` that torch.compile cannot enter:
    a model compiled before its first eager call would break its graph there and run ``PeftModel.forward`` eagerly."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # transformers without lazily installed hooks
        return
    from transformers import PreTrainedModel

    if isinstance(encoder, PreTrainedModel):
        maybe_install_capturing_hooks(encoder)


def num_depth_layers(depth_model: nn.Module) -> Optional[int]:
    """Number of transformer layers of a depth model's encoder (its hidden_states have one more entry)."""
    config = getattr(depth_encoder(depth_model), "config", None)
    for candidate in (config, getattr(config, "backbone_config", None)):
        layers = getattr(candidate, "num_hidden_layers", None) if candidate is not None else None
        if isinstance(layers, int):
            return layers
    return None


@dataclass(eq=False)
class DepthFeatures:
    """Depth hidden states of one forward, and the per-block tokens resampled from them (cached per forward)."""

    hidden_states: Optional[list[Tensor]]  # L_d + 1 entries: (B, P_d + h*w, C) tokens or (B, C, h, w) grids
    num_prefix_tokens: int
    grid: Optional[tuple[int, int]]  # (h, w) of the depth patch grid, when known
    num_layers: int = 0
    _tokens: dict = field(default_factory=dict)  # (layer, (H, W)) -> (B, H*W, C)

    def __post_init__(self) -> None:
        self.num_layers = len(self.hidden_states) - 1

    def tokens(self, block_index: int, num_blocks: int, grid_hw: tuple[int, int]) -> Tensor:
        """Depth tokens for visual block ``block_index``, resampled in 2-D onto its (H, W) grid: (B, H*W, C)."""
        layer = depth_layer_index(block_index, num_blocks, self.num_layers)
        key = (layer, tuple(grid_hw))
        if key not in self._tokens:
            if self.hidden_states is None:
                raise RuntimeError(
                    f"Depth tokens for block {block_index} were not computed during this forward, and its depth "
                    "hidden states are already released: a checkpoint recomputation must rerun the same blocks."
                )
            grid = tokens_to_grid(self.hidden_states[layer], self.num_prefix_tokens, self.grid, grid_hw)
            self._tokens[key] = resample_to_grid(grid, tuple(grid_hw))
        return self._tokens[key]

    def release_raw(self) -> None:
        """Drop the raw hidden states (all depth layers) when the forward ends; the blocks' tokens stay."""
        self.hidden_states = None


def _preprocessing_key(config: "SpectralMoEConfig") -> tuple:
    def frozen(value):
        return tuple(value) if isinstance(value, (list, tuple)) else value

    return (
        tuple(config.resolved_rgb_band_indices()),
        frozen(config.depth_input_rescale),
        frozen(config.depth_input_offset),
        tuple(config.depth_image_mean),
        tuple(config.depth_image_std),
        config.depth_num_prefix_tokens,
        config.depth_input_scale,
        frozen(config.depth_input_size),
    )


class DepthStream:
    """The attached depth model and the computation of each forward's depth features."""

    def __init__(self) -> None:
        self.model: Optional[nn.Module] = None
        self.detached = False  # set_depth_model(None): do not reload the config's depth_model_name_or_path
        self.load_lock = threading.Lock()  # two threads' first forwards load a named depth model once

    def __getstate__(self) -> dict:  # deepcopy (an EMA teacher) and pickle: a lock is not copied, it is made anew
        return {"model": self.model, "detached": self.detached}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.model, self.detached = state["model"], state["detached"]

    def features_for(
        self,
        configs: dict[str, "SpectralMoEConfig"],
        pixel_values: Optional[Tensor],
        depth_pixel_values: Optional[Tensor],
        depth_hidden_states: Optional[Sequence[Tensor]],
    ) -> dict[str, DepthFeatures]:
        """Depth features of one forward for each adapter in ``configs`` (adapters that read the same bands the same
        way share one run of the depth model)."""
        by_key: dict[tuple, DepthFeatures] = {}
        features = {}
        for name, config in configs.items():
            key = _preprocessing_key(config)
            if key not in by_key:
                if depth_hidden_states is not None:
                    by_key[key] = self.explicit(config, depth_hidden_states)
                else:
                    by_key[key] = self.run(config, pixel_values, depth_pixel_values)
            features[name] = by_key[key]
        return features

    def model_input(
        self, config: "SpectralMoEConfig", pixel_values: Optional[Tensor], depth_pixel_values: Optional[Tensor]
    ) -> Tensor:
        """The depth model's input for one adapter: R, G, B picked, rescaled, normalized, resized (by
        depth_input_scale or to depth_input_size) and snapped to its patch size."""
        if depth_pixel_values is not None:
            if not isinstance(depth_pixel_values, Tensor) or depth_pixel_values.ndim != 4 or (
                depth_pixel_values.shape[1] != 3
            ):
                shape = tuple(depth_pixel_values.shape) if isinstance(depth_pixel_values, Tensor) else None
                raise ValueError(
                    f"depth_pixel_values must be RGB images (batch, 3, height, width) in [0, 1]; got shape {shape}."
                )
            if not depth_pixel_values.is_floating_point():
                raise TypeError(
                    f"depth_pixel_values must be float RGB in [0, 1]; got {depth_pixel_values.dtype}: divide 8-bit "
                    "images by 255 (integer rasters belong in pixel_values, with depth_input_rescale)."
                )
            rgb = normalize_for_depth(depth_pixel_values, 1.0, 0.0, config.depth_image_mean, config.depth_image_std)
        elif pixel_values is not None:
            wavelengths = config.band_wavelengths_nm
            if wavelengths is not None and pixel_values.ndim == 4 and len(wavelengths) != pixel_values.shape[1]:
                raise ValueError(
                    f"SpectralMoEConfig.band_wavelengths_nm lists {len(wavelengths)} bands but pixel_values has "
                    f"{pixel_values.shape[1]}: give one wavelength per input band (R, G, B are picked from them)."
                )
            rgb = select_rgb(pixel_values, config.resolved_rgb_band_indices())
            rgb = normalize_for_depth(
                rgb, config.depth_input_rescale, config.depth_input_offset, config.depth_image_mean,
                config.depth_image_std,
            )
        else:
            raise ValueError("SpectralMoE needs pixel_values (or depth_pixel_values) to run the depth model on.")
        patch = patch_size_of(depth_encoder(self.model).config)  # set_depth_model checked it has one
        return resize_for_depth(rgb, patch, config.depth_input_scale, config.depth_input_size)

    def run(
        self, config: "SpectralMoEConfig", pixel_values: Optional[Tensor], depth_pixel_values: Optional[Tensor]
    ) -> DepthFeatures:
        """Run the frozen depth model's encoder on the input's R, G, B bands (no gradient)."""
        if self.model is None:
            problem = (
                "depth_pixel_values= were passed, but there is no depth model to run them through"
                if depth_pixel_values is not None
                else "no depth source was given"
            )
            raise ValueError(
                f"This SpectralMoE adapter uses depth (use_depth=True) but {problem}: attach a depth model with "
                "model.set_depth_model(...), or pass precomputed depth_hidden_states= (e.g. from "
                "model.base_model.compute_depth_hidden_states), or create the adapter with use_depth=False."
            )
        rgb = self.model_input(config, pixel_values, depth_pixel_values)
        if rgb.shape[0] == 0:
            raise ValueError("pixel_values has a batch of 0 images: there is nothing to run the depth model on.")
        encoder = depth_encoder(self.model)
        patch = patch_size_of(encoder.config)
        reference = next(self.model.parameters(), rgb)
        options = encoder_options(encoder)
        rgb_in = rgb.to(reference.device, reference.dtype)
        if torch.compiler.is_compiling():  # dynamo cannot trace the try block below; the eager run gave the message
            with torch.no_grad():
                outputs = encoder(pixel_values=rgb_in, **options)
        else:
            try:
                with torch.no_grad():
                    outputs = encoder(pixel_values=rgb_in, **options)
            except (ValueError, RuntimeError) as error:
                if "size" not in str(error).lower():
                    raise
                raise ValueError(
                    f"The depth model {type(self.model).__name__} refused its input of {rgb.shape[-2]}x{rgb.shape[-1]} "
                    f"px (the R, G, B bands resized to a multiple of its patch size {tuple(patch)}): {error} Use a "
                    "depth model that takes any input size (Depth Anything, DPT, DINOv2), or pass depth_hidden_states="
                ) from error
        hidden_states = getattr(outputs, "hidden_states", None)
        if hidden_states is None:
            raise ValueError(f"The depth model {type(self.model).__name__} returned no hidden_states.")
        grid = (rgb.shape[-2] // patch[0], rgb.shape[-1] // patch[1])
        num_prefix = hidden_states[-1].shape[1] - grid[0] * grid[1] if hidden_states[-1].ndim == 3 else 0
        if num_prefix < 0:
            raise ValueError(
                f"The depth model returned {hidden_states[-1].shape[1]} tokens for a {grid[0]}x{grid[1]} patch grid."
            )
        return DepthFeatures(hidden_states=list(hidden_states), num_prefix_tokens=num_prefix, grid=grid)

    def explicit(self, config: "SpectralMoEConfig", depth_hidden_states: Sequence[Tensor]) -> DepthFeatures:
        """Depth hidden states passed to forward (e.g. cached per tile), checked against the attached depth model."""
        if isinstance(depth_hidden_states, Tensor) or not isinstance(depth_hidden_states, (list, tuple)):
            raise ValueError(
                "depth_hidden_states must be a tuple/list of per-layer tensors, as a HF model's hidden_states "
                "(embedding output first), each (B, tokens, C) or (B, C, h, w)."
            )
        if len(depth_hidden_states) < 2:
            raise ValueError(f"depth_hidden_states needs at least 2 entries; got {len(depth_hidden_states)}.")
        if not all(isinstance(h, Tensor) and h.is_floating_point() for h in depth_hidden_states):
            raise TypeError("depth_hidden_states must be floating-point tensors (the depth model's features).")
        if self.model is not None:
            layers = num_depth_layers(self.model)
            if layers is not None and len(depth_hidden_states) != layers + 1:
                raise ValueError(
                    f"depth_hidden_states has {len(depth_hidden_states)} entries but the attached depth model has "
                    f"{layers} layers (expected {layers + 1}: the embedding output, then one per layer). Pass all of "
                    "its hidden_states, e.g. from model.compute_depth_hidden_states(pixel_values)."
                )
        num_prefix = config.depth_num_prefix_tokens
        if num_prefix is None and self.model is not None:
            num_prefix = prefix_tokens_of(getattr(self.model, "config", None))
        if num_prefix is None and any(h.ndim == 3 for h in depth_hidden_states):
            raise ValueError(
                "depth_hidden_states given as (B, tokens, C) need SpectralMoEConfig.depth_num_prefix_tokens (how many "
                "CLS/register tokens precede the patches); or pass (B, C, h, w) grids."
            )
        return DepthFeatures(hidden_states=list(depth_hidden_states), num_prefix_tokens=num_prefix or 0, grid=None)

    def hidden_state_grids(self, config: "SpectralMoEConfig", pixel_values: Tensor) -> tuple[Tensor, ...]:
        """Exactly the depth features the adapter computes on the fly, as (B, C, h, w) grids (prefix dropped): what
        to cache per tile and pass back as ``depth_hidden_states=``."""
        features = self.run(config, pixel_values, None)
        return tuple(
            tokens_to_grid(hidden, features.num_prefix_tokens, features.grid, features.grid)
            for hidden in features.hidden_states
        )
