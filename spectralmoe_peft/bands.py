"""N-band inputs for RGB-pretrained ViTs: widen the patch embedding so multispectral images go in whole, and keep
the bands with the adapter (its config records them; a reload onto the RGB base widens it again)."""

from __future__ import annotations

import copy
import math
import numbers
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .architectures import _is_patch_embedding, find_block_stack

# set on a patch embedding that widen_patch_embedding made: the adapter config copies it when it is created
BANDS_ATTRIBUTE = "spectralmoe_bands"
RGB_NAMES = (("red", "r"), ("green", "g"), ("blue", "b"))
_WRAPPER_PARTS = ("original_module", "modules_to_save", "base_layer")  # peft's ModulesToSaveWrapper & co


def find_patch_embedding(model: nn.Module) -> str:
    """Path of the ViT's patch-embedding convolution (the one nearest its blocks, e.g. not a decoder's)."""
    stack = find_block_stack(model)
    convolutions = [name for name, module in model.named_modules() if _is_patch_embedding(module)]
    if not convolutions:
        raise ValueError(f"No patch-embedding convolution found in {type(model).__name__}.")

    def shared_depth(name: str) -> int:
        return sum(1 for _ in zip(name.split("."), stack.path.split(".")) if _[0] == _[1])

    return max(convolutions, key=shared_depth)


def _module_path(path: str) -> str:
    """``a.projection`` for ``a.projection.modules_to_save.default`` (peft wraps a module to save in place)."""
    parts = path.split(".")
    for at, part in enumerate(parts):
        if part in _WRAPPER_PARTS:
            return ".".join(parts[:at])
    return path


def rgb_from_band_names(band_names: Sequence[str]) -> Optional[list[int]]:
    """R, G, B positions when the names say them ('red'/'R', 'green'/'G', 'blue'/'B', any case); else None."""
    lowered = [name.strip().lower() for name in band_names]
    picks = [next((i for i, name in enumerate(lowered) if name in names), None) for names in RGB_NAMES]
    return None if None in picks else picks


def resolve_bands(
    num_bands: Optional[int] = None,
    rgb_band_indices: Optional[Sequence[int]] = None,
    band_wavelengths_nm: Optional[Sequence[float]] = None,
    band_names: Optional[Sequence[str]] = None,
    caller: str = "widen_patch_embedding",
) -> dict[str, Any]:
    """Band count and R, G, B positions from whatever was given, checked against each other (as the config does:
    indices win when given, else the wavelengths nearest 665/560/490 nm, else names 'red'/'green'/'blue', else
    0, 1, 2)."""
    from .config import _nearest_bands

    counts = {}
    if num_bands is not None:
        if not (isinstance(num_bands, numbers.Integral) and not isinstance(num_bands, bool) and num_bands >= 3):
            raise ValueError(f"{caller}(num_bands=...): must be an integer >= 3; got {num_bands!r}.")
        counts["num_bands"] = int(num_bands)
    if band_wavelengths_nm is not None:
        if not (isinstance(band_wavelengths_nm, (list, tuple)) and all(
                isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) and w > 0
                for w in band_wavelengths_nm)):
            raise ValueError(f"{caller}(band_wavelengths_nm=...): must be one positive wavelength (nm) per band; "
                             f"got {band_wavelengths_nm!r}.")
        band_wavelengths_nm = [float(w) for w in band_wavelengths_nm]
        counts["band_wavelengths_nm"] = len(band_wavelengths_nm)
    if band_names is not None:
        if not (isinstance(band_names, (list, tuple)) and all(isinstance(n, str) and n for n in band_names)
                and len(set(band_names)) == len(band_names)):
            raise ValueError(f"{caller}(band_names=...): must be distinct non-empty names, one per band; "
                             f"got {band_names!r}.")
        band_names = list(band_names)
        counts["band_names"] = len(band_names)
    if not counts:
        raise ValueError(f"{caller}: give num_bands, band_wavelengths_nm or band_names.")
    if len(set(counts.values())) > 1:
        raise ValueError(f"{caller}: the band counts disagree: " + ", ".join(f"{k} gives {v}" for k, v in counts.items())
                         + ".")
    count = next(iter(counts.values()))
    if count < 3:
        raise ValueError(f"{caller}: needs at least 3 bands (R, G, B for the RGB filters); got {count}.")
    if rgb_band_indices is None:
        if band_wavelengths_nm is not None:
            rgb_band_indices = _nearest_bands(band_wavelengths_nm)
        elif band_names is not None:
            rgb_band_indices = rgb_from_band_names(band_names)
    rgb = list(rgb_band_indices) if rgb_band_indices is not None else [0, 1, 2]
    if not (len(rgb) == 3 and len(set(rgb)) == 3
            and all(isinstance(b, numbers.Integral) and not isinstance(b, bool) and 0 <= b < count for b in rgb)):
        raise ValueError(f"{caller}(rgb_band_indices=...): must be three distinct band indices < {count}; got {rgb} "
                         "(from wavelengths: no distinct bands near 665/560/490 nm? give rgb_band_indices).")
    return {"num_input_bands": count, "rgb_band_indices": [int(b) for b in rgb],
            "band_wavelengths_nm": band_wavelengths_nm, "band_names": band_names}


@torch.no_grad()
def widen_patch_embedding(
    model: nn.Module,
    num_bands: Optional[int] = None,
    rgb_band_indices: Optional[Sequence[int]] = None,
    path: Optional[str] = None,
    *,
    band_wavelengths_nm: Optional[Sequence[float]] = None,
    band_names: Optional[Sequence[str]] = None,
) -> str:
    """Give an RGB ViT a patch embedding for N input bands, in place; returns its module path.

    The bands are given by count (``num_bands``), centre wavelengths (``band_wavelengths_nm``, as in the config) or
    names (``band_names``); R, G, B are ``rgb_band_indices``, else the bands nearest 665/560/490 nm, else those named
    red/green/blue, else 0, 1, 2. The R, G, B filters are copied to those bands; every other band gets the mean of
    the three; all are scaled by 3 / N, so an image whose bands all carry the same signal gives exactly the RGB
    model's activations. Put the returned path in ``SpectralMoEConfig(modules_to_save=[...])`` to train it with the
    adapter. The adapter created on this model records the bands (``num_input_bands``, wavelengths, names, R, G, B,
    ``widened_patch_embedding``), so ``PeftModel.from_pretrained(rgb_base, path)`` widens the RGB base again.
    """
    if any(hasattr(module, "peft_config") for module in model.modules()):
        raise ValueError(
            "widen_patch_embedding(model=...): this model already carries PEFT adapters; widen the base model before "
            "get_peft_model (and put the returned path in modules_to_save), so the adapter records the bands."
        )
    bands = resolve_bands(num_bands, rgb_band_indices, band_wavelengths_nm, band_names)
    num_bands, rgb_band_indices = bands["num_input_bands"], bands["rgb_band_indices"]
    path = path or find_patch_embedding(model)
    old: nn.Conv2d = model.get_submodule(path)
    if old.in_channels != 3:
        raise ValueError(f"widen_patch_embedding expects an RGB (3-band) patch embedding; '{path}' has {old.in_channels}.")
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
    new.requires_grad_(old.weight.requires_grad)
    setattr(new, BANDS_ATTRIBUTE, bands)  # a plain attribute: copied with the module (peft's modules_to_save)
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


def prepare_input_bands(model: nn.Module, config: Any) -> None:
    """Called when an adapter is injected (created or loaded), before anything else touches the model.

    Records the model's input bands in ``config`` when it has none (a new adapter, or one saved before bands were
    recorded): the patch embedding's channel count, the wavelengths / names / R, G, B that ``widen_patch_embedding``
    left on it, and its path if it was widened. A loaded adapter that was trained on more bands than the model takes
    widens the RGB base the same way (the trained weights then come from ``modules_to_save``), or stops with an error
    that says what to call. Everything is checked before the model is changed.
    """
    try:
        found = find_patch_embedding(model)
    except ValueError:
        return  # no ViT / no patch convolution: the block search that follows says what is wrong
    path = _module_path(found)
    conv = model.get_submodule(found)
    channels = conv.in_channels
    marker = getattr(conv, BANDS_ATTRIBUTE, None)
    if config.num_input_bands is None:
        _record_bands(config, path, channels, marker)
        return
    if config.num_input_bands == channels:
        return
    wanted = config.num_input_bands
    call = (f"widen_patch_embedding(base, num_bands={wanted}, rgb_band_indices={config.resolved_rgb_band_indices()})"
            f" (from spectralmoe_peft.bands)")
    if channels != 3 or config.widened_patch_embedding is None:
        how = (f"call {call} on the base model first" if channels == 3 else
               f"load it onto a base model whose patch embedding takes {wanted} bands")
        raise ValueError(
            f"This SpectralMoE adapter was trained on {wanted} input bands, but the model's patch embedding '{path}' "
            f"takes {channels}: {how}."
        )
    if config.widened_patch_embedding != path:
        raise ValueError(
            f"This SpectralMoE adapter was trained with the patch embedding '{config.widened_patch_embedding}' widened "
            f"to {wanted} bands, but this model's patch embedding is '{path}' (another model class?): load it onto "
            f"the class it was trained on (AutoPeftModel.from_pretrained does), or call {call} yourself first."
        )
    widen_patch_embedding(model, wanted, config.resolved_rgb_band_indices(), path,
                          band_wavelengths_nm=config.band_wavelengths_nm, band_names=config.band_names)


def _record_bands(config: Any, path: str, channels: int, marker: Optional[dict]) -> None:
    """Fill the config's band fields from the model; the user's own values must agree with it. All or nothing: the
    new values are checked on a copy first."""
    given = {"band_wavelengths_nm": config.band_wavelengths_nm, "band_names": config.band_names}
    for name, value in given.items():
        if value is not None and len(value) != channels:
            raise ValueError(
                f"SpectralMoEConfig.{name}: lists {len(value)} bands, but the model's patch embedding '{path}' takes "
                f"{channels}. For an RGB-pretrained ViT, call widen_patch_embedding(model, {name}=...) (from "
                "spectralmoe_peft.bands) before get_peft_model."
            )
    updates: dict[str, Any] = {"num_input_bands": channels}
    # an adapter saved before bands were recorded, loaded onto a base widened by hand: record what it was trained
    # with, never change which bands its depth stream reads
    loading = config.inference_mode
    if marker is not None:
        for name in ("band_wavelengths_nm", "band_names"):
            if given[name] is not None and marker[name] is not None and list(given[name]) != marker[name]:
                raise ValueError(
                    f"SpectralMoEConfig.{name}: {given[name]} disagrees with the {marker[name]} the patch embedding "
                    f"'{path}' was widened for: give the same bands to both (or only to widen_patch_embedding)."
                )
        for name in ("band_names",) if loading else ("band_wavelengths_nm", "band_names"):
            if given[name] is None and marker[name] is not None:
                updates[name] = marker[name]
        if not loading and config.rgb_band_indices is None and config.band_wavelengths_nm is None \
                and updates.get("band_wavelengths_nm") is None:
            updates["rgb_band_indices"] = marker["rgb_band_indices"]
        saved = any(f".{m}." in f".{path}." for m in config.modules_to_save or [])
        if not loading or saved or config.resolved_rgb_band_indices() == marker["rgb_band_indices"]:
            updates["widened_patch_embedding"] = path  # a reload onto the RGB base rebuilds the same weights
    candidate = _with(config, **updates)
    if marker is not None and not loading and candidate.resolved_rgb_band_indices() != marker["rgb_band_indices"]:
        raise ValueError(
            f"SpectralMoEConfig.rgb_band_indices: the adapter would give the depth model bands "
            f"{candidate.resolved_rgb_band_indices()} as R, G, B, but the patch embedding '{path}' was widened with its "
            f"R, G, B filters on bands {marker['rgb_band_indices']}: give both the same bands."
        )
    if candidate.rgb_band_indices is None and candidate.band_wavelengths_nm is None and candidate.band_names \
            and not loading:
        candidate = _with(candidate, rgb_band_indices=rgb_from_band_names(candidate.band_names))
    if channels >= 3:
        candidate = _with(candidate, rgb_band_indices=candidate.resolved_rgb_band_indices())
    for name in ("num_input_bands", "band_wavelengths_nm", "band_names", "rgb_band_indices", "widened_patch_embedding"):
        setattr(config, name, getattr(candidate, name))


def _with(config: Any, **updates: Any) -> Any:
    """A copy of ``config`` with ``updates``, its band fields checked (the config's own checks and messages)."""
    candidate = copy.copy(config)
    for name, value in updates.items():
        setattr(candidate, name, value)
    candidate._validate_bands()
    return candidate
