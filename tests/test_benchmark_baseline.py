"""The benchmark's naive baseline (benchmarks/naive.py) computes exactly what the package computes.

Same weights (copied from a get_peft_model(...) adapter with random, non-identity init) -> same outputs, same
auxiliary loss and same gradients for every adapter parameter, for top_k 1 and 2, visual-only, with cached depth
hidden states, and with a depth model (of another width and patch size) run on the fly.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from peft import get_peft_model

import spectralmoe_peft as smoe
from tiny_models import make_depth_model, make_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from naive import NaiveSpectralMoE  # noqa: E402

DEPTH_WIDTH = 48


def _pair(top_k: int, depth: str):
    base = make_model("dinov2")
    naive_base = copy.deepcopy(base)
    use_depth = depth != "none"
    config = smoe.SpectralMoEConfig(
        num_experts=4, top_k=top_k, expert_rank=4, num_tokens=6, noisy_gating=False, init_weights=False,
        use_depth=use_depth, depth_hidden_size=DEPTH_WIDTH if use_depth else None, depth_num_prefix_tokens=1,
        scale_init=0.5,
    )
    model = get_peft_model(base, config)
    naive = NaiveSpectralMoE(
        naive_base, num_experts=4, top_k=top_k, expert_rank=4, num_tokens=6, noisy_gating=False,
        use_depth=use_depth, depth_hidden_size=DEPTH_WIDTH if use_depth else None, depth_num_prefix_tokens=1,
    )
    naive.load_from_peft(model)
    depth_model = make_depth_model(hidden_size=DEPTH_WIDTH, num_layers=3, patch_size=16)  # 2x2 grid -> 4x4
    if depth == "model":
        model.set_depth_model(depth_model)
        naive.set_depth_model(copy.deepcopy(depth_model))
    return model, naive, depth_model


def _adapter_grads(model, naive) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    tuner = model.base_model
    layers = sorted((m for m in model.modules() if hasattr(m, "spectralmoe_A")), key=lambda m: m.block_index)
    pairs = []
    for index, (theirs, mine) in enumerate(zip(layers, naive.layers)):
        pairs.append((f"A{index}", theirs.spectralmoe_A["default"].grad,
                      torch.stack([e.A.grad for e in mine.experts])))
        pairs.append((f"B{index}", theirs.spectralmoe_B["default"].grad,
                      torch.stack([e.B.grad for e in mine.experts])))
        pairs.append((f"gate_visual{index}", theirs.spectralmoe_gate_visual["default"].grad, mine.gate_visual.grad))
        if "default" in theirs.spectralmoe_gate_depth:
            pairs.append((f"gate_depth{index}", theirs.spectralmoe_gate_depth["default"].grad, mine.gate_depth.grad))
    pairs.append(("t2f", tuner.spectralmoe_token_to_feature["default"].weight.grad, naive.token_to_feature.weight.grad))
    pairs.append(("delta", tuner.spectralmoe_delta["default"].weight.grad, naive.delta.weight.grad))
    pairs.append(("delta_bias", tuner.spectralmoe_delta["default"].bias.grad, naive.delta.bias.grad))
    pairs.append(("scale", tuner.spectralmoe_scale["default"].grad, naive.scale.grad))
    if "default" in tuner.spectralmoe_depth_projection:
        pairs.append(("projection", tuner.spectralmoe_depth_projection["default"].weight.grad,
                      naive.depth_projection.weight.grad))
    return pairs


@pytest.mark.parametrize("depth", ["none", "cached", "model"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_naive_baseline_matches_package(top_k, depth):
    model, naive, depth_model = _pair(top_k, depth)
    model.train()
    naive.train()
    x = torch.randn(2, 3, 32, 32)
    kwargs = {}
    if depth == "cached":
        with torch.no_grad():
            kwargs["depth_hidden_states"] = depth_model(pixel_values=torch.randn(2, 3, 32, 32),
                                                        output_hidden_states=True).hidden_states
    out = model(pixel_values=x, **kwargs).last_hidden_state
    aux = model.get_aux_loss()
    out_naive = naive(pixel_values=x, **kwargs).last_hidden_state
    torch.testing.assert_close(out_naive, out, atol=1e-5, rtol=1e-5)
    # the adapter is not a no-op on these weights (otherwise the comparison says nothing)
    with model.disable_adapter():
        assert (model(pixel_values=x, **kwargs).last_hidden_state - out).abs().max() > 1e-3
    aux_naive = naive.aux_loss
    torch.testing.assert_close(aux_naive, aux, atol=1e-6, rtol=1e-5)

    probe = torch.randn_like(out)
    ((out * probe).sum() + aux).backward()
    ((out_naive * probe).sum() + aux_naive).backward()
    for name, grad, grad_naive in _adapter_grads(model, naive):
        assert grad is not None and grad_naive is not None, name
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad_naive, grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
