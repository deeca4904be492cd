"""Adapters already saved keep loading: tiny adapters saved by spectralmoe-peft 0.1.0 (tests/fixtures/adapters_0_1_0,
made by tests/fixtures/make_adapters_0_1_0.py, never regenerated) load onto freshly built bases and reproduce the
outputs stored with them.

If the saved layout changes (key names, config fields), these adapters must be converted on load: a failure here is
a break of every adapter users have saved, not a fixture to refresh.

Tolerance: outputs are compared to 1e-6 (times max(1, |expected|)), not bitwise. On the machine and torch build that
made them they match bitwise (0.0 difference, with 1 and 2 threads), but the stored outputs are one CPU's arithmetic:
another CPU's matmul kernels (AVX2 vs AVX-512, other blocking) may round the last bit differently. Hidden states are
O(1) and logits O(6), where fp32's spacing is ~1e-7 and ~5e-7, so the bound allows a few ulps of kernel rounding and
nothing else: every adapter here moves its output by 0.3 to 6 (at least 1e-2 is checked below), so a tensor lost,
renamed onto the wrong module, transposed or defaulted on load cannot hide under it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import make_depth_model, make_model

ROOT = Path(__file__).parent / "fixtures" / "adapters_0_1_0"
MANIFEST = json.loads((ROOT / "cases.json").read_text())
CASES = MANIFEST["cases"]
ATOL = 1e-6
MIN_ADAPTER_EFFECT = 1e-2


from fixtures.make_adapters_0_1_0 import outputs  # noqa: E402  (what was stored is what is compared)


def assert_matches(actual: dict[str, torch.Tensor], stored: dict[str, torch.Tensor], prefix: str, what: str) -> None:
    expected = {key[len(prefix):]: value for key, value in stored.items() if key.startswith(prefix)}
    assert expected and set(actual) == set(expected), (what, sorted(actual), sorted(expected))
    for key, value in expected.items():
        assert actual[key].shape == value.shape, (what, key, actual[key].shape, value.shape)
        diff = ((actual[key] - value).abs() / value.abs().clamp_min(1.0)).max().item()
        assert diff <= ATOL, f"{what}: {key} differs by {diff:.3g} (relative to max(1, |expected|))"


def test_fixtures_are_those_of_0_1_0_and_small():
    assert MANIFEST["spectralmoe_peft"] == "0.1.0"
    assert set(CASES) == {p.name for p in ROOT.iterdir() if p.is_dir()}
    for name in CASES:
        saved = json.loads((ROOT / name / "adapter_config.json").read_text())
        assert saved["peft_type"] == "SPECTRALMOE" and saved["init_weights"] is False
        assert (ROOT / name / "adapter_model.safetensors").exists() and (ROOT / name / "README.md").exists()
    assert sum(f.stat().st_size for f in ROOT.rglob("*") if f.is_file()) < 300_000


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapter_saved_by_0_1_0_reproduces_its_outputs(name, one_thread):
    case, folder = CASES[name], ROOT / name
    stored = load_file(folder / "io.safetensors")
    x = stored["input"]
    assert tuple(x.shape) == tuple(case["input_shape"])
    base = make_model(case["family"], seed=MANIFEST["seeds"]["base"])
    # first the base alone: a failure here means tests/tiny_models.py (or transformers' init) changed, not loading
    assert_matches(outputs(base, x), stored, "base_", f"{name}: the freshly built base")

    model = PeftModel.from_pretrained(base, folder).eval()
    if "depth_model" in case:
        model.set_depth_model(make_depth_model(**case["depth_model"]))
    adapters = ["default"]
    if "second_config" in case:
        model.load_adapter(folder / "second", adapter_name="second")
        adapters.append("second")
    for adapter in adapters:
        model.set_adapter(adapter)
        assert_matches(outputs(model, x), stored, f"{adapter}_", f"{name}: adapter {adapter!r}")
        effect = (stored[f"{adapter}_last_hidden_state"] - stored["base_last_hidden_state"]).abs().max().item()
        assert effect > MIN_ADAPTER_EFFECT, f"{name}/{adapter} barely changes the output: the check would be weak"
    if "default_logits" in stored:  # the saved head, not the base's, makes the logits
        assert (stored["default_logits"] - stored["base_logits"]).abs().max() > MIN_ADAPTER_EFFECT
    with model.disable_adapter():  # loading left the base itself untouched
        assert_matches(outputs(model, x), stored, "base_", f"{name}: adapters disabled")


def test_a_0_1_0_router_without_noise_loads_without_its_unused_noise_weights(tmp_path):
    """0.1.0 stored noise weights even for noisy_gating=False (unused: they stopped plain DDP) and s as a 0-d tensor;
    such a file loads, the noise weights are dropped and s reshaped, with the outputs of the adapter as saved."""
    from peft import get_peft_model
    from safetensors.torch import save_file

    from spectralmoe_peft import SpectralMoEConfig

    config = SpectralMoEConfig(num_experts=3, num_tokens=4, expert_rank=2, use_depth=False, noisy_gating=False,
                               init_weights=False, scale_init=0.5)
    model = get_peft_model(make_model(), config).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert not any("_noise" in key for key in weights)  # created only for noisy routers
    old = dict(weights)
    for key in [k for k in weights if k.endswith("spectralmoe_gate_visual")]:
        old[key + "_noise"] = torch.randn(32, 3)  # what 0.1.0 wrote next to each gate
    old["base_model.spectralmoe_scale"] = old.pop("base_model.model.spectralmoe.spectralmoe_scale").reshape(())  # 0.1.0: 0-d, on the tuner
    save_file(old, tmp_path / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(make_model(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).last_hidden_state, expected, rtol=0, atol=0)
    assert not any("_noise" in name for name, _ in loaded.named_parameters())
