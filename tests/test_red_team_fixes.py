"""Regression tests for what a red-team pass found after the per-forward state redesign."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from peft import get_peft_model
from tiny_models import make_depth_model, make_model
from torch.utils.checkpoint import checkpoint

from spectralmoe_peft import SpectralMoEConfig, SpectralMoELayer


def config(**overrides) -> SpectralMoEConfig:
    return SpectralMoEConfig(**{"num_experts": 4, "num_tokens": 4, "expert_rank": 2, "init_weights": False,
                                "scale_init": 0.5, **overrides})


def with_depth(**overrides):
    model = get_peft_model(make_model(), config(depth_hidden_size=48, **overrides))
    model.set_depth_model(make_depth_model())
    return model


def biases(model) -> torch.Tensor:
    return torch.cat([m.spectralmoe_gate_visual_bias["default"] for m in model.modules()
                      if isinstance(m, SpectralMoELayer)])


def test_elevation_voids_marked_by_nodata_value_equal_nan_voids():
    model = get_peft_model(make_model(), config(depth_source="elevation", nodata_value=-9999.0)).eval()
    x, elevation = torch.rand(1, 3, 32, 32), torch.rand(1, 1, 32, 32) * 30
    outputs = []
    for marker in (float("nan"), -9999.0):
        holed = elevation.clone()
        holed[..., :8, :8] = marker
        with torch.no_grad():
            outputs.append(model(pixel_values=x, elevation=holed).last_hidden_state)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)


def aux_free_step(wrap_whole_model: bool):
    torch.manual_seed(0)
    model = with_depth(noisy_gating=False, balancing="aux_free", bias_update_rate=0.5).train()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    if wrap_whole_model:  # a wrapper or Lightning checkpointing the whole model call
        out = checkpoint(lambda images: model(pixel_values=images).last_hidden_state, x, use_reentrant=False)
    else:
        out = model(pixel_values=x).last_hidden_state
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return model, grads


def test_checkpointing_the_whole_model_call_replays_its_own_forward():
    plain, plain_grads = aux_free_step(False)
    wrapped, wrapped_grads = aux_free_step(True)
    torch.testing.assert_close(biases(wrapped), biases(plain), rtol=0, atol=0)  # moved once, not twice
    for name, grad in plain_grads.items():
        torch.testing.assert_close(wrapped_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert wrapped.get_routing_stats() and torch.isfinite(wrapped.get_aux_loss())  # the real forward's, after backward


def test_aux_free_bias_moves_once_under_reentrant_block_checkpointing():
    def bias_after_step(reentrant_checkpointing: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = get_peft_model(make_model(), config(use_depth=False, balancing="aux_free", bias_update_rate=0.1))
        vit = model.base_model.model
        if reentrant_checkpointing:
            vit.enable_input_require_grads()
            for layer in vit.encoder.layer:
                forward = layer.forward
                layer.forward = (lambda f: lambda h, *a, **k: checkpoint(f, h, *a, use_reentrant=True, **k))(forward)
        model.train()(pixel_values=torch.rand(2, 3, 32, 32)).last_hidden_state.sum().backward()
        return biases(model)

    plain = bias_after_step(False)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(bias_after_step(True), plain, rtol=0, atol=0)


def test_the_bias_stays_fp32_on_a_half_precision_model():
    model = get_peft_model(make_model(), config(use_depth=False, balancing="aux_free", bias_update_rate=1e-3))
    model.to(torch.bfloat16).train()
    for layer in [m for m in model.modules() if isinstance(m, SpectralMoELayer)]:
        layer.spectralmoe_gate_visual_bias["default"] = torch.full((4,), 4.0, dtype=torch.bfloat16)
    model(pixel_values=torch.rand(2, 3, 32, 32, dtype=torch.bfloat16))
    bias = biases(model)
    assert bias.dtype == torch.float32 and not torch.all(bias == 4.0)  # a step of 1e-3 at 4.0 is not lost


def test_the_balance_loss_leaves_eval_mode_input_gradients_alone():
    grads = []
    for in_graph in (True, False):
        torch.manual_seed(0)
        model = get_peft_model(make_model(), config(use_depth=False, balance_loss_weight=10.0,
                                                    aux_loss_in_graph=in_graph)).eval()
        x = torch.rand(1, 3, 32, 32, requires_grad=True)
        out = model(pixel_values=x).last_hidden_state
        grads.append(torch.autograd.grad(out[:, 1:].pow(2).sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_kept_hidden_states_of_an_inference_forward_hold_no_forward_state():
    model = with_depth().eval()
    with torch.no_grad():
        out = model(pixel_values=torch.rand(1, 3, 32, 32), output_hidden_states=True)
    refs = [weakref.ref(h) for h in model.base_model.depth_model(pixel_values=torch.rand(1, 3, 28, 28),
                                                                  output_hidden_states=True).hidden_states]
    kept = out.hidden_states
    gc.collect()
    assert all(getattr(h.untyped_storage(), "_spectralmoe_forward_state", None) is None for h in kept)
    assert refs  # (the depth model's own outputs above are not the adapter's concern)


def test_routing_stats_are_kept_per_adapter():
    model = get_peft_model(make_model(), config(use_depth=False), adapter_name="default")
    model.add_adapter("quiet", config(use_depth=False, keep_routing_stats=False))
    model.base_model.set_adapter(["default", "quiet"])
    model(pixel_values=torch.rand(1, 3, 32, 32))
    assert model.base_model.get_routing_stats("default") and model.base_model.get_routing_stats("quiet") == {}


def test_integer_depth_inputs_are_refused_by_name():
    model = with_depth()
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(TypeError, match="depth_pixel_values must be float RGB in \\[0, 1\\]"):
        model(pixel_values=x, depth_pixel_values=(x * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="depth_hidden_states must be floating-point"):
        model(pixel_values=x, depth_hidden_states=[torch.zeros(1, 48, 4, 4, dtype=torch.long)] * 4)
    with pytest.raises(ValueError, match="batch of 0 images"):
        model(pixel_values=torch.rand(0, 3, 32, 32))


def test_the_trainer_loss_does_not_grow_with_gradient_accumulation(tmp_path):
    from spectralmoe_peft.dgss.trainer import SpectralMoETrainer, paper_training_arguments

    trainer = SpectralMoETrainer(model=get_peft_model(make_model("upernet_dinov2"), config(use_depth=False)),
                                 args=paper_training_arguments(str(tmp_path), max_steps=1, use_cpu=True))
    assert trainer.model_accepts_loss_kwargs is False  # so Trainer divides the mean loss by the accumulation steps


def test_the_balance_loss_is_counted_once_per_backward():
    """As docs/reliability.md says: two backward() calls on losses of one forward apply it twice; one backward of their
    sum applies it once."""
    def gate_grad(two_backwards: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = get_peft_model(make_model(), config(use_depth=False, noisy_gating=False)).train()
        out = model(pixel_values=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))).last_hidden_state
        first, second = out.pow(2).mean(), out.mean()
        if two_backwards:
            first.backward(retain_graph=True)
            second.backward()
        else:
            (first + second).backward()
        return next(p.grad.clone() for n, p in model.named_parameters() if "gate_visual" in n)

    def aux_only(times: int) -> torch.Tensor:  # the gradient of the balance loss alone, taken `times` times
        torch.manual_seed(0)
        model = get_peft_model(make_model(), config(use_depth=False, noisy_gating=False)).train()
        out = model(pixel_values=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))).last_hidden_state
        for _ in range(times):
            (out * 0).sum().backward(retain_graph=True)
        return next(p.grad.clone() for n, p in model.named_parameters() if "gate_visual" in n)

    once, twice = aux_only(1), aux_only(2)
    assert once.abs().sum() > 0
    torch.testing.assert_close(twice, 2 * once)
    torch.testing.assert_close(gate_grad(True) - gate_grad(False), once, rtol=1e-4, atol=1e-6)
