"""Importing the package registers the method with peft, idempotently."""

from __future__ import annotations

import importlib
import subprocess
import sys

from peft import PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import spectralmoe_peft
from spectralmoe_peft import registration


def test_peft_type_is_a_real_enum_member():
    member = PeftType.SPECTRALMOE
    assert member is PeftType("SPECTRALMOE") is PeftType["SPECTRALMOE"]
    assert member in list(PeftType) and member == "SPECTRALMOE" and member.name == "SPECTRALMOE"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is spectralmoe_peft.SpectralMoEConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is spectralmoe_peft.SpectralMoEModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "spectralmoe_"


def test_reimport_and_reload_are_safe():
    members_before = len(list(PeftType))
    assert registration.extend_peft_type() is PeftType.SPECTRALMOE
    importlib.reload(registration)
    reloaded = importlib.reload(spectralmoe_peft)
    assert len(list(PeftType)) == members_before
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SPECTRALMOE] is reloaded.SpectralMoEConfig


def test_registration_in_a_fresh_process():
    code = (
        "import spectralmoe_peft, spectralmoe_peft as again\n"
        "from peft import PeftType, get_peft_model\n"
        "assert PeftType.SPECTRALMOE in list(PeftType)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
