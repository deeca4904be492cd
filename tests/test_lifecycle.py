"""The PEFT lifecycle, on every supported family: what a user of any in-tree peft method expects."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import FAMILIES, image_size, main_output, make_model

from spectralmoe_peft import SpectralMoEConfig, SpectralMoELayer

TESTS_DIR = Path(__file__).parent


def config(**overrides) -> SpectralMoEConfig:
    settings = dict(num_experts=3, top_k=2, expert_rank=4, num_tokens=5, use_depth=False, init_weights=False,
                    scale_init=0.5)
    return SpectralMoEConfig(**{**settings, **overrides})


def inputs(family: str, batch: int = 2, seed: int = 7) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, *image_size(family), generator=generator)}


def run(model, family, **extra) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(**inputs(family), **extra))


def adapted_layers(model) -> list[SpectralMoELayer]:
    return [m for m in model.modules() if isinstance(m, SpectralMoELayer)]


def test_blocks_found_and_prefix_tokens_from_config(family):
    model = get_peft_model(make_model(family), config())
    layers = adapted_layers(model)
    assert len(layers) == FAMILIES[family].num_blocks
    assert {layer.num_prefix_tokens for layer in layers} == {FAMILIES[family].num_prefix_tokens}
    assert all("spectralmoe_" in name for name, p in model.named_parameters() if p.requires_grad)


def test_identity_at_init_and_disable_adapter(family):
    base_out = run(make_model(family), family)
    identity = get_peft_model(make_model(family), config(init_weights=True)).eval()
    assert torch.equal(run(identity, family), base_out)

    model = get_peft_model(make_model(family), config()).eval()
    adapted = run(model, family)
    assert not torch.allclose(adapted, base_out)
    with model.disable_adapter():
        assert torch.equal(run(model, family), base_out)
    assert torch.equal(run(model, family), adapted)


def test_save_writes_only_adapter_weights(family, tmp_path):
    model = get_peft_model(make_model(family), config())
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists()
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors and all("spectralmoe_" in key for key in tensors)
    adapter_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in tensors.values()) == adapter_numel
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "SPECTRALMOE"


def test_reload_in_process_is_exact(family, tmp_path):
    model = get_peft_model(make_model(family), config()).eval()
    expected = run(model, family)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(family), tmp_path).eval()
    assert torch.equal(run(loaded, family), expected)


def test_reload_in_a_fresh_process_is_exact(tmp_path):
    """What a fresh process adds (registration on import, nothing in memory from the save) does not depend on the
    family: one (non-square, with registers) is enough; every family reloads in-process just above."""
    family = "dinov3"
    model = get_peft_model(make_model(family), config()).eval()
    expected = run(model, family)
    model.save_pretrained(tmp_path / "adapter")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(TESTS_DIR)!r})
        import spectralmoe_peft
        from peft import PeftModel
        from tiny_models import make_model, main_output, image_size
        model = PeftModel.from_pretrained(make_model({family!r}), {str(tmp_path / "adapter")!r}).eval()
        generator = torch.Generator().manual_seed(7)
        x = torch.randn(2, 3, *image_size({family!r}), generator=generator)
        with torch.no_grad():
            torch.save(main_output(model(pixel_values=x)), {str(tmp_path / "out.pt")!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_several_adapters_switch_delete_and_load_under_another_name(family, tmp_path):
    base_out = run(make_model(family), family)
    model = get_peft_model(make_model(family), config(), adapter_name="first").eval()
    first = run(model, family)
    model.add_adapter("second", config(top_k=1, gating="softmax"))
    assert torch.equal(run(model, family), first)  # adding does not activate
    second_params = [p for n, p in model.named_parameters() if ".second" in n]
    assert second_params and not any(p.requires_grad for p in second_params)
    model.set_adapter("second")
    second = run(model, family)
    assert not torch.allclose(second, first) and not torch.allclose(second, base_out)
    assert all(p.requires_grad for p in second_params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".first" in n)

    model.save_pretrained(tmp_path)  # writes first/ (root) and second/
    model.set_adapter("first")
    model.delete_adapter("second")
    assert not any(".second" in n for n, _ in model.named_parameters())
    assert torch.equal(run(model, family), first)

    model.load_adapter(str(tmp_path / "second"), adapter_name="again")
    model.set_adapter("again")
    assert torch.equal(run(model, family), second)


def test_unload_restores_the_untouched_base_model(family):
    base = make_model(family)
    base_out = run(base, family)
    names_before = [n for n, _ in base.named_modules()]
    model = get_peft_model(base, config())
    restored = model.unload()
    assert [n for n, _ in restored.named_modules()] == names_before
    assert not adapted_layers(restored) and not restored._forward_pre_hooks
    leftover = [
        name for name, module in restored.named_modules() for hook in module._forward_hooks.values()
        if isinstance(getattr(hook, "__self__", None), SpectralMoELayer)
    ]
    assert not leftover, f"refinement hooks left on {leftover}"
    assert torch.equal(run(restored, family), base_out)


def test_recorded_hidden_states_carry_the_refinement(family):
    """transformers 5 records hidden_states (and Backbone feature maps) with hooks on the block class: they must
    see the refined tokens, with gradients flowing back to the first block's adapter."""
    model = get_peft_model(make_model(family), config())
    model.train()
    out = model(**inputs(family), output_hidden_states=True)
    hidden_states = out.hidden_states
    if hidden_states is None:  # task models of some families return their backbone's states under another name
        pytest.fail(f"{family} returned no hidden_states")
    first_block = hidden_states[1]
    first_block.float().pow(2).mean().backward()
    layer0 = next(layer for layer in adapted_layers(model) if layer.block_index == 0)
    assert layer0.spectralmoe_B["default"].grad is not None and layer0.spectralmoe_B["default"].grad.abs().sum() > 0
    with torch.no_grad(), model.disable_adapter():
        base_first = model(**inputs(family), output_hidden_states=True).hidden_states[1]
    assert not torch.allclose(first_block.detach(), base_first)


def test_merging_raises_a_clear_error(family):
    model = get_peft_model(make_model(family), config())
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()


def test_layers_to_transform_picks_blocks(family):
    model = get_peft_model(make_model(family), config(layers_to_transform=[1]))
    layers = adapted_layers(model)
    assert [layer.block_index for layer in layers] == [1]


def test_low_cpu_mem_usage(family, tmp_path):
    model = get_peft_model(make_model(family), config()).eval()
    expected = run(model, family)
    model.save_pretrained(tmp_path)
    meta = get_peft_model(make_model(family), config(), low_cpu_mem_usage=True)
    assert any(p.is_meta for p in meta.parameters())
    loaded = PeftModel.from_pretrained(make_model(family), tmp_path, low_cpu_mem_usage=True).eval()
    assert not any(p.is_meta for p in loaded.parameters())
    assert torch.equal(run(loaded, family), expected)


def test_adapters_follow_the_blocks_dtype(family):
    base = make_model(family).to(torch.bfloat16)
    kept = get_peft_model(base, config(), autocast_adapter_dtype=False)
    assert {p.dtype for n, p in kept.named_parameters() if "spectralmoe_" in n} == {torch.bfloat16}
    upcast = get_peft_model(make_model(family).to(torch.bfloat16), config())
    assert {p.dtype for n, p in upcast.named_parameters() if "spectralmoe_" in n} == {torch.float32}
    x = inputs(family)["pixel_values"].to(torch.bfloat16)
    for model in (kept, upcast):
        out = main_output(model(pixel_values=x))
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_gradient_checkpointing_gives_the_same_gradients(family):
    grads = []
    for checkpointing in (False, True):
        base = make_model(family)
        if checkpointing:
            # UperNet itself has no switch: checkpointing goes on its backbone, as a user would do it
            target = base if base.supports_gradient_checkpointing else base.backbone
            assert target.supports_gradient_checkpointing
            target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
        model = get_peft_model(base, config(noisy_gating=True))
        model.train()
        torch.manual_seed(3)
        out = main_output(model(**inputs(family)))
        (out.pow(2).mean() + model.get_aux_loss()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)
