"""Run by spectralmoe_peft_hint.pth at every interpreter start, so it must cost next to nothing: it imports only
``os`` and ``sys`` (which ``site`` has already imported) and defines two small classes.

Lazy registration: a meta-path finder waits for ``peft.mapping`` to be imported (it compares one module name per
import until then, and removes itself afterwards) and gives peft's method registry, ``PEFT_TYPE_TO_CONFIG_MAPPING``,
a fallback for the key SPECTRALMOE. The first time peft looks up a SpectralMoE adapter (``PeftModel.from_pretrained``,
``PeftConfig.from_pretrained``, ``AutoPeftModel``, ``load_adapter``, transformers' ``load_adapter``) the fallback
imports ``spectralmoe_peft``, which registers the method, and the lookup goes on as if it had been imported first.
Nothing else changes, and ``import peft`` alone imports nothing of this package.

SPECTRALMOE_PEFT_NO_AUTOLOAD=1 turns it off (then ``import spectralmoe_peft`` before loading, as with any
out-of-tree method); SPECTRALMOE_PEFT_NO_HINT=1, the old name, does the same.
"""

import os
import sys

ENV_OFF = ("SPECTRALMOE_PEFT_NO_AUTOLOAD", "SPECTRALMOE_PEFT_NO_HINT")
HINT = (
    "peft does not know the PEFT type 'SPECTRALMOE': this adapter was made with the spectralmoe-peft package. "
    "`pip install spectralmoe-peft`, then `import spectralmoe_peft` before loading it (importing registers the "
    "method with peft)."
)


class SpectralMoENotImportedError(KeyError):
    def __str__(self) -> str:
        return HINT


class _LazyRegistry(dict):
    """peft's PEFT_TYPE_TO_CONFIG_MAPPING, that registers SpectralMoE on the first lookup of its key."""

    def __missing__(self, key):
        if str(getattr(key, "value", key)) != "SPECTRALMOE":
            raise KeyError(key)
        try:
            import spectralmoe_peft  # noqa: F401  (registers the method, into this very dict)
        except ImportError as error:  # the package is gone but this hook stayed behind
            raise SpectralMoENotImportedError(key) from error
        if not dict.__contains__(self, key):
            raise SpectralMoENotImportedError(key)
        return dict.__getitem__(self, key)


class _PeftMappingWatcher:
    """A meta-path finder (duck-typed: subclassing importlib.abc.MetaPathFinder would import ~30 ms of modules at
    every start) that wraps the loading of ``peft.mapping`` and leaves ``sys.meta_path`` once it has."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft.mapping":
            return None
        spec = None
        for finder in sys.meta_path:  # the finders that would have found it without this one
            if isinstance(finder, _PeftMappingWatcher) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            if not isinstance(module.PEFT_TYPE_TO_CONFIG_MAPPING, _LazyRegistry):
                module.PEFT_TYPE_TO_CONFIG_MAPPING = _LazyRegistry(module.PEFT_TYPE_TO_CONFIG_MAPPING)
            uninstall()

        loader.exec_module = exec_module
        return spec

    def invalidate_caches(self) -> None:
        pass


def uninstall() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _PeftMappingWatcher)]


def install() -> None:
    if any(os.environ.get(name) for name in ENV_OFF) or "peft.mapping" in sys.modules:
        return
    if not any(isinstance(finder, _PeftMappingWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PeftMappingWatcher())


install()
