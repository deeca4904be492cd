"""Model cards for SpectralMoE adapters: how to load them (``import spectralmoe_peft`` first), and what they were
trained on (base model, depth model, bands, classes, metrics).

peft writes ``README.md`` on every ``save_pretrained`` (and so on every ``push_to_hub``, which uploads the folder
``save_pretrained`` wrote). This package extends that card with a SpectralMoE section, replaced (not duplicated)
on each save. Facts peft cannot know are set once with :func:`set_model_card_info`.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import Any, Mapping, Optional, Sequence

START, END = "<!-- spectralmoe-peft:start -->", "<!-- spectralmoe-peft:end -->"
TAGS = ("spectralmoe", "remote-sensing", "mixture-of-experts", "semantic-segmentation")


def set_model_card_info(
    model: Any,
    *,
    base_model: Optional[str] = None,
    depth_model: Optional[str] = None,
    bands: Optional[Sequence[str]] = None,
    wavelengths_nm: Optional[Sequence[float]] = None,
    classes: Optional[Sequence[str]] = None,
    metrics: Optional[Mapping[str, float]] = None,
    datasets: Optional[Sequence[str]] = None,
    notes: Optional[str] = None,
) -> None:
    """Record what the card should say about ``model`` (a PeftModel with SpectralMoE adapters); None keeps a value
    set earlier. ``metrics``: e.g. ``{"source mIoU": 0.71, "target mIoU": 0.52}``.

    Checked here, all or nothing, so that a mistake surfaces at this call and not in the next ``save_pretrained``.
    """
    tuner = getattr(model, "base_model", model)
    if not hasattr(tuner, "peft_config") or not hasattr(model, "peft_config"):
        raise TypeError(
            f"set_model_card_info(model=...): expects the PeftModel that get_peft_model or PeftModel.from_pretrained "
            f"returned; got {type(model).__name__}."
        )
    _check_text("base_model", base_model)
    _check_text("depth_model", depth_model)
    _check_text("notes", notes)
    _check_names("bands", bands, "band names, e.g. ['B02', 'B03', 'B04']")
    _check_names("classes", classes, "class names, e.g. ['water', 'forest'] (for numbered classes: "
                                     "[str(c) for c in classes])")
    _check_names("datasets", datasets, "dataset names or descriptions")
    if wavelengths_nm is not None and not (
        _is_sequence(wavelengths_nm)
        and all(isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) and w > 0
                for w in wavelengths_nm)
    ):
        raise TypeError(
            f"set_model_card_info(wavelengths_nm=...): must be a list of positive numbers (nm), one per band; "
            f"got {wavelengths_nm!r}."
        )
    if metrics is not None and not (
        isinstance(metrics, Mapping)
        and all(isinstance(k, str) for k in metrics)
        and all(isinstance(v, (str, numbers.Real)) and not isinstance(v, bool) for v in metrics.values())
    ):
        raise TypeError(
            f"set_model_card_info(metrics=...): must map metric names to numbers (or text), e.g. "
            f"{{'target mIoU': 0.52}} (a tensor: .item()); got {metrics!r}."
        )
    info = dict(getattr(tuner, "model_card_info", {}) or {})
    given = dict(base_model=base_model, depth_model=depth_model, bands=bands, wavelengths_nm=wavelengths_nm,
                 classes=classes, metrics=metrics, datasets=datasets, notes=notes)
    for key, value in given.items():
        if value is None:
            continue
        if key == "metrics":
            value = {k: v if isinstance(v, str) else int(v) if isinstance(v, numbers.Integral) else float(v)
                     for k, v in value.items()}
        elif key == "wavelengths_nm":
            value = [float(w) for w in value]
        elif not isinstance(value, str):
            value = list(value)
        info[key] = value
    bands, wavelengths_nm = info.get("bands"), info.get("wavelengths_nm")
    if bands is not None and wavelengths_nm is not None and len(bands) != len(wavelengths_nm):
        raise ValueError(f"{len(bands)} band names but {len(wavelengths_nm)} wavelengths.")
    object.__setattr__(tuner, "model_card_info", info)


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _check_text(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"set_model_card_info({name}=...): must be a string; got {value!r}.")


def _check_names(name: str, value: Any, what: str) -> None:
    if value is not None and not (_is_sequence(value) and all(isinstance(v, str) for v in value)):
        raise TypeError(f"set_model_card_info({name}=...): must be a list of {what}; got {value!r}.")


def _base_model_name(model: Any) -> Optional[str]:
    config = getattr(model.get_base_model(), "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return name or None


def _depth_model_name(model: Any, config: Any) -> Optional[str]:
    if config.depth_model_name_or_path:
        return config.depth_model_name_or_path
    depth = getattr(model.base_model, "depth_model", None)
    name = getattr(getattr(depth, "config", None), "_name_or_path", None)
    return name or (type(depth).__name__ + " (attached, not saved)" if depth is not None else None)


def model_card_section(model: Any, adapter_name: str = "default") -> str:
    """The SpectralMoE part of the card, as markdown."""
    config = model.peft_config[adapter_name]
    info = dict(getattr(model.base_model, "model_card_info", {}) or {})
    base = info.get("base_model") or _base_model_name(model) or "the base model it was trained on"
    depth = info.get("depth_model") or (_depth_model_name(model, config) if config.use_depth else None)
    base_call = f'AutoModel.from_pretrained("{base}")' if "/" in base else "...  # the same base model"
    lines = [
        START,
        "## SpectralMoE adapter",
        "",
        "Dual-gated mixture-of-experts adapters (SpectralMoE, CVPR 2026, arXiv 2603.13352) on a frozen ViT, made with "
        "[spectralmoe-peft](https://pypi.org/project/spectralmoe-peft/).",
        "",
        "### Load it",
        "",
        "```python",
        "import spectralmoe_peft  # registers SpectralMoE with peft (pip installs also do it on first load)",
        "from peft import PeftModel",
        "from transformers import AutoModel",
        "",
        f"base = {base_call}",
        'model = PeftModel.from_pretrained(base, "<this repo or folder>")',
    ]
    if config.use_depth and config.depth_source == "model" and not config.depth_model_name_or_path:
        loader = f"AutoModel.from_pretrained({depth!r})" if depth and "/" in depth else "depth_model"
        lines.append(f"model.set_depth_model({loader})  # frozen; not stored in the adapter")
    lines += ["```", "", "### Details", "", f"- Base model: `{base}`"]
    if config.use_depth:
        source = f"`{depth or 'not recorded'}`"
        if config.depth_source == "elevation":
            source = "elevation raster (`elevation=`)"
        lines.append(f"- Depth stream: {source}; fusion `{config.fusion}`")
    else:
        lines.append("- Depth stream: none (visual-only, `use_depth=False`)")
    bands = info.get("bands")
    if bands:
        waves = info.get("wavelengths_nm") or config.band_wavelengths_nm
        text = ", ".join(f"{b} ({w:g} nm)" for b, w in zip(bands, waves)) if waves else ", ".join(map(str, bands))
        lines.append(f"- Input bands ({len(bands)}): {text}")
    lines.append(f"- R, G, B for the depth model: band indices {config.resolved_rgb_band_indices()}")
    lines.append(f"- Experts: {config.num_experts}, top-{config.top_k}, rank {config.expert_rank}, "
                 f"{config.num_tokens} tokens, `{config.gating}` gating")
    if config.modules_to_save:
        lines.append(f"- Also trained and saved: {', '.join(f'`{m}`' for m in config.modules_to_save)}")
    if info.get("classes"):
        lines.append(f"- Classes ({len(info['classes'])}): " + ", ".join(info["classes"]))
    if info.get("datasets"):
        lines.append("- Data: " + "; ".join(info["datasets"]))
    if info.get("metrics"):
        lines += ["", "### Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in info["metrics"].items()]
    if info.get("notes"):
        lines += ["", info["notes"]]
    lines.append(END)
    return "\n".join(lines)


def write_model_card(model: Any, output_dir: str, adapter_name: str = "default") -> None:
    """Put the SpectralMoE section into ``output_dir/README.md`` (after peft has written its part).

    peft writes the card before the weights, in the same ``save_pretrained``: a problem with the card must never cost
    the weights, so it becomes a warning and the card keeps peft's part only.
    """
    try:
        _write_model_card(model, output_dir, adapter_name)
    except Exception as error:  # noqa: BLE001 (any failure here would stop the weights from being saved)
        warnings.warn(
            f"spectralmoe-peft could not write its section of the model card ({type(error).__name__}: {error}); "
            "the adapter's weights and config are saved regardless. Check set_model_card_info(...).",
            RuntimeWarning,
            stacklevel=2,
        )


def _write_model_card(model: Any, output_dir: str, adapter_name: str) -> None:
    from huggingface_hub import ModelCard

    path = os.path.join(output_dir, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard("")
    text = card.text
    if START in text and END in text:
        text = text[: text.index(START)] + text[text.index(END) + len(END):]
    if "[More Information Needed]" in text:  # huggingface_hub's empty template: keep only peft's version block
        text = text[text.index("### Framework versions"):] if "### Framework versions" in text else ""
    card.text = model_card_section(model, adapter_name) + "\n\n" + text.strip() + "\n"
    base = (getattr(model.base_model, "model_card_info", {}) or {}).get("base_model") or _base_model_name(model)
    tags = {t for t in (card.data.get("tags") or []) if not t.endswith(":")} | set(TAGS)  # drop peft's nameless tag
    if base and "/" in base:
        card.data["base_model"] = base
        tags.add(f"base_model:adapter:{base}")
    card.data["tags"] = sorted(tags)
    card.data["library_name"] = "peft"
    card.save(path)
