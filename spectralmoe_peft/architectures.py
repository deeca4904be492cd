"""Per-family facts about HF ViTs: where the blocks are, how many prefix tokens precede the patches, patch size.

Blocks are found by structure, not by path (transformers 5 renamed paths): the ``nn.ModuleList`` of same-typed
attention blocks that sits closest to a patch-embedding convolution. That picks the vision tower of CLIP (not the
text tower) and the backbone of a segmentation model (not its decoder). Prefix-token counts (CLS, distillation,
registers) come from the model's config, never from a constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

# model_type -> number of tokens before the patch tokens, read from the vision config
PREFIX_TOKENS: dict[str, Callable[[Any], int]] = {
    "vit": lambda c: 1,
    "vit_msn": lambda c: 1,
    "deit": lambda c: 2,  # CLS + distillation token
    "dinov2": lambda c: 1,
    "dinov2_with_registers": lambda c: 1 + int(getattr(c, "num_register_tokens", 0)),
    "dinov3_vit": lambda c: 1 + int(getattr(c, "num_register_tokens", 0)),
    "clip_vision_model": lambda c: 1,
    "siglip_vision_model": lambda c: 0,
    "beit": lambda c: 1,
    "data2vec-vision": lambda c: 1,
}
SUPPORTED_FAMILIES = sorted(PREFIX_TOKENS)
SUPPORTED = (
    f"Supported: plain (isotropic) ViTs of the families {SUPPORTED_FAMILIES} (ViT, DeiT, DINOv2 with or without "
    "registers, DINOv3, CLIP/SigLIP vision towers, BEiT), as bare models, *ForImageClassification, or the backbone "
    "of a segmentation model (UperNet or Mask2Former with a DINOv2/DINOv3 backbone)."
)
_ATTENTION_NAMES = ("attention", "attn")


@dataclass(frozen=True)
class BlockStack:
    """The ViT blocks of a model and the facts the adapter needs about them."""

    path: str  # dotted path of the nn.ModuleList, e.g. "backbone.encoder.layer"
    num_blocks: int
    hidden_size: int
    num_prefix_tokens: int
    patch_size: tuple[int, int]
    model_type: str

    def block_name(self, index: int) -> str:
        return f"{self.path}.{index}" if self.path else str(index)

    def block_index(self, module_name: str) -> Optional[int]:
        """Index of the block called ``module_name``, or None if it is not one of these blocks."""
        prefix = f"{self.path}." if self.path else ""
        if not module_name.startswith(prefix):
            return None
        rest = module_name[len(prefix) :]
        return int(rest) if rest.isdigit() and int(rest) < self.num_blocks else None


def _unwrap(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _is_block_list(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    blocks = [_unwrap(child) for child in module]
    if not all(type(block) is type(blocks[0]) for block in blocks):
        return False
    return any(any(key in name.lower() for key in _ATTENTION_NAMES) for name, _ in blocks[0].named_modules() if name)


def _is_patch_embedding(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == module.stride
        and module.kernel_size[0] > 1
        and module.padding in ((0, 0), "valid")
    )


def _common_depth(a: str, b: str) -> int:
    depth = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        depth += 1
    return depth


def _as_pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _vision_config(model: nn.Module, path: str) -> Any:
    """The config of the nearest ancestor of ``path`` that carries one with a ViT model_type."""
    parts = path.split(".") if path else []
    fallback = None
    for depth in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:depth])) if depth else model
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "model_type"):
            continue
        if config.model_type in PREFIX_TOKENS:
            return config
        for name in ("vision_config", "backbone_config"):
            inner = getattr(config, name, None)
            if inner is not None and getattr(inner, "model_type", None) in PREFIX_TOKENS:
                return inner
        fallback = fallback or config
    return fallback


def _hierarchical_reason(model: nn.Module, path: str, config: Any) -> Optional[str]:
    """Why the backbone at ``path`` is hierarchical (stages of other widths and grids), or None for a plain ViT."""
    for candidate in (config, getattr(config, "backbone_config", None), getattr(config, "vision_config", None)):
        for name in ("depths", "hidden_sizes"):  # Swin, SwinV2, SegFormer, PVT, Hiera, FocalNet, ConvNeXt...
            value = getattr(candidate, name, None) if candidate is not None else None
            if isinstance(value, (list, tuple)) and len(value) > 0:
                kind = getattr(candidate, "model_type", type(candidate).__name__)
                return f"its config ({kind}) describes stages ({name}={list(value)})"
    blocks = model.get_submodule(path)
    nested = [name for name, module in _unwrap(blocks[0]).named_modules() if name and _is_block_list(module)]
    if nested:
        return f"each of its blocks at '{path}' holds further blocks ('{nested[0]}')"
    return None


def find_block_stack(model: nn.Module, num_prefix_tokens: Optional[int] = None) -> BlockStack:
    """Locate the ViT blocks of ``model`` (a bare HF ViT or a model wrapping one).

    Raises a ValueError that names what was missing when the model is not a supported ViT.
    """
    candidates = [name for name, module in model.named_modules() if _is_block_list(module)]
    if not candidates:
        raise ValueError(
            f"SpectralMoE found no ViT blocks in {type(model).__name__}: expected an nn.ModuleList of attention "
            f"blocks (convolutional backbones such as ConvNeXt or ResNet have none). {SUPPORTED}"
        )
    patch_embeddings = [name for name, module in model.named_modules() if _is_patch_embedding(module)]
    if patch_embeddings:
        candidates.sort(key=lambda c: max(_common_depth(c, p) for p in patch_embeddings), reverse=True)
    elif len(candidates) > 1:
        raise ValueError(
            f"SpectralMoE found several block lists {candidates} in {type(model).__name__} and no patch embedding "
            "to tell which is the ViT: pass target_modules to pick the blocks."
        )
    path = candidates[0]
    config = _vision_config(model, path)
    if config is None:
        raise ValueError(f"SpectralMoE needs a HF config on the ViT at '{path}' to read its width and patch size.")
    model_type = getattr(config, "model_type", "unknown")
    reason = _hierarchical_reason(model, path, config) if model_type not in PREFIX_TOKENS else None
    if reason is not None:  # no num_prefix_tokens can fix this: say so instead of suggesting it
        raise ValueError(
            f"SpectralMoE does not support hierarchical backbones such as {type(model).__name__} ({model_type}): "
            f"{reason}. The adapter refines one token grid of one width after every block, which a backbone whose "
            f"stages change width and resolution does not have. {SUPPORTED}"
        )
    if num_prefix_tokens is None:
        if model_type not in PREFIX_TOKENS:
            raise ValueError(
                f"SpectralMoE does not know how many prefix tokens (CLS, registers) the ViT family {model_type!r} "
                f"has. If it is a plain (isotropic) ViT, set SpectralMoEConfig.num_prefix_tokens. {SUPPORTED}"
            )
        num_prefix_tokens = PREFIX_TOKENS[model_type](config)
    hidden_size = getattr(config, "hidden_size", None)
    patch_size = getattr(config, "patch_size", None)
    if hidden_size is None or patch_size is None:
        raise ValueError(f"The config of the ViT at '{path}' ({model_type}) has no hidden_size or patch_size.")
    return BlockStack(
        path=path,
        num_blocks=len(model.get_submodule(path)),
        hidden_size=int(hidden_size),
        num_prefix_tokens=int(num_prefix_tokens),
        patch_size=_as_pair(patch_size),
        model_type=model_type,
    )


def patch_size_of(config: Any) -> Optional[tuple[int, int]]:
    """Patch size of a (depth) model config, looking into its backbone config when it wraps one."""
    for candidate in (config, getattr(config, "backbone_config", None), getattr(config, "vision_config", None)):
        value = getattr(candidate, "patch_size", None) if candidate is not None else None
        if value is not None:
            return _as_pair(value)
    return None


def prefix_tokens_of(config: Any) -> Optional[int]:
    """Prefix-token count of a (depth) model config of a known family, looking into its backbone config."""
    for candidate in (config, getattr(config, "backbone_config", None), getattr(config, "vision_config", None)):
        model_type = getattr(candidate, "model_type", None) if candidate is not None else None
        if model_type in PREFIX_TOKENS:
            return PREFIX_TOKENS[model_type](candidate)
    return None
