"""transformers' own adapter API (PeftAdapterMixin: add_adapter, load_adapter, set/disable/enable/delete) and peft's
low-level API (inject_adapter_in_model, set/get_peft_model_state_dict, peft.functional) on SpectralMoE: peft's
generic checks that apply to vision models, on tiny models. The shared modules (W_t2f, W_delta, s) live in the model
(``model.spectralmoe``), so these work without a PeftModel around, with one copy of each per adapter.

transformers 5.24 gates every PeftAdapterMixin method but ``load_adapter`` behind peft >= 0.22 (newer than the
newest release when this was written), for LoRA as for every method. ``test_transformers_gate_refuses_every_method``
records that; the tests marked ``lifted_gate`` run those methods with the gate lowered to the installed peft, i.e.
they check what the methods do once a peft that passes the gate is installed.
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import weakref

import peft
import pytest
import torch
import transformers.integrations.peft as tf_peft
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peft.functional import delete_adapter, set_adapter, set_requires_grad
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from tiny_models import main_output, make_depth_model, make_model

from spectralmoe_peft import SpectralMoELayer
from spectralmoe_peft.shared import SpectralMoEShared
from test_peft_battery import config, x_for  # noqa: E402  (one small config and input for both suites)

FAMILIES = ["dinov2", "dinov3", "vit_classifier", "upernet_dinov2"]
SHARED = ("spectralmoe_token_to_feature", "spectralmoe_delta", "spectralmoe_scale")


def out(model, family, **kwargs):
    with torch.no_grad():
        return main_output(model(pixel_values=x_for(family), **kwargs))


def trained_peft_model(family, tmp_path=None, name="default", **overrides):
    """A PeftModel whose adapter is far from identity (init_weights=False), saved to tmp_path when given."""
    model = get_peft_model(make_model(family), config(**overrides), adapter_name=name).eval()
    if tmp_path is not None:
        model.save_pretrained(tmp_path)
    return model


@pytest.fixture
def lifted_gate(monkeypatch):
    """Lower transformers' peft version gate to the installed peft (see the module docstring)."""
    monkeypatch.setattr(tf_peft, "MIN_PEFT_VERSION", peft.__version__)


def bare(state_dict: dict) -> dict:
    """A PeftModel's adapter state dict as a bare model's (peft >= 0.21 strips the prefix itself; earlier ones leave
    it to the caller, as transformers and diffusers do)."""
    return {k.removeprefix("base_model.model."): v for k, v in state_dict.items()}


# transformers 5.24's load_adapter imports peft.utils.transformers_weight_conversion (peft >= 0.20) for every method
needs_tf_loader = pytest.mark.skipif(
    importlib.util.find_spec("peft.utils.transformers_weight_conversion") is None,
    reason="transformers' load_adapter needs peft >= 0.20 for every method (LoRA included)",
)


def adapter_keys(model) -> set:
    return {k for k in model.state_dict() if "spectralmoe_" in k}


# --- peft's low-level API: inject_adapter_in_model and the state-dict functions ---------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_inject_adapter_in_model_and_state_dict_round_trip(family):
    """inject_adapter_in_model gives a working model (no tuner kept); set_peft_model_state_dict loads a PeftModel's
    adapter into it and the outputs are the PeftModel's, bit for bit; get_peft_model_state_dict gives it back."""
    reference = trained_peft_model(family)
    saved = get_peft_model_state_dict(reference)
    model = make_model(family)
    base = out(model, family)
    injected = inject_adapter_in_model(config(), model)
    assert injected is model and isinstance(model.spectralmoe, SpectralMoEShared)
    assert {k for k in saved if "spectralmoe." in k} == {  # one copy of each shared tensor
        "base_model.model.spectralmoe.spectralmoe_token_to_feature.weight",
        "base_model.model.spectralmoe.spectralmoe_token_to_feature.bias",
        "base_model.model.spectralmoe.spectralmoe_delta.weight",
        "base_model.model.spectralmoe.spectralmoe_delta.bias",
        "base_model.model.spectralmoe.spectralmoe_scale",
    }
    result = set_peft_model_state_dict(model, bare(saved))
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "spectralmoe_" in k]
    model.eval()
    assert torch.equal(out(model, family), out(reference, family))
    assert not torch.allclose(out(model, family), base)
    again = get_peft_model_state_dict(model)
    assert set(again) == {k.removeprefix("base_model.model.") for k in saved}
    assert all(torch.equal(again[k.removeprefix("base_model.model.")], v) for k, v in saved.items())


def test_injected_model_needs_no_tuner_and_shares_one_copy_across_blocks(monkeypatch):
    """The tuner inject_adapter_in_model builds is dropped (nothing in the model keeps it alive); every block reaches
    the same W_t2f, W_delta, s objects, which the model holds (and registers) once."""
    from spectralmoe_peft.model import SpectralMoEModel

    tuners = []
    original_init = SpectralMoEModel.__init__

    def recording_init(self, *args, **kwargs):
        tuners.append(weakref.ref(self))
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(SpectralMoEModel, "__init__", recording_init)
    model = make_model("dinov2")
    inject_adapter_in_model(config(), model)
    gc.collect()
    assert len(tuners) == 1 and tuners[0]() is None
    holders = [m for m in model.modules() if isinstance(m, SpectralMoEShared)]
    layers = [m for m in model.modules() if isinstance(m, SpectralMoELayer)]
    assert len(holders) == 1 and len(layers) == 2
    for layer in layers:
        assert layer._shared.token_to_feature is holders[0].spectralmoe_token_to_feature
        assert layer._shared.delta is holders[0].spectralmoe_delta
        assert layer._shared.scale is holders[0].spectralmoe_scale
    names = [n for n, _ in model.named_parameters() if "spectralmoe_delta" in n]
    assert names == ["spectralmoe.spectralmoe_delta.default.weight", "spectralmoe.spectralmoe_delta.default.bias"]
    model.eval()
    assert model.spectralmoe.get_aux_loss is not None and not torch.isnan(out(model, "dinov2")).any()


def test_a_change_of_a_shared_module_reaches_every_block():
    """W_delta is one module: perturbing it moves the refinement of both blocks (each block's hidden state)."""
    model = make_model("dinov2")
    inject_adapter_in_model(config(), model)
    model.eval()
    x = x_for("dinov2")
    with torch.no_grad():
        before = model(pixel_values=x, output_hidden_states=True).hidden_states
        model.spectralmoe.spectralmoe_delta["default"].bias.add_(1.0)
        after = model(pixel_values=x, output_hidden_states=True).hidden_states
    assert torch.equal(before[0], after[0])  # embeddings: no adapter there
    # block 1's output moves by s * 1 on every patch token (its own update), block 2 sees it too
    shift = after[1][:, 1:] - before[1][:, 1:]
    torch.testing.assert_close(shift, torch.full_like(shift, 0.5), rtol=0, atol=1e-5)
    assert not torch.allclose(after[2], before[2])


def test_inject_with_low_cpu_mem_usage_then_load():
    """peft's _test_load_model_low_cpu_mem_usage: adapter weights on meta, then loaded with assign=True."""
    reference = trained_peft_model("dinov2")
    model = make_model("dinov2")
    inject_adapter_in_model(config(), model, low_cpu_mem_usage=True)
    assert "meta" in {p.device.type for p in model.parameters()}
    set_peft_model_state_dict(model, bare(get_peft_model_state_dict(reference)), low_cpu_mem_usage=True)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert torch.equal(out(model.eval(), "dinov2"), out(reference, "dinov2"))


def test_inject_from_a_state_dict_alone():
    """inject_adapter_in_model(state_dict=...) places adapters by the checkpoint's keys (the holder is not a block)."""
    reference = trained_peft_model("dinov2")
    saved = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(reference).items()}
    model = make_model("dinov2")
    inject_adapter_in_model(config(), model, state_dict=saved)
    set_peft_model_state_dict(model, saved)
    assert torch.equal(out(model.eval(), "dinov2"), out(reference, "dinov2"))
    assert not isinstance(model.spectralmoe, SpectralMoELayer)


def test_functional_set_delete_and_requires_grad_with_two_adapters():
    """peft.functional (what transformers and diffusers use) on two injected adapters: switching, trainability and
    deletion reach the shared modules too."""
    one, two = trained_peft_model("dinov2", name="one"), trained_peft_model("dinov2", name="two")
    model = make_model("dinov2")
    base = out(model, "dinov2")
    for name, reference in (("one", one), ("two", two)):
        inject_adapter_in_model(config(), model, adapter_name=name)
        set_peft_model_state_dict(model, bare(get_peft_model_state_dict(reference, adapter_name=name)),
                                  adapter_name=name)
    model.eval()
    for name, reference in (("one", one), ("two", two)):
        set_adapter(model, name)
        assert model.spectralmoe.active_adapters == [name]
        assert torch.equal(out(model, "dinov2"), out(reference, "dinov2"))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(f".{name}" in n for n in trainable)
        assert any(n.startswith("spectralmoe.spectralmoe_delta") for n in trainable)
    set_requires_grad(model, "two", requires_grad=False)
    assert not model.spectralmoe.spectralmoe_delta["two"].weight.requires_grad
    delete_adapter(model, "two", prefix="spectralmoe_")
    assert not [k for k in model.state_dict() if ".two" in k]
    assert model.spectralmoe.active_adapters == ["one"]
    assert torch.equal(out(model, "dinov2"), out(one, "dinov2"))
    delete_adapter(model, "one", prefix="spectralmoe_")
    assert not adapter_keys(model)
    assert torch.equal(out(model, "dinov2"), base)  # no adapter left: the base's outputs


def test_each_injected_adapter_state_dict_holds_only_its_own_tensors():
    """Two adapters on a bare model: get_peft_model_state_dict gives each its own tensors only (peft < 0.20 gave every
    adapter's; registration.py filters), and each loads alone into a fresh model with its outputs."""
    model = make_model("dinov2")
    inject_adapter_in_model(config(num_experts=2), model, adapter_name="one")
    inject_adapter_in_model(config(num_experts=4), model, adapter_name="two")
    model.eval()
    for name, experts in (("one", 2), ("two", 4)):
        state = get_peft_model_state_dict(model, adapter_name=name)
        assert len(state) == 2 * 4 + 5  # per block A, B, gate, noise; W_t2f and W_delta (weight, bias), s
        assert state["encoder.layer.0.spectralmoe_A"].shape[0] == experts
        set_adapter(model, name)
        fresh = make_model("dinov2")
        inject_adapter_in_model(config(num_experts=experts), fresh)
        set_peft_model_state_dict(fresh, state)
        assert torch.equal(out(fresh.eval(), "dinov2"), out(model, "dinov2"))


def test_training_an_injected_adapter_updates_only_adapter_tensors():
    model = make_model("dinov2")
    base_params = [(p, p.detach().clone()) for p in model.parameters()]
    inject_adapter_in_model(config(), model)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("spectralmoe_" in n for n in trainable)
    assert all(any(n.startswith(f"spectralmoe.{s}.default") for n in trainable) for s in SHARED)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(pixel_values=x_for("dinov2")).last_hidden_state.square().mean().backward()
    for name in trainable:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    optimizer.step()
    assert all(not p.requires_grad and torch.equal(p, before) for p, before in base_params)


def test_depth_stream_and_routing_without_a_tuner():
    """The per-forward machinery works with no PeftModel: the entry hooks live on the holder, which also attaches
    the depth model (here of another width, so a projection is made) and reports the last forward."""
    reference = get_peft_model(make_model("dinov2"), config(use_depth=True)).eval()
    reference.set_depth_model(make_depth_model())
    model = make_model("dinov2")
    inject_adapter_in_model(copy.deepcopy(reference.peft_config["default"]), model)
    model.spectralmoe.set_depth_model(make_depth_model())
    set_peft_model_state_dict(model, bare(get_peft_model_state_dict(reference)))
    model.eval()
    assert torch.equal(out(model, "dinov2"), out(reference, "dinov2"))
    assert set(model.spectralmoe.get_routing_stats()) == {0, 1}
    assert torch.equal(model.spectralmoe.get_aux_loss(), reference.get_aux_loss())


def test_deepcopy_of_an_injected_model_is_independent():
    model = make_model("dinov2")
    inject_adapter_in_model(config(), model)
    model.eval()
    clone = copy.deepcopy(model)
    expected = out(model, "dinov2")
    with torch.no_grad():
        clone.spectralmoe.spectralmoe_delta["default"].bias.add_(1.0)
    assert torch.equal(out(model, "dinov2"), expected)
    assert not torch.equal(out(clone, "dinov2"), expected)
    assert clone.spectralmoe.shared.owner is not model.spectralmoe.shared.owner


def test_adapters_saved_by_0_1_0_load_through_set_peft_model_state_dict():
    """0.1.0 kept the shared tensors on the tuner (base_model.spectralmoe_*): a bare model's load hook converts them."""
    from test_saved_adapters import CASES, MANIFEST, ROOT, assert_matches, outputs

    name = "dinov2_visual"
    folder, case = ROOT / name, CASES[name]
    stored = load_file(folder / "io.safetensors")
    model = make_model(case["family"], seed=MANIFEST["seeds"]["base"])
    inject_adapter_in_model(peft.PeftConfig.from_pretrained(folder), model)
    weights = load_file(folder / "adapter_model.safetensors")
    assert "base_model.spectralmoe_scale" in weights and weights["base_model.spectralmoe_scale"].ndim == 0
    set_peft_model_state_dict(model, bare(weights))  # the tuner-level keys stay: base_model.spectralmoe_*
    assert_matches(outputs(model.eval(), stored["input"]), stored, "default_", name)


# --- transformers' PeftAdapterMixin -------------------------------------------------------------------------------


@needs_tf_loader
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("is_trainable", [False, True])
def test_transformers_load_adapter(family, is_trainable, tmp_path):
    """model.load_adapter(path) (transformers' own, not gated) reproduces the PeftModel's outputs exactly."""
    reference = trained_peft_model(family, tmp_path)
    model = make_model(family)
    model.load_adapter(str(tmp_path), is_trainable=is_trainable)
    assert torch.equal(out(model.eval(), family), out(reference, family))
    adapter_params = {n: p for n, p in model.named_parameters() if "spectralmoe_" in n}
    assert all(p.requires_grad == is_trainable for p in adapter_params.values())
    assert any(n.startswith("spectralmoe.spectralmoe_scale") for n in adapter_params)


@needs_tf_loader
def test_transformers_load_adapter_twice_under_two_names(tmp_path):
    one = trained_peft_model("dinov2", tmp_path / "one")
    two = get_peft_model(make_model("dinov2"), config(num_experts=2, scale_init=0.25)).eval()
    two.save_pretrained(tmp_path / "two")
    model = make_model("dinov2")
    model.load_adapter(str(tmp_path / "one"), adapter_name="one")
    model.load_adapter(str(tmp_path / "two"), adapter_name="two")
    model.eval()
    set_adapter(model, "one")  # peft.functional: transformers' set_adapter is gated (see the module docstring)
    assert torch.equal(out(model, "dinov2"), out(one, "dinov2"))
    set_adapter(model, "two")
    assert torch.equal(out(model, "dinov2"), out(two, "dinov2"))
    with pytest.raises(ValueError, match="already exists"):
        model.load_adapter(str(tmp_path / "two"), adapter_name="two")


def test_transformers_gate_refuses_every_method():
    """transformers 5.24 refuses add_adapter for LoRA exactly as for SpectralMoE while the installed peft is older
    than its gate: the refusal is transformers', not this package's. (When a peft passing the gate is installed, this
    test skips and the lifted-gate tests below run the real thing.)"""
    from packaging.version import Version

    if Version(peft.__version__) >= Version(tf_peft.MIN_PEFT_VERSION):
        pytest.skip("the installed peft passes transformers' gate")
    for adapter_config in (LoraConfig(target_modules=["q_proj"]), config()):
        with pytest.raises(ValueError, match=f">= {tf_peft.MIN_PEFT_VERSION}"):
            make_model("dinov2").add_adapter(adapter_config)


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_add_set_disable_enable_delete(family, lifted_gate):
    """The journey of transformers' docs: add adapters, switch, disable, enable, delete; outputs checked against the
    base and against each other at every step."""
    model = make_model(family)
    base = out(model, family)
    model.add_adapter(config(init_weights=True), adapter_name="identity")
    assert torch.equal(out(model, family), base)  # peft's convention: a new adapter starts as the identity
    model.add_adapter(config(), adapter_name="far")
    model.eval()  # new adapter modules start in training mode (noisy routers), as peft's layers do
    assert model.active_adapters() == ["far"]  # add_adapter activates the new adapter
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".far" in n for n in trainable)
    far = out(model, family)
    assert not torch.allclose(far, base)
    model.set_adapter("identity")
    assert torch.equal(out(model, family), base)
    model.set_adapter("far")
    assert torch.equal(out(model, family), far)
    model.disable_adapters()
    assert torch.equal(out(model, family), base)
    model.enable_adapters()
    assert torch.equal(out(model, family), far)
    model.delete_adapter("far")
    assert not [k for k in model.state_dict() if ".far" in k]
    assert model.active_adapters() == ["identity"]
    model.delete_adapter("identity")
    assert not adapter_keys(model) and not hasattr(model, "peft_config")
    assert torch.equal(out(model, family), base)


@needs_tf_loader
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_save_then_load_everywhere(family, lifted_gate, tmp_path):
    """An adapter added and saved through transformers loads in peft (PeftModel.from_pretrained) and in transformers
    (load_adapter, get_adapter_state_dict + adapter_state_dict=) with the same outputs."""
    model = make_model(family)
    model.add_adapter(config())
    model.eval()
    expected = out(model, family)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == {f"base_model.model.{k}" for k in get_peft_model_state_dict(model)}  # peft's file format
    assert torch.equal(out(PeftModel.from_pretrained(make_model(family), tmp_path).eval(), family), expected)
    again = make_model(family)
    again.load_adapter(str(tmp_path))
    assert torch.equal(out(again.eval(), family), expected)
    third = make_model(family)
    third.load_adapter(adapter_state_dict=model.get_adapter_state_dict(), peft_config=copy.deepcopy(
        model.peft_config["default"]))
    assert torch.equal(out(third.eval(), family), expected)


def test_transformers_add_adapter_trains_the_shared_modules(lifted_gate):
    model = make_model("dinov2")
    model.add_adapter(config())
    model.train()
    model(pixel_values=x_for("dinov2")).last_hidden_state.square().mean().backward()
    for name in SHARED:
        grad = getattr(model.spectralmoe, name)["default"]
        grad = grad.grad if isinstance(grad, torch.nn.Parameter) else grad.weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_peft_model_unload_removes_the_holder():
    base = make_model("dinov2")
    keys = set(base.state_dict())
    expected = out(base, "dinov2")
    model = get_peft_model(base, config())
    unloaded = model.unload()
    assert not hasattr(unloaded, "spectralmoe") and set(unloaded.state_dict()) == keys
    assert not unloaded._forward_pre_hooks and not unloaded._load_state_dict_pre_hooks
    assert torch.equal(out(unloaded, "dinov2"), expected)


@needs_tf_loader
def test_transformers_load_adapter_of_0_1_0_reports_its_shared_tensors_as_unexpected():
    """transformers' loader bypasses load hooks, so a 0.1.0 file's tuner-level tensors cannot be converted there
    (docs/api.md says so and points to PeftModel.from_pretrained + save_pretrained): it reports them, not silently."""
    from test_saved_adapters import ROOT

    model = make_model("dinov2")
    info = model.load_adapter(str(ROOT / "dinov2_visual"))
    assert {"base_model.spectralmoe_scale.default", "base_model.spectralmoe_delta.default.weight"} <= set(
        info.unexpected_keys)
    assert "spectralmoe.spectralmoe_scale.default" in info.missing_keys
