"""The one place that touches peft's registry.

peft keeps its methods in a closed ``str`` enum (``PeftType``) plus a few dicts keyed by it. An out-of-tree method
has to add itself to both; this module does so with the standard library only, idempotently (importing twice, or
``importlib.reload``, must not fail or register two different enum members).
"""

from __future__ import annotations

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


def register(config_cls: type, model_cls: type) -> None:
    """Register config, tuner and prefix with peft; on re-import, point the registry at the new classes."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    if SPECTRALMOE in PEFT_TYPE_TO_CONFIG_MAPPING:
        PEFT_TYPE_TO_CONFIG_MAPPING[SPECTRALMOE] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[SPECTRALMOE] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[SPECTRALMOE] = PREFIX
        return
    register_peft_method(name=METHOD_NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
