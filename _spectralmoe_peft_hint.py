"""Started by spectralmoe_peft_hint.pth at interpreter start: standard library only, and nearly free.

It waits for ``peft.mapping`` to be imported and gives peft's method registry a helpful error for SPECTRALMOE
adapters loaded without ``import spectralmoe_peft`` (instead of a bare ``KeyError: 'SPECTRALMOE'``). It registers
nothing and changes nothing else; set SPECTRALMOE_PEFT_NO_HINT=1 to turn it off.
"""

import importlib.abc
import importlib.machinery
import os
import sys

HINT = (
    "peft does not know the PEFT type 'SPECTRALMOE': this adapter was made with the spectralmoe-peft package. "
    "Run `import spectralmoe_peft` before loading it (importing registers the method with peft)."
)


class SpectralMoENotImportedError(KeyError):
    def __str__(self) -> str:
        return HINT


class _HintingDict(dict):
    def __missing__(self, key):
        if str(getattr(key, "value", key)) == "SPECTRALMOE":
            raise SpectralMoENotImportedError(key)
        raise KeyError(key)


class _PeftMappingWatcher(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "peft.mapping":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            module.PEFT_TYPE_TO_CONFIG_MAPPING = _HintingDict(module.PEFT_TYPE_TO_CONFIG_MAPPING)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if os.environ.get("SPECTRALMOE_PEFT_NO_HINT") or "peft.mapping" in sys.modules:
        return
    if not any(isinstance(finder, _PeftMappingWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PeftMappingWatcher())


install()
