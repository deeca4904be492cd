"""The one place that touches peft's registry.

peft keeps its methods in a closed ``str`` enum (``PeftType``) plus a few dicts keyed by it. An out-of-tree method
has to add itself to both; this module does so with the standard library only, idempotently (importing twice, or
``importlib.reload``, must not fail or register two different enum members).
"""

from __future__ import annotations

from typing import Optional

from peft.utils import PeftType

METHOD_NAME = "spectralmoe"
PEFT_TYPE_NAME = "SPECTRALMOE"
PREFIX = "spectralmoe_"

IMPORT_HINT = (
    "This adapter was made with the `spectralmoe-peft` package: `pip install spectralmoe-peft` and "
    "`import spectralmoe_peft` before loading it (importing registers the SPECTRALMOE method with peft)."
)


def extend_peft_type() -> PeftType:
    """Add ``PeftType.SPECTRALMOE`` (once) and return it."""
    existing = PeftType.__members__.get(PEFT_TYPE_NAME)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    add_member = getattr(PeftType, "_add_member_", None)  # Python >= 3.13 keeps members through this hook
    if add_member is not None:
        add_member(PEFT_TYPE_NAME, member)
    else:
        PeftType._member_map_[PEFT_TYPE_NAME] = member
        PeftType._member_names_.append(PEFT_TYPE_NAME)
        type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    return member


SPECTRALMOE = extend_peft_type()


def _only_this_adapter(state_dict: dict, adapter_name: str) -> dict:
    """Drop other adapters' SpectralMoE tensors: keys read ``...spectralmoe_<name>.<adapter>[.<param>]``."""
    kept = {}
    for key, value in state_dict.items():
        head, sep, tail = key.rpartition(PREFIX)
        if sep and tail.count(".") >= 1 and tail.split(".")[1] != adapter_name:
            continue
        kept[key] = value
    return kept


def _fix_old_peft_saving() -> None:
    """peft < 0.20 gives, for out-of-tree methods, every adapter's tensors as each adapter's state dict (in the files
    PeftModel saves and in what get_peft_model_state_dict returns on a bare model): filter them, wherever peft's
    modules expose that function (peft_model, utils, the package, functional)."""
    import importlib

    import peft
    import peft.utils.save_and_load as save_and_load
    from packaging.version import Version

    if Version(peft.__version__) >= Version("0.20") or getattr(save_and_load.get_peft_model_state_dict, "_smoe", 0):
        return
    original = save_and_load.get_peft_model_state_dict

    def get_peft_model_state_dict(model, state_dict=None, adapter_name="default", *args, **kwargs):
        if model.peft_config[adapter_name].peft_type == SPECTRALMOE:
            state_dict = _only_this_adapter(model.state_dict() if state_dict is None else state_dict, adapter_name)
        return original(model, state_dict, adapter_name, *args, **kwargs)

    get_peft_model_state_dict._smoe = 1
    for name in ("peft.utils.save_and_load", "peft.utils", "peft", "peft.peft_model", "peft.functional"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "get_peft_model_state_dict", None) is original:
            module.get_peft_model_state_dict = get_peft_model_state_dict


def _extend_model_card() -> None:
    """After peft writes its card (every save_pretrained / push_to_hub), add the SpectralMoE section."""
    from peft import PeftModel

    if getattr(PeftModel.create_or_update_model_card, "_smoe", 0):
        return
    original = PeftModel.create_or_update_model_card

    def create_or_update_model_card(self, output_dir: str, repo_id: Optional[str] = None):
        original(self, output_dir)
        name = getattr(self, "active_adapter", "default")
        config = self.peft_config.get(name)
        if config is not None and config.peft_type == SPECTRALMOE:
            from .hub import write_model_card

            write_model_card(self, output_dir, name, repo_id=repo_id)

    create_or_update_model_card._smoe = 1
    PeftModel.create_or_update_model_card = create_or_update_model_card


def _keep_model_card_on_push() -> None:
    """transformers' ``push_to_hub`` saves the folder, then overwrites its README.md with the Hub repo's card (or an
    empty template): write the SpectralMoE card into it again just before the upload, so it reaches the Hub, with
    the repo id in its load recipes."""
    from peft import PeftModel

    if getattr(PeftModel._upload_modified_files, "_smoe", 0):
        return
    original = PeftModel._upload_modified_files

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        config = self.peft_config.get(getattr(self, "active_adapter", "default"))
        if config is not None and config.peft_type == SPECTRALMOE:
            repo_id = kwargs.get("repo_id", args[0] if args else None)
            self.create_or_update_model_card(working_dir, repo_id=repo_id if isinstance(repo_id, str) else None)
        return original(self, working_dir, *args, **kwargs)

    _upload_modified_files._smoe = 1
    PeftModel._upload_modified_files = _upload_modified_files


def register(config_cls: type, model_cls: type) -> None:
    """Register config, tuner and prefix with peft; on re-import, point the registry at the new classes."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    _fix_old_peft_saving()
    _extend_model_card()
    _keep_model_card_on_push()
    if SPECTRALMOE in PEFT_TYPE_TO_CONFIG_MAPPING:
        PEFT_TYPE_TO_CONFIG_MAPPING[SPECTRALMOE] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[SPECTRALMOE] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[SPECTRALMOE] = PREFIX
        return
    register_peft_method(name=METHOD_NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
