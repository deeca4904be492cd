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


def _load_without_import(tmp_path, activate_hint: bool) -> subprocess.CompletedProcess:
    """Save an adapter, then load it in a process that never imports spectralmoe_peft."""
    import spectralmoe_peft as smoe
    from peft import get_peft_model
    from tiny_models import make_model

    get_peft_model(make_model(), smoe.SpectralMoEConfig(use_depth=False, num_tokens=4)).save_pretrained(tmp_path)
    code = (
        ("import _spectralmoe_peft_hint\n" if activate_hint else "")
        + "import sys\n"
        + f"sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})\n"
        + "from peft import PeftModel\n"
        + "from tiny_models import make_model\n"
        + "assert 'spectralmoe_peft' not in sys.modules\n"
        + f"PeftModel.from_pretrained(make_model(), {str(tmp_path)!r})\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_loading_without_import_says_to_import_the_package(tmp_path):
    result = _load_without_import(tmp_path, activate_hint=True)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert "SpectralMoENotImportedError" in last_line and "import spectralmoe_peft" in last_line


def test_the_hint_ships_as_a_pth_file_in_the_wheel(tmp_path):
    """The .pth is what activates the hint in a process that never imports the package."""
    import zipfile

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(root)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("spectralmoe_peft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "spectralmoe_peft_hint.pth" in names and "_spectralmoe_peft_hint.py" in names
    pth = zipfile.ZipFile(wheel).read("spectralmoe_peft_hint.pth").decode().strip()
    assert pth == "import _spectralmoe_peft_hint"
