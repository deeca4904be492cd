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
import re
import warnings
from typing import Any, Mapping, Optional, Sequence

from .registration import SPECTRALMOE

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


REPO_PLACEHOLDER = "<this repo or folder>"
BASE_PLACEHOLDER = "<Hub id of the base model>"
DEPTH_PLACEHOLDER = "<Hub id of the depth model>"
BACKBONE_PLACEHOLDER = "<Hub id of the backbone>"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_HUB_CACHE = re.compile(r"(?:^|[\\/])models--([^\\/]+)[\\/]snapshots[\\/]")


def shareable_name(name_or_path: Optional[str]) -> Optional[str]:
    """A Hub id as is; a folder of the Hub cache as its repo id; any other local path (or nothing) as None.

    Local means anything not shaped like a Hub id (absolute, ``./``, ``~``, backslashes, more than one ``/``), or an
    existing folder without an owner part (``depth``). A relative folder shaped like ``owner/name`` is taken for
    the Hub id it mirrors (as ``snapshot_download(repo_id, local_dir=repo_id)`` leaves it)."""
    if not name_or_path or not isinstance(name_or_path, str):
        return None
    cached = _HUB_CACHE.search(name_or_path)
    if cached:
        return cached.group(1).replace("--", "/", 1)
    if not _HUB_ID.match(name_or_path) or ("/" not in name_or_path and os.path.exists(name_or_path)):
        return None
    return name_or_path


def _raw_base_name(model: Any) -> Optional[str]:
    config = getattr(model.get_base_model(), "config", None)
    return getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None


def _base_model_name(model: Any, config: Any = None) -> Optional[str]:
    """The base model's Hub id (the adapter config's, what set_model_card_info said, else the model config's), None
    when unknown or local."""
    info = getattr(model.base_model, "model_card_info", {}) or {}
    recorded = shareable_name(getattr(config, "base_model_name_or_path", None))
    return recorded or shareable_name(info.get("base_model")) or shareable_name(_raw_base_name(model))


def _attached_depth_id(model: Any) -> Optional[str]:
    depth = getattr(model.base_model, "depth_model", None)
    return shareable_name(getattr(getattr(depth, "config", None), "_name_or_path", None))


def _depth_model_name(model: Any, config: Any) -> Optional[str]:
    """Hub id of the depth model: the config's, what set_model_card_info said, or the attached model's."""
    info = getattr(model.base_model, "model_card_info", {}) or {}
    return (shareable_name(config.depth_model_name_or_path) or shareable_name(info.get("depth_model"))
            or _attached_depth_id(model))


def record_hub_ids(model: Any) -> None:
    """Before a save, name in each SpectralMoE adapter config what a reload needs, when known as Hub ids: the base
    model (``base_model_name_or_path``, which ``AutoPeftModel`` loads; from set_model_card_info when the model's own
    name is a local path or empty) and the depth model (``depth_model_name_or_path``, loaded again on the first
    forward after a reload: the attached model's Hub id, else the one given to set_model_card_info)."""
    info = getattr(model.base_model, "model_card_info", {}) or {}
    depth = _attached_depth_id(model) or shareable_name(info.get("depth_model"))
    for config in model.peft_config.values():
        if config.peft_type != SPECTRALMOE:
            continue
        if not shareable_name(config.base_model_name_or_path):
            base = _base_model_name(model)
            if base is not None:
                config.base_model_name_or_path = base
        if (depth is not None and config.use_depth and config.depth_source == "model"
                and not shareable_name(config.depth_model_name_or_path)):
            config.depth_model_name_or_path = depth


def _import_line(cls: type) -> str:
    import transformers

    if getattr(transformers, cls.__name__, None) is cls:
        return f"from transformers import {cls.__name__}"
    return f"from {cls.__module__} import {cls.__name__}"


def _dgss_upernet_call(base_model: Any) -> Optional[str]:
    """``build_upernet(...)`` that rebuilds this UperNet when it was built by it (Hub backbone, no Hub id of its own):
    the decode head and widened embedding come from the adapter, the rest from the backbone's Hub weights."""
    config = getattr(base_model, "config", None)
    backbone = getattr(base_model, "backbone", None)
    backbone_name = getattr(getattr(backbone, "config", None), "_name_or_path", None)
    if type(base_model).__name__ != "UperNetForSemanticSegmentation" or not backbone_name:
        return None
    if list(config.pool_scales) != [1, 2, 3, 6] or config.use_auxiliary_head:
        return None
    backbone_id = shareable_name(backbone_name) or BACKBONE_PLACEHOLDER
    return (f"build_upernet(num_bands=3, num_classes={config.num_labels}, backbone={backbone_id!r}, "
            f"head_hidden_size={config.hidden_size}, ignore_index={config.loss_ignore_index})")


def model_card_section(model: Any, adapter_name: str = "default", repo_id: Optional[str] = None) -> str:
    """The SpectralMoE part of the card, as markdown. Its load recipes run as written once ``repo_id`` (filled in
    by push_to_hub) replaces the placeholder; what the package cannot know (a base or depth model loaded from a local
    folder) is a placeholder with a note, never a local path."""
    config = model.peft_config[adapter_name]
    info = dict(getattr(model.base_model, "model_card_info", {}) or {})
    repo = repo_id or REPO_PLACEHOLDER
    base_model = model.get_base_model()
    base_cls = type(base_model)
    base = _base_model_name(model, config)
    depth_source_model = config.use_depth and config.depth_source == "model"
    depth = _depth_model_name(model, config) if depth_source_model else None
    depth_in_config = depth is not None and shareable_name(config.depth_model_name_or_path) == depth
    widened = config.widened_patch_embedding is not None and config.num_input_bands is not None
    dgss_call = _dgss_upernet_call(base_model) if base is None else None

    depth_lines = []
    if depth_source_model and not depth_in_config:
        if depth is not None:
            depth_lines.append(f"model.set_depth_model({depth!r})  # frozen; not stored in the adapter")
        else:
            depth_lines.append(f'model.set_depth_model("{DEPTH_PLACEHOLDER}")  # frozen; not stored in the adapter')
    lines = [
        START,
        "## SpectralMoE adapter",
        "",
        "Dual-gated mixture-of-experts adapters (SpectralMoE, CVPR 2026, arXiv 2603.13352) on a frozen ViT, made with "
        "[spectralmoe-peft](https://pypi.org/project/spectralmoe-peft/).",
        "",
        "### Load it",
        "",
    ]
    what = []
    if widened:
        saved = any(f".{m}." in f".{config.widened_patch_embedding}." for m in config.modules_to_save or [])
        what.append(f"widens the base model's patch embedding `{config.widened_patch_embedding}` from 3 to "
                    f"{config.num_input_bands} input bands (" + ("its trained weights come with the adapter)" if saved
                                                                 else "from its R, G, B filters, as in training)"))
    if depth_in_config:
        what.append(f"loads the depth model `{depth}` named in the adapter config on the first forward (attach "
                    "your own with `model.set_depth_model(...)` first to skip that)")
    register = "import spectralmoe_peft  # registers SpectralMoE with peft (pip installs also do it on first load)"
    if base is not None and config.task_type is None:
        lines += ["```python", register, "from peft import AutoPeftModel", "",
                  f'model = AutoPeftModel.from_pretrained("{repo}")', *depth_lines, "```", "",
                  f"`AutoPeftModel` loads the base model `{base}` as `{base_cls.__name__}` (recorded in the adapter "
                  "config), " + "".join(f"{w}, " for w in what) + "then the adapter.", "",
                  "Or onto a base model you load yourself:", ""]
    if dgss_call is not None:
        base_lines = ["from spectralmoe_peft.dgss import build_upernet", "", f"base, _ = {dgss_call}"]
    else:
        name = base or BASE_PLACEHOLDER
        base_lines = [_import_line(base_cls), "", f'base = {base_cls.__name__}.from_pretrained("{name}")']
    load = f'model = PeftModel.from_pretrained(base, "{repo}")'
    if widened:
        load += f"  # widens the patch embedding to {config.num_input_bands} bands"
    lines += ["```python", register, "from peft import PeftModel", *base_lines, load, *depth_lines, "```"]
    if len(what) and (base is None or config.task_type is not None):
        lines += ["", "`PeftModel.from_pretrained` " + ", ".join(what) + "."]
    notes = []
    if base is None and dgss_call is None:
        raw = _raw_base_name(model)
        notes.append("the base model was " + ("loaded from a local folder" if raw else "built from its config")
                     + f": replace `{BASE_PLACEHOLDER}` with the Hub id (or folder) of the same base model")
    if dgss_call is not None and BACKBONE_PLACEHOLDER in dgss_call:
        notes.append(f"the backbone was loaded from a local folder: replace `{BACKBONE_PLACEHOLDER}` with the Hub id "
                     "(or folder) of the same backbone")
    if depth_source_model and depth is None:
        notes.append(f"the depth model's Hub id is not known (attached as an object, or loaded from a local folder): "
                     f"replace `{DEPTH_PLACEHOLDER}` with it")
    if notes:
        lines += ["", "Note: " + "; ".join(notes) + "."]

    described = f"`{base}`" if base else "built by `spectralmoe_peft.dgss.build_upernet`" if dgss_call else "not recorded"
    lines += ["", "### Details", "", f"- Base model: {described} (`{base_cls.__name__}`)"]
    if config.use_depth:
        source = f"`{depth or 'not recorded'}`"
        if config.depth_source == "elevation":
            source = "elevation raster (`elevation=`)"
        lines.append(f"- Depth stream: {source}; fusion `{config.fusion}`")
    else:
        lines.append("- Depth stream: none (visual-only, `use_depth=False`)")
    bands = info.get("bands") or config.band_names
    waves = info.get("wavelengths_nm") or config.band_wavelengths_nm
    count = len(bands) if bands else len(waves) if waves else config.num_input_bands
    if bands:
        text = ", ".join(f"{b} ({w:g} nm)" for b, w in zip(bands, waves)) if waves else ", ".join(map(str, bands))
        lines.append(f"- Input bands ({len(bands)}): {text}")
    elif waves:
        lines.append(f"- Input bands ({len(waves)}): " + ", ".join(f"{w:g} nm" for w in waves))
    elif count:
        lines.append(f"- Input bands: {count}")
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


def write_model_card(model: Any, output_dir: str, adapter_name: str = "default", repo_id: Optional[str] = None) -> None:
    """Put the SpectralMoE section into ``output_dir/README.md`` (after peft has written its part).

    peft writes the card before the weights, in the same ``save_pretrained``: a problem with the card must never cost
    the weights, so it becomes a warning and the card keeps peft's part only.
    """
    try:
        record_hub_ids(model)
        _write_model_card(model, output_dir, adapter_name, repo_id)
    except Exception as error:  # noqa: BLE001 (any failure here would stop the weights from being saved)
        warnings.warn(
            f"spectralmoe-peft could not write its section of the model card ({type(error).__name__}: {error}); "
            "the adapter's weights and config are saved regardless. Check set_model_card_info(...).",
            RuntimeWarning,
            stacklevel=2,
        )


def _write_model_card(model: Any, output_dir: str, adapter_name: str, repo_id: Optional[str]) -> None:
    from huggingface_hub import ModelCard

    path = os.path.join(output_dir, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard("")
    text = card.text
    if START in text and END in text:
        text = text[: text.index(START)] + text[text.index(END) + len(END):]
    if "[More Information Needed]" in text:  # huggingface_hub's empty template: keep only peft's version block
        text = text[text.index("### Framework versions"):] if "### Framework versions" in text else ""
    card.text = model_card_section(model, adapter_name, repo_id) + "\n\n" + text.strip() + "\n"
    base = _base_model_name(model, model.peft_config[adapter_name])
    # peft names the base by its _name_or_path, a local path too: keep only a Hub id
    tags = {t for t in (card.data.get("tags") or []) if not t.startswith("base_model:")} | set(TAGS)
    card.data.pop("base_model", None)
    if base:
        card.data["base_model"] = base
        tags.add(f"base_model:adapter:{base}")
    card.data["tags"] = sorted(tags)
    card.data["library_name"] = "peft"
    card.save(path)
