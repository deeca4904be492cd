"""PEFT's generic checks, written natively for vision models: adapter names, save/load variants, trainability,
deletion, finiteness. (The lifecycle on every family is in test_lifecycle.py.)"""

from __future__ import annotations

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from tiny_models import image_size, main_output, make_model

from spectralmoe_peft import SpectralMoEConfig

FAMILIES = ["dinov2", "dinov3", "upernet_dinov2"]  # a plain ViT, RoPE + registers, a segmentation model


def config(**overrides) -> SpectralMoEConfig:
    settings = dict(num_experts=3, top_k=1, expert_rank=4, num_tokens=5, use_depth=False, init_weights=False,
                    scale_init=0.5)
    return SpectralMoEConfig(**{**settings, **overrides})


def x_for(family, batch=2, seed=3):
    return torch.randn(batch, 3, *image_size(family), generator=torch.Generator().manual_seed(seed))


def out(model, family):
    with torch.no_grad():
        return main_output(model(pixel_values=x_for(family)))


@pytest.mark.parametrize("family", FAMILIES)
def test_substring_adapter_names_save_and_load_separately(family, tmp_path):
    """'a' is a substring of 'ab' and of 'b_a': each file holds exactly its own adapter's tensors."""
    model = get_peft_model(make_model(family), config(), adapter_name="a").eval()
    model.add_adapter("ab", config(num_experts=2))
    model.add_adapter("b_a", config(num_experts=4))
    expected = {}
    for name in ("a", "ab", "b_a"):
        model.set_adapter(name)
        expected[name] = out(model, family)
    model.save_pretrained(tmp_path)
    for name in ("a", "ab", "b_a"):  # adapters other than "default" go to subfolders named after them
        folder = tmp_path / name
        keys = load_file(folder / "adapter_model.safetensors").keys()
        assert keys and all("spectralmoe_" in k for k in keys)
        state = get_peft_model_state_dict(model, adapter_name=name)
        assert set(keys) == set(state)
        loaded = PeftModel.from_pretrained(make_model(family), folder, adapter_name=name).eval()
        assert torch.equal(out(loaded, family), expected[name])


@pytest.mark.parametrize("family", FAMILIES)
def test_selected_adapters_and_pickle_serialization(family, tmp_path):
    model = get_peft_model(make_model(family), config(), adapter_name="one").eval()
    model.add_adapter("two", config(num_experts=2))
    model.save_pretrained(tmp_path / "sel", selected_adapters=["two"])
    assert (tmp_path / "sel" / "two" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "sel" / "adapter_model.safetensors").exists()
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "one" / "adapter_model.bin").exists()
    expected = out(model, family)
    loaded = PeftModel.from_pretrained(make_model(family), tmp_path / "bin" / "one", adapter_name="one").eval()
    assert torch.equal(out(loaded, family), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_with_a_given_config_and_load_adapter_without_missing_keys(family, tmp_path):
    model = get_peft_model(make_model(family), config()).eval()
    expected = out(model, family)
    model.save_pretrained(tmp_path)
    given = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(given, SpectralMoEConfig) and given.num_experts == 3
    loaded = PeftModel.from_pretrained(make_model(family), tmp_path, config=given).eval()
    assert torch.equal(out(loaded, family), expected)
    result = loaded.load_adapter(tmp_path, adapter_name="copied")
    assert not [k for k in result.missing_keys if "spectralmoe_" in k and ".copied" in k]
    assert not result.unexpected_keys
    loaded.set_adapter("copied")
    assert torch.equal(out(loaded, family), expected)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_requires_grad_after_loading(tmp_path, is_trainable):
    model = get_peft_model(make_model("upernet_dinov2"), config(modules_to_save=["decode_head"]))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("upernet_dinov2"), tmp_path, is_trainable=is_trainable)
    adapter = {n: p.requires_grad for n, p in loaded.named_parameters() if "spectralmoe_" in n}
    head = {n: p.requires_grad for n, p in loaded.named_parameters() if "modules_to_save" in n}
    base = [p.requires_grad for n, p in loaded.named_parameters() if "spectralmoe_" not in n and "modules_to_save"
            not in n]
    assert adapter and head and not any(base)
    assert all(v == is_trainable for v in adapter.values()) and all(v == is_trainable for v in head.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_training_updates_exactly_the_adapter(family):
    model = get_peft_model(make_model(family), config(init_weights=True, noisy_gating=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("spectralmoe_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        loss = main_output(model(pixel_values=x_for(family, seed=step))).pow(2).mean() + model.get_aux_loss()
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == (name in trainable), name  # every adapter tensor trains; nothing else moves
    buffers = dict(model.named_buffers())
    assert all(torch.isfinite(b).all() for b in buffers.values() if b.is_floating_point())


@pytest.mark.parametrize("family", FAMILIES)
def test_delete_and_unload_leave_nothing_behind(family):
    base = make_model(family)
    names_before = {n for n, _ in base.named_modules()}
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.modules())
    expected = out(base, family)
    model = get_peft_model(base, config(), adapter_name="x")
    model.add_adapter("y", config())
    model.delete_adapter("y")
    assert not any(".y" in n.split("spectralmoe_")[-1][:3] for n, _ in model.named_parameters() if "spectralmoe_" in n)
    assert "y" not in model.peft_config
    restored = model.unload()
    assert {n for n, _ in restored.named_modules()} == names_before
    assert not any("spectralmoe" in n for n, _ in restored.named_parameters())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in restored.modules()) == hooks_before
    assert torch.equal(out(restored, family), expected)


@pytest.mark.parametrize("disable_first", [True, False])
def test_disable_adapter_and_leaving_it(disable_first):
    family = "dinov3"
    base_out = out(make_model(family), family)
    model = get_peft_model(make_model(family), config()).eval()
    adapted = out(model, family)
    assert not torch.allclose(adapted, base_out)
    if disable_first:
        with model.disable_adapter():
            assert torch.equal(out(model, family), base_out)
        assert torch.equal(out(model, family), adapted)
    else:
        with pytest.raises(RuntimeError, match="boom"):
            with model.disable_adapter():
                raise RuntimeError("boom")
        assert torch.equal(out(model, family), adapted)  # an exception inside the context re-enables the adapter


@pytest.mark.parametrize("name", ["copy", "keys", "a.b", ""])
def test_adapter_names_that_cannot_work_are_refused_clearly(name):
    model = get_peft_model(make_model("dinov2"), config())
    with pytest.raises(ValueError, match="cannot be used"):
        model.add_adapter(name, config())
    assert name not in model.peft_config or name == "default"


@pytest.mark.parametrize("family", FAMILIES)
def test_base_model_state_dict_without_any_adapter_tensor(family):
    """peft's _test_get_base_model_state_dict: the base weights alone (the shared modules' holder, model.spectralmoe,
    is adapter state too), and set_base_model_state_dict restores perturbed base weights."""
    save_and_load = pytest.importorskip("peft.utils.save_and_load")
    if not hasattr(save_and_load, "get_base_model_state_dict"):
        pytest.skip("this peft has no get_base_model_state_dict")
    base = make_model(family)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, config())
    extracted = save_and_load.get_base_model_state_dict(model)
    assert set(extracted) == set(original)
    assert all(torch.equal(extracted[k], v) for k, v in original.items())
    with torch.no_grad():
        for param in model.get_base_model().parameters():
            param.add_(1.0)
    result = save_and_load.set_base_model_state_dict(model, original, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    restored = save_and_load.get_base_model_state_dict(model)
    assert all(torch.equal(restored[k], v) for k, v in original.items())
