"""SpectralMoEConfig: every knob of the method, validated up front so mistakes surface at construction."""

from __future__ import annotations

import math
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

    Defaults follow the paper's released configuration. The adapter refines the patch tokens after each targeted ViT
    block with dual-gated top-k mixtures of low-rank token experts, guided by depth features fused in by
    cross-attention. See ``docs/method.md`` for the math.
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
        if isinstance(self.target_modules, list):
            self.target_modules = list(self.target_modules)
        self._validate()

    def resolved_rgb_band_indices(self) -> list[int]:
        """R, G, B input channels: as given, else nearest to 665/560/490 nm, else [0, 1, 2]."""
        if self.rgb_band_indices is not None:
            return list(self.rgb_band_indices)
        if self.band_wavelengths_nm is not None:
            wavelengths = self.band_wavelengths_nm
            return [min(range(len(wavelengths)), key=lambda i: abs(wavelengths[i] - t)) for t in RGB_WAVELENGTHS_NM]
        return [0, 1, 2]

    def _validate(self) -> None:
        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ValueError(f"SpectralMoEConfig.{name}: {message} (got {getattr(self, name)!r}).")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        check(is_int(self.num_experts) and self.num_experts >= 1, "num_experts", "must be an integer >= 1")
        check(
            is_int(self.top_k) and 1 <= self.top_k <= self.num_experts,
            "top_k",
            f"must be an integer in [1, num_experts={self.num_experts}]",
        )
        check(is_int(self.expert_rank) and self.expert_rank >= 1, "expert_rank", "must be an integer >= 1")
        check(
            is_int(self.num_tokens) and self.num_tokens >= 2,
            "num_tokens",
            "must be an integer >= 2 (token 1 is the sink, at least one more carries content)",
        )
        check(self.gating in GATING_TYPES, "gating", f"must be one of {GATING_TYPES}")
        check(self.fusion in FUSION_TYPES, "fusion", f"must be one of {FUSION_TYPES}")
        check(self.init_weights in (True, False, "paper"), "init_weights", "must be True, False or 'paper'")
        check(
            isinstance(self.scale_init, (int, float)) and math.isfinite(self.scale_init),
            "scale_init",
            "must be a finite number",
        )
        for name in ("balance_loss_weight", "switch_loss_weight", "router_z_loss_weight"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, name, "must be >= 0")
        for name in ("aux_loss_in_graph", "keep_routing_stats"):
            check(isinstance(getattr(self, name), bool), name, "must be True or False")
        check(self.depth_source in DEPTH_SOURCES, "depth_source", f"must be one of {DEPTH_SOURCES}")
        bands = self.rgb_band_indices
        check(
            bands is None
            or (
                isinstance(bands, (list, tuple))
                and len(bands) == 3
                and all(is_int(b) and b >= 0 for b in bands)
                and len(set(bands)) == 3
            ),
            "rgb_band_indices",
            "must be three distinct non-negative channel indices (R, G, B)",
        )
        self.rgb_band_indices = None if bands is None else list(bands)
        wavelengths = self.band_wavelengths_nm
        check(
            wavelengths is None
            or (
                isinstance(wavelengths, (list, tuple))
                and len(wavelengths) >= 3
                and all(isinstance(w, (int, float)) and w > 0 for w in wavelengths)
            ),
            "band_wavelengths_nm",
            "must be None or one positive wavelength (nm) per input band, at least 3",
        )
        if wavelengths is not None:
            self.band_wavelengths_nm = [float(w) for w in wavelengths]
            if bands is not None and max(bands) >= len(wavelengths):
                check(False, "rgb_band_indices", f"is out of range for {len(wavelengths)} bands with wavelengths")
        if bands is None and wavelengths is not None:
            resolved = self.resolved_rgb_band_indices()
            check(
                len(set(resolved)) == 3,
                "band_wavelengths_nm",
                f"has no distinct bands near 665/560/490 nm (picked {resolved}); set rgb_band_indices",
            )
        nodata = self.nodata_value
        check(
            nodata is None or isinstance(nodata, (int, float)) or (
                isinstance(nodata, (list, tuple)) and all(isinstance(v, (int, float)) for v in nodata)
            ),
            "nodata_value",
            "must be None, a number, or one number per band",
        )
        for name in ("depth_image_mean", "depth_image_std"):
            value = getattr(self, name)
            check(isinstance(value, (list, tuple)) and len(value) == 3, name, "must have 3 values (R, G, B)")
            setattr(self, name, [float(v) for v in value])
        check(all(v > 0 for v in self.depth_image_std), "depth_image_std", "must be positive")
        for name in ("depth_input_rescale", "depth_input_offset"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                check(len(value) == 3, name, "must be one number or 3 numbers (R, G, B)")
                setattr(self, name, [float(v) for v in value])
            else:
                check(isinstance(value, (int, float)), name, "must be one number or 3 numbers (R, G, B)")
        for name in ("depth_hidden_size",):
            value = getattr(self, name)
            check(value is None or (is_int(value) and value >= 1), name, "must be None or an integer >= 1")
        for name in ("num_prefix_tokens", "depth_num_prefix_tokens"):
            value = getattr(self, name)
            check(value is None or (is_int(value) and value >= 0), name, "must be None or an integer >= 0")
        layers = self.layers_to_transform
        check(
            layers is None
            or (is_int(layers) and layers >= 0)
            or (isinstance(layers, (list, tuple)) and all(is_int(i) and i >= 0 for i in layers)),
            "layers_to_transform",
            "must be None, a block index or a list of block indices",
        )
        if isinstance(layers, tuple):
            self.layers_to_transform = list(layers)
