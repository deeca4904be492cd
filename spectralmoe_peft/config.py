"""SpectralMoEConfig: every knob of the method, validated up front so mistakes surface at construction."""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from .registration import SPECTRALMOE

GATING_TYPES = ("softmax", "laplace", "gaussian")
FUSION_TYPES = ("cross_attention", "add")
DEPTH_SOURCES = ("model", "elevation")
RGB_WAVELENGTHS_NM = (665.0, 560.0, 490.0)  # R, G, B centres (Sentinel-2 B04, B03, B02)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class SpectralMoEConfig(PeftConfig):
    """Configuration of a SpectralMoE adapter (arXiv 2603.13352).

    The adapter refines the patch tokens after each targeted ViT block with dual-gated top-k mixtures of low-rank
    token experts, guided by depth features fused in by cross-attention. See ``docs/method.md`` for the math.

    Defaults from the paper's released code: ``num_experts=6``, ``top_k=1``, ``expert_rank=16``, ``num_tokens=100``,
    ``gating="laplace"``, ``noisy_gating=True``, ``share_gates=False``, ``fusion="cross_attention"``,
    ``scale_init=1e-3``, and ``init_weights="paper"`` reproduces its initialization. Not from it (each measured or
    argued in ``docs/method.md``): ``init_weights=True`` (PEFT's exact identity at init: W_delta = 0, N(0, 1/D) gates
    instead of zero gates), the balance loss's weight and reduction (``balance_loss_weight``,
    ``balance_loss_reduction``: the released code adds 1e3 x the mean over layers to a loss its router alone sees),
    ``aux_loss_in_graph`` and ``balancing`` (beyond the paper).
    """

    # --- experts and routing -------------------------------------------------------------------------------------
    num_experts: int = field(default=6, metadata={"help": "Experts per adapted block (E). 1 gives Rein-like tokens."})
    top_k: int = field(default=1, metadata={"help": "Experts each token is routed to (k <= num_experts)."})
    expert_rank: int = field(default=16, metadata={"help": "Rank r of each expert's token matrix T_e = A_e B_e."})
    num_tokens: int = field(
        default=100, metadata={"help": "Tokens per expert (M >= 2); token 1 is a sink that lets a token ignore all."}
    )
    gating: Literal["softmax", "laplace", "gaussian"] = field(
        default="laplace",
        metadata={"help": "Gate logits: x.w_e ('softmax'), -||x-w_e|| ('laplace', the paper's), -||x-w_e||^2."},
    )
    noisy_gating: bool = field(default=True, metadata={"help": "Add learned Gaussian noise to gate logits in training."})
    share_gates: bool = field(
        default=False, metadata={"help": "Ablation: one gate for both streams instead of one per stream."}
    )
    # --- depth stream and fusion ---------------------------------------------------------------------------------
    use_depth: bool = field(default=True, metadata={"help": "Guide the visual stream with depth features."})
    fusion: Literal["cross_attention", "add"] = field(
        default="cross_attention",
        metadata={"help": "How depth adjustments enter: cross-attention (the paper's) or plain addition (ablation)."},
    )
    depth_source: Literal["model", "elevation"] = field(
        default="model",
        metadata={
            "help": "'model': a frozen depth model run on the R,G,B bands (or depth_pixel_values / depth_hidden_states "
            "passed to forward). 'elevation': an nDSM/DEM raster passed as elevation=, encoded by a trainable patch "
            "encoder saved with the adapter."
        },
    )
    depth_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Hub id or local path of the depth model, loaded with from_pretrained when none is attached."},
    )
    rgb_band_indices: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": "Input channels taken as R, G, B for the depth model, e.g. [2, 1, 0] for B,G,R,NIR,... "
            "None: the bands nearest 665, 560, 490 nm if band_wavelengths_nm is set, else [0, 1, 2]."
        },
    )
    band_wavelengths_nm: Optional[list[float]] = field(
        default=None, metadata={"help": "Centre wavelength of each input band (nm); picks R, G, B when not given."}
    )
    num_input_bands: Optional[int] = field(
        default=None,
        metadata={
            "help": "Input bands of the model the adapter was made on; recorded when the adapter is created. A reload "
            "onto the RGB base widens its patch embedding to this many bands (see widened_patch_embedding)."
        },
    )
    band_names: Optional[list[str]] = field(
        default=None, metadata={"help": "Name of each input band (e.g. 'B02'), when known; recorded for the card."}
    )
    widened_patch_embedding: Optional[str] = field(
        default=None,
        metadata={
            "help": "Module path of the patch embedding that widen_patch_embedding widened from RGB (recorded when the "
            "adapter is created); PeftModel.from_pretrained on the RGB base widens it again."
        },
    )
    nodata_value: Optional[Union[float, list[float]]] = field(
        default=None,
        metadata={
            "help": "Value marking invalid pixels (one, or one per band). Patches with over half their pixels invalid "
            "(or flagged by nodata_mask= in forward) stay out of routing statistics and the aux loss."
        },
    )
    depth_input_rescale: Union[float, list[float]] = field(
        default=1.0,
        metadata={"help": "Per-band factor mapping the selected R,G,B values to [0, 1] (e.g. 1e-4 for reflectance)."},
    )
    depth_input_offset: Union[float, list[float]] = field(
        default=0.0, metadata={"help": "Per-band offset added after rescaling, before the depth normalization."}
    )
    depth_input_scale: float = field(
        default=1.0,
        metadata={
            "help": "Factor (0 < scale <= 1) by which the R,G,B bands are resized (bilinear, antialiased) before the "
            "depth model, then snapped to its patch size; its tokens are resampled onto the visual grid anyway. 1.0 "
            "(the paper's setting): full resolution. 0.5: a quarter of the depth tokens."
        },
    )
    depth_input_size: Optional[Union[int, list[int]]] = field(
        default=None,
        metadata={
            "help": "Instead of depth_input_scale: the depth model's input size in pixels, one int (square) or "
            "(height, width), snapped to its patch size. None: the input's own size times depth_input_scale."
        },
    )
    depth_image_mean: list[float] = field(
        default_factory=lambda: list(IMAGENET_MEAN), metadata={"help": "Depth model's normalization mean (R,G,B)."}
    )
    depth_image_std: list[float] = field(
        default_factory=lambda: list(IMAGENET_STD), metadata={"help": "Depth model's normalization std (R,G,B)."}
    )
    depth_hidden_size: Optional[int] = field(
        default=None,
        metadata={"help": "Width of the depth features; a trainable projection maps it to the ViT width if different."},
    )
    depth_num_prefix_tokens: Optional[int] = field(
        default=None,
        metadata={"help": "Prefix tokens (CLS, registers) of the depth model; read from the depth model if attached."},
    )
    # --- update and initialization -------------------------------------------------------------------------------
    scale_init: float = field(default=1e-3, metadata={"help": "Initial value of the learnable update scale s."})
    init_weights: Union[bool, Literal["paper"]] = field(
        default=True,
        metadata={
            "help": "True: exact identity at init (W_delta = 0). 'paper': the paper's near-identity init. "
            "False: random non-identity weights (for tests)."
        },
    )
    # --- auxiliary losses ----------------------------------------------------------------------------------------
    balance_loss_weight: float = field(
        default=1e-2, metadata={"help": "Weight of the noisy top-k load-balancing loss cv^2(importance)+cv^2(load)."}
    )
    switch_loss_weight: float = field(default=0.0, metadata={"help": "Weight of a Switch-style balance loss."})
    router_z_loss_weight: float = field(default=0.0, metadata={"help": "Weight of the router z-loss."})
    balance_loss_reduction: Literal["sum", "mean"] = field(
        default="sum",
        metadata={
            "help": "How the blocks' balance losses combine: 'sum' over adapted blocks (and streams), or 'mean' over "
            "adapted blocks (the released code's reduction: the weight then does not grow with depth). See "
            "docs/method.md for the measurement behind the default."
        },
    )
    balancing: Literal["aux_loss", "aux_free", "both"] = field(
        default="aux_loss",
        metadata={
            "help": "'aux_loss': the balance loss (the paper's). 'aux_free': no balance loss; a per-expert routing bias, "
            "added to the logits for the top-k choice only, moves by bias_update_rate against each expert's load "
            "error after every training forward (DeepSeek-V3). 'both': the two together."
        },
    )
    bias_update_rate: float = field(
        default=1e-3, metadata={"help": "Step of the aux-free routing bias per training forward (sign of the error)."}
    )
    aux_loss_in_graph: bool = field(
        default=True,
        metadata={
            "help": "Attach the weighted auxiliary losses to the autograd graph of each adapted block's output, so any "
            "backward of the task loss (plain loop, HF Trainer, Lightning, ...) also trains the routers to balance. "
            "False: add model.get_aux_loss() to the loss yourself."
        },
    )
    keep_routing_stats: bool = field(
        default=True,
        metadata={"help": "Keep the last forward's routing statistics (small, detached) for get_routing_stats()."},
    )
    recompute_expert_attention: bool = field(
        default=False,
        metadata={
            "help": "Recompute each stream's expert attention in backward instead of keeping it for backward (exact): "
            "less memory for a few percent of step time (see docs/performance.md)."
        },
    )
    # --- where to apply ------------------------------------------------------------------------------------------
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "ViT blocks to adapt (names or regex). None: all blocks of the ViT, found by structure."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Blocks not to adapt (names or regex)."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Indices of the blocks to adapt (0-based); None: all."}
    )
    num_prefix_tokens: Optional[int] = field(
        default=None,
        metadata={"help": "Prefix tokens (CLS, registers) before the patch tokens; None: read from the model config."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules trained and saved in full, e.g. ['decode_head']."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SPECTRALMOE
        self._validate()

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write ``adapter_config.json`` without local paths (a folder to share must not name this machine's files):
        a local base or depth model is written as None (the model card says what to load instead); a Hub cache
        folder becomes its repo id. The config in memory keeps its values."""
        from .hub import shareable_name

        import copy

        shared = copy.copy(self)
        shared.base_model_name_or_path = shareable_name(self.base_model_name_or_path)
        shared.depth_model_name_or_path = shareable_name(self.depth_model_name_or_path)
        super(SpectralMoEConfig, shared).save_pretrained(save_directory, **kwargs)

    def resolved_rgb_band_indices(self) -> list[int]:
        """R, G, B input channels: as given, else nearest to 665/560/490 nm, else [0, 1, 2]."""
        if self.rgb_band_indices is not None:
            return list(self.rgb_band_indices)
        if self.band_wavelengths_nm is not None:
            return _nearest_bands(self.band_wavelengths_nm)
        return [0, 1, 2]

    def _validate(self) -> None:
        """Check every field's type and range, so a mistake surfaces here and not as a wrong result later.

        Values are normalized to what JSON gives back (lists, plain int/float), so a saved config reloads equal:
        peft builds configs from ``adapter_config.json`` through this same constructor.
        """

        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ValueError(f"SpectralMoEConfig.{name}: {message} (got {getattr(self, name)!r}).")

        # --- experts and routing
        for name, low, why in (
            ("num_experts", 1, ""),
            ("expert_rank", 1, ""),
            ("num_tokens", 2, " (token 1 is the sink, at least one more carries content)"),
        ):
            value = getattr(self, name)
            check(_is_int(value) and value >= low, name, f"must be an integer >= {low}{why}")
            setattr(self, name, int(value))
        check(
            _is_int(self.top_k) and 1 <= self.top_k <= self.num_experts,
            "top_k",
            f"must be an integer in [1, num_experts={self.num_experts}]",
        )
        self.top_k = int(self.top_k)
        for name in ("noisy_gating", "share_gates", "use_depth", "aux_loss_in_graph", "keep_routing_stats",
                     "recompute_expert_attention"):
            # "no" or "off" would be truthy: refuse, not guess
            check(isinstance(getattr(self, name), bool), name, "must be True or False")
        for name, choices in (("gating", GATING_TYPES), ("fusion", FUSION_TYPES), ("depth_source", DEPTH_SOURCES),
                              ("balance_loss_reduction", ("sum", "mean")),
                              ("balancing", ("aux_loss", "aux_free", "both"))):
            value = getattr(self, name)
            check(isinstance(value, str) and value in choices, name, f"must be one of {choices}")

        # --- update, initialization and losses
        init = self.init_weights
        check(isinstance(init, bool) or (isinstance(init, str) and init == "paper"), "init_weights",
              "must be True, False or 'paper'")
        check(_is_number(self.scale_init) and math.isfinite(self.scale_init), "scale_init", "must be a finite number")
        check(
            self.scale_init != 0 or init is not True,
            "scale_init",
            "must be non-zero with init_weights=True: W_delta starts at zero, so s = 0 would give every adapter "
            "weight a zero gradient forever and the adapter would never train. Use a small value such as the "
            "default 1e-3, or init_weights='paper' (W_delta not zero, so s trains from 0)",
        )
        self.scale_init = float(self.scale_init)
        for name in ("balance_loss_weight", "switch_loss_weight", "router_z_loss_weight", "bias_update_rate"):
            value = getattr(self, name)
            check(_is_number(value) and math.isfinite(value) and value >= 0, name, "must be a finite number >= 0")
            setattr(self, name, float(value))

        # --- depth stream
        path = self.depth_model_name_or_path
        if isinstance(path, os.PathLike):
            path = self.depth_model_name_or_path = os.fspath(path)
        check(path is None or (isinstance(path, str) and path.strip() != ""), "depth_model_name_or_path",
              "must be None or a Hub id / local path")
        self._validate_bands()
        nodata = self.nodata_value
        check(
            nodata is None or _is_number(nodata) or (_is_numbers(nodata) and len(nodata) >= 1),
            "nodata_value",
            "must be None, a number (NaN allowed), or one number per band",
        )
        if nodata is not None:
            self.nodata_value = float(nodata) if _is_number(nodata) else [float(v) for v in nodata]
        for name in ("depth_input_rescale", "depth_input_offset"):
            value = getattr(self, name)
            check(
                (_is_number(value) and math.isfinite(value))
                or (_is_numbers(value) and len(value) == 3 and all(math.isfinite(v) for v in value)),
                name,
                "must be one finite number or 3 finite numbers (R, G, B)",
            )
            setattr(self, name, float(value) if _is_number(value) else [float(v) for v in value])
        rescale = self.depth_input_rescale
        check(all(v != 0 for v in (rescale if isinstance(rescale, list) else [rescale])), "depth_input_rescale",
              "must be non-zero (a zero factor erases the band)")
        scale = self.depth_input_scale
        check(_is_number(scale) and math.isfinite(scale) and 0 < scale <= 1, "depth_input_scale",
              "must be a number in (0, 1]: the factor the R, G, B bands are resized by before the depth model (1.0, "
              "the default, keeps full resolution; 0.5 halves each side). For a fixed size pass depth_input_size")
        self.depth_input_scale = float(scale)
        size = self.depth_input_size
        check(
            size is None
            or (_is_int(size) and size >= 1)
            or (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(v) and v >= 1 for v in size)),
            "depth_input_size",
            "must be None, a positive int (a square size in pixels) or (height, width) positive ints",
        )
        if size is not None:
            self.depth_input_size = int(size) if _is_int(size) else [int(v) for v in size]
        check(size is None or self.depth_input_scale == 1.0, "depth_input_size",
              f"cannot be combined with depth_input_scale={self.depth_input_scale}: pass one of them (a size replaces "
              "the scale; leave depth_input_scale at 1.0)")
        for name in ("depth_image_mean", "depth_image_std"):
            value = getattr(self, name)
            check(_is_numbers(value) and len(value) == 3 and all(math.isfinite(v) for v in value), name,
                  "must be 3 finite numbers (R, G, B)")
            setattr(self, name, [float(v) for v in value])
        check(all(v > 0 for v in self.depth_image_std), "depth_image_std", "must be 3 positive numbers")
        value = self.depth_hidden_size
        check(value is None or (_is_int(value) and value >= 1), "depth_hidden_size", "must be None or an integer >= 1")
        for name in ("num_prefix_tokens", "depth_num_prefix_tokens"):
            value = getattr(self, name)
            check(value is None or (_is_int(value) and value >= 0), name, "must be None or an integer >= 0")
        for name in ("depth_hidden_size", "num_prefix_tokens", "depth_num_prefix_tokens"):
            if getattr(self, name) is not None:
                setattr(self, name, int(getattr(self, name)))

        # --- where to apply
        for name, allow_empty in (("target_modules", False), ("exclude_modules", True)):
            value = getattr(self, name)
            if isinstance(value, str):
                check(value != "" and _compiles(value), name, "must be a valid regular expression (or a list of names)")
                continue
            check(
                value is None
                or (
                    isinstance(value, (list, tuple, set, frozenset))
                    and (allow_empty or len(value) > 0)
                    and all(isinstance(v, str) and v for v in value)
                ),
                name,
                "must be None, a regular expression, or a non-empty list of module names",
            )
            if value is not None:
                setattr(self, name, sorted(value) if isinstance(value, (set, frozenset)) else list(value))
        layers = self.layers_to_transform
        check(
            layers is None
            or (_is_int(layers) and layers >= 0)
            or (isinstance(layers, (list, tuple)) and len(layers) > 0 and all(_is_int(i) and i >= 0 for i in layers)),
            "layers_to_transform",
            "must be None, a block index or a non-empty list of block indices (0-based)",
        )
        if layers is not None:
            self.layers_to_transform = int(layers) if _is_int(layers) else [int(i) for i in layers]
        value = self.modules_to_save
        check(not isinstance(value, str), "modules_to_save", f"must be a list of module names, e.g. [{value!r}]")
        check(
            value is None or (isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value)),
            "modules_to_save",
            "must be None or a list of module names, e.g. ['decode_head']",
        )
        if value is not None:
            self.modules_to_save = list(value)


    def _validate_bands(self) -> None:
        """The band fields and their agreement (also run when the adapter records the model's bands)."""

        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ValueError(f"SpectralMoEConfig.{name}: {message} (got {getattr(self, name)!r}).")

        bands = self.rgb_band_indices
        check(
            bands is None
            or (
                isinstance(bands, (list, tuple))
                and len(bands) == 3
                and all(_is_int(b) and b >= 0 for b in bands)
                and len(set(bands)) == 3
            ),
            "rgb_band_indices",
            "must be None or three distinct non-negative channel indices (R, G, B)",
        )
        if bands is not None:
            self.rgb_band_indices = [int(b) for b in bands]
        wavelengths = self.band_wavelengths_nm
        check(
            wavelengths is None
            or (
                isinstance(wavelengths, (list, tuple))
                and len(wavelengths) >= 3
                and all(_is_number(w) and math.isfinite(w) and w > 0 for w in wavelengths)
            ),
            "band_wavelengths_nm",
            "must be None or one positive wavelength (nm) per input band, at least 3",
        )
        if wavelengths is not None:
            self.band_wavelengths_nm = [float(w) for w in wavelengths]
            nearest = _nearest_bands(self.band_wavelengths_nm)
            if bands is None:
                check(
                    len(set(nearest)) == 3,
                    "band_wavelengths_nm",
                    f"has no distinct bands near 665/560/490 nm (picked {nearest}); set rgb_band_indices instead",
                )
            else:
                check(max(bands) < len(wavelengths), "rgb_band_indices",
                      f"is out of range for the {len(wavelengths)} bands of band_wavelengths_nm")
                # both given and disagreeing: one would silently win; agreeing (e.g. both recorded) is harmless
                check(
                    self.rgb_band_indices == nearest,
                    "band_wavelengths_nm",
                    f"picks bands {nearest} for R, G, B (nearest 665/560/490 nm), but rgb_band_indices="
                    f"{self.rgb_band_indices} was given too. Give only one of them: rgb_band_indices alone chooses "
                    "the bands; band_wavelengths_nm alone picks those nearest the R, G, B wavelengths",
                )
        count = self.num_input_bands
        check(count is None or (_is_int(count) and count >= 1), "num_input_bands", "must be None or an integer >= 1")
        if count is not None:
            self.num_input_bands = int(count)
        names = self.band_names
        check(
            names is None
            or (isinstance(names, (list, tuple)) and len(names) >= 1 and all(isinstance(n, str) and n for n in names)
                and len(set(names)) == len(names)),
            "band_names",
            "must be None or one distinct, non-empty name per input band",
        )
        if names is not None:
            self.band_names = list(names)
        for name in ("band_wavelengths_nm", "band_names"):
            value = getattr(self, name)
            check(value is None or count is None or len(value) == count, name,
                  f"must list one entry per input band (num_input_bands={count})")
        if wavelengths is not None and names is not None:
            check(len(names) == len(wavelengths), "band_names",
                  f"must list as many bands as band_wavelengths_nm ({len(wavelengths)})")
        if bands is not None and count is not None:
            check(max(bands) < count, "rgb_band_indices", f"is out of range for num_input_bands={count}")
        path = self.widened_patch_embedding
        check(path is None or (isinstance(path, str) and path.strip() != ""), "widened_patch_embedding",
              "must be None or a module path (what widen_patch_embedding returned)")


def _is_int(value: object) -> bool:
    """Integers, numpy's included; not bool (True would pass as 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """Real numbers, numpy's included; not bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_numbers(value: object) -> bool:
    return isinstance(value, (list, tuple)) and all(_is_number(v) for v in value)


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _nearest_bands(wavelengths: list[float]) -> list[int]:
    """Indices of the bands nearest 665, 560 and 490 nm (R, G, B)."""
    return [min(range(len(wavelengths)), key=lambda i: abs(wavelengths[i] - t)) for t in RGB_WAVELENGTHS_NM]
