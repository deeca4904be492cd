"""Check spectralmoe-peft across peft versions: each version saves an adapter, every version loads every adapter
(into a PeftModel, and into a bare model with inject_adapter_in_model + set_peft_model_state_dict).

    python scripts/version_matrix.py                  # peft 0.18.1, 0.20.0 and the installed one (newest)
    python scripts/version_matrix.py --tests          # also run the test suite under each version
    python scripts/version_matrix.py --versions 0.18.1 0.21.2

Each peft version is installed with ``pip install --no-deps --target .matrix/peft-<v>`` and put first on
PYTHONPATH, so one environment (torch, transformers, this package) serves all of them. Prints a table and writes
``.matrix/version_matrix.json``. Exit status 1 if any cell fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATRIX = ROOT / ".matrix"
DEFAULT_VERSIONS = ("0.18.1", "0.20.0")

SAVE = textwrap.dedent("""
    import sys, torch, transformers as tf, peft, spectralmoe_peft
    from peft import get_peft_model
    torch.manual_seed(0)
    base = tf.Dinov2Model(tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, image_size=32, patch_size=8)).eval()
    config = spectralmoe_peft.SpectralMoEConfig(num_experts=3, num_tokens=5, expert_rank=4, use_depth=False,
                                                init_weights=False)
    model = get_peft_model(base, config).eval()
    model.add_adapter("other", spectralmoe_peft.SpectralMoEConfig(num_experts=2, num_tokens=4, expert_rank=2,
                                                                  use_depth=False, init_weights=False))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(pixel_values=x).last_hidden_state
    model.save_pretrained(sys.argv[1])
    torch.save({"x": x, "out": out}, sys.argv[1] + "/expected.pt")
    print(peft.__version__)
""")

LOAD = textwrap.dedent("""
    import sys, torch, transformers as tf, spectralmoe_peft
    from peft import PeftModel
    torch.manual_seed(0)
    base = tf.Dinov2Model(tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, image_size=32, patch_size=8)).eval()
    model = PeftModel.from_pretrained(base, sys.argv[1]).eval()
    model.load_adapter(sys.argv[1] + "/other", adapter_name="other")
    expected = torch.load(sys.argv[1] + "/expected.pt")
    with torch.no_grad():
        out = model(pixel_values=expected["x"]).last_hidden_state
    assert torch.equal(out, expected["out"]), float((out - expected["out"]).abs().max())
    # the same adapters without a PeftModel: peft's inject_adapter_in_model + set_peft_model_state_dict
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.functional import set_adapter
    from safetensors.torch import load_file
    torch.manual_seed(0)
    bare = tf.Dinov2Model(tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, image_size=32, patch_size=8)).eval()
    for name, folder in (("default", sys.argv[1]), ("other", sys.argv[1] + "/other")):
        inject_adapter_in_model(PeftConfig.from_pretrained(folder), bare, adapter_name=name)
        set_peft_model_state_dict(bare, load_file(folder + "/adapter_model.safetensors"), adapter_name=name)
    set_adapter(bare.eval(), "default")
    with torch.no_grad():
        out = bare(pixel_values=expected["x"]).last_hidden_state
    assert torch.equal(out, expected["out"]), ("bare", float((out - expected["out"]).abs().max()))
""")


def installed_peft() -> str:
    import peft

    return peft.__version__


def overlay(version: str) -> dict:
    """Environment running with peft==version first on the path (the installed one needs no overlay)."""
    env = dict(os.environ)
    if version != installed_peft():
        target = MATRIX / f"peft-{version}"
        if not (target / "peft").is_dir():
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                            f"peft=={version}"], check=True)
        env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")])
    return env


def run(code: str, version: str, *args: str) -> tuple[bool, str]:
    result = subprocess.run([sys.executable, "-c", code, *args], env=overlay(version), capture_output=True, text=True)
    lines = (result.stdout + result.stderr).strip().splitlines()
    return result.returncode == 0, lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", nargs="+", default=[*DEFAULT_VERSIONS, installed_peft()])
    parser.add_argument("--tests", action="store_true", help="also run the test suite under each version")
    args = parser.parse_args(argv)
    versions = list(dict.fromkeys(args.versions))
    report = {"versions": versions, "save": {}, "load": {}, "tests": {}}
    for version in versions:
        ok, line = run(SAVE, version, str(MATRIX / "adapters" / version))
        report["save"][version] = ok
        print(f"save with peft {version}: {'ok' if ok else 'FAILED ' + line}")
    for saved in versions:
        for loader in versions:
            ok, line = run(LOAD, loader, str(MATRIX / "adapters" / saved)) if report["save"][saved] else (False, "")
            report["load"][f"{saved}->{loader}"] = ok
    if args.tests:
        for version in versions:
            command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(ROOT / "tests")]
            if version != installed_peft():  # building the wheel needs the real install, not an overlay
                command += ["--deselect", "tests/test_registration.py::test_the_hint_ships_as_a_pth_file_in_the_wheel"]
            result = subprocess.run(command, env=overlay(version), capture_output=True, text=True, cwd=ROOT)
            summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-300:]
            report["tests"][version] = {"ok": result.returncode == 0, "summary": summary}
            print(f"tests with peft {version}: {summary}")
    width = max(len(v) for v in versions) + 2
    print("\nadapter saved with (rows) loaded with (columns): identical outputs")
    print(" " * width + "".join(f"{v:>{width}}" for v in versions))
    for saved in versions:
        cells = "".join(f"{('ok' if report['load'][f'{saved}->{loader}'] else 'FAIL'):>{width}}" for loader in versions)
        print(f"{saved:<{width}}{cells}")
    MATRIX.mkdir(exist_ok=True)
    (MATRIX / "version_matrix.json").write_text(json.dumps(report, indent=2))
    failed = not all(report["save"].values()) or not all(report["load"].values()) or \
        not all(t["ok"] for t in report["tests"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
