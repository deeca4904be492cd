"""Importing the package registers the method with peft, idempotently."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[1]


def _python_with_the_pth(tmp_path, code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose start-up processes this checkout's spectralmoe_peft_hint.pth, as
    ``site`` does for an installed package, and no other .pth (the environment may hold an older installed copy)."""
    site_dir = tmp_path / "site"
    site_dir.mkdir(exist_ok=True)
    shutil.copy(ROOT / "spectralmoe_peft_hint.pth", site_dir)
    prelude = (
        "import sys, os\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        f"sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
        "import site\n"
        f"site.addsitedir({str(site_dir)!r})\n"
    )
    environment = {key: value for key, value in os.environ.items() if not key.startswith("SPECTRALMOE_PEFT_NO_")}
    return subprocess.run([sys.executable, "-S", "-c", prelude + code], capture_output=True, text=True, timeout=300,
                          env={**environment, **env}, cwd=tmp_path)


def _save_adapter(tmp_path) -> Path:
    """An adapter and the features it gives, saved for a process that never imports spectralmoe_peft."""
    import spectralmoe_peft as smoe
    import torch
    from peft import get_peft_model
    from tiny_models import make_model

    config = smoe.SpectralMoEConfig(use_depth=False, num_tokens=4, init_weights=False, scale_init=0.5)
    model = get_peft_model(make_model(), config).eval()
    path = tmp_path / "adapter"
    model.save_pretrained(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.save({"x": x, "expected": model(pixel_values=x).last_hidden_state}, path / "check.pt")
    return path


def test_loading_after_install_needs_no_import(tmp_path):
    """The .pth registers lazily: `import peft` alone imports nothing of this package; the first SpectralMoE lookup
    imports it, and the adapter loads and computes exactly what it did when saved."""
    path = _save_adapter(tmp_path)
    code = f"""
import peft
assert 'spectralmoe_peft' not in sys.modules, 'import peft must not import spectralmoe_peft'
assert not any(type(f).__name__ == '_PeftMappingWatcher' for f in sys.meta_path), 'the watcher must leave'
registry = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING
assert type(registry).__name__ == '_LazyRegistry'
import peft.peft_model, peft.mapping_func, peft.utils.hotswap
holders = [name for name, module in list(sys.modules.items())  # every binding of the registry is the lazy one
           if name.startswith('peft') and module and 'PEFT_TYPE_TO_CONFIG_MAPPING' in vars(module)]
assert {{'peft', 'peft.mapping', 'peft.peft_model', 'peft.mapping_func', 'peft.utils.hotswap'}} <= set(holders), holders
for name in holders:
    assert vars(sys.modules[name])['PEFT_TYPE_TO_CONFIG_MAPPING'] is registry, name
import torch
from peft import PeftConfig, PeftModel
from tiny_models import make_model
config = PeftConfig.from_pretrained({str(path)!r})
assert type(config).__name__ == 'SpectralMoEConfig' and 'spectralmoe_peft' in sys.modules
assert sys.modules['spectralmoe_peft'].__file__.startswith({str(ROOT)!r})
model = PeftModel.from_pretrained(make_model(), {str(path)!r}).eval()
check = torch.load({str(path / 'check.pt')!r})
with torch.no_grad():
    assert torch.equal(model(pixel_values=check['x']).last_hidden_state, check['expected'])
print('loaded')
"""
    result = _python_with_the_pth(tmp_path, code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("loaded")


def test_the_autoload_can_be_turned_off(tmp_path):
    path = _save_adapter(tmp_path)
    code = f"""
import peft
assert type(peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING) is dict
from peft import PeftModel
from tiny_models import make_model
PeftModel.from_pretrained(make_model(), {str(path)!r})
"""
    for variable in ("SPECTRALMOE_PEFT_NO_AUTOLOAD", "SPECTRALMOE_PEFT_NO_HINT"):
        result = _python_with_the_pth(tmp_path, code, **{variable: "1"})
        assert result.returncode != 0
        assert result.stderr.strip().splitlines()[-1] == "KeyError: 'SPECTRALMOE'", result.stderr[-2000:]


def test_without_the_package_loading_says_to_install_and_import_it(tmp_path):
    """The .pth left behind while the package cannot be imported: a clear message, not a bare KeyError."""
    path = _save_adapter(tmp_path)
    code = f"""
sys.modules['spectralmoe_peft'] = None  # makes `import spectralmoe_peft` fail
from peft import PeftModel
from tiny_models import make_model
PeftModel.from_pretrained(make_model(), {str(path)!r})
"""
    result = _python_with_the_pth(tmp_path, code)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert "SpectralMoENotImportedError" in last_line and "import spectralmoe_peft" in last_line


def test_the_start_up_hook_imports_nothing():
    """What every Python start in the environment pays: the hint module itself, no other import (the old hint's
    importlib.abc cost about 32 ms). os and sys are already imported when site runs .pth files."""
    code = (
        "import sys, os\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "before = set(sys.modules)\n"
        "import _spectralmoe_peft_hint\n"
        "print(sorted(set(sys.modules) - before))\n"
        "print([type(f).__name__ for f in sys.meta_path][0])\n"
    )
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if not k.startswith("SPECTRALMOE_PEFT_NO_")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["['_spectralmoe_peft_hint']", "_PeftMappingWatcher"]


def test_the_hint_ships_as_a_pth_file_in_the_wheel(tmp_path):
    """The .pth is what activates the hint in a process that never imports the package."""
    import zipfile

    root = ROOT
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
