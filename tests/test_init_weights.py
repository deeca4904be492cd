"""init_weights="paper" initializes every tensor as the released code does (DepthMoE.create_moe_model), and the
other modes differ only where docs/method.md says."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from tiny_models import HIDDEN, make_depth_model, make_model
from torch import nn

from spectralmoe_peft import SpectralMoEConfig

RELEASED = dict(num_experts=6, num_tokens=100, expert_rank=16, scale_init=1e-3)  # its configs and defaults


def adapted(init_weights, **overrides):
    config = SpectralMoEConfig(**{**RELEASED, "init_weights": init_weights, **overrides})
    return get_peft_model(make_model("dinov2"), config).base_model


def layers(tuner):
    return list(tuner.model.encoder.layer)


def kaiming_uniform_bound(shape) -> float:
    """torch's kaiming_uniform_(a=sqrt(5), mode='fan_in') bound, from torch's own helpers (the released init of the
    experts' A and of every nn.Linear weight; nn.Linear's bias uses the same bound 1/sqrt(fan_in))."""
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    return nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3.0 / fan_in)


def assert_uniform(tensor, bound, rel_std=0.05):
    assert tensor.abs().max() <= bound
    assert tensor.abs().max() > 0.9 * bound
    torch.testing.assert_close(tensor.std(), torch.tensor(bound / math.sqrt(3)), rtol=rel_std, atol=0)


def test_paper_expert_a_is_kaiming_uniform_per_expert():
    for layer in layers(adapted("paper")):
        a = layer.spectralmoe_A["default"]  # E, M, r: the released code has one (M, r) parameter per expert
        assert a.shape == (6, 100, 16)
        assert_uniform(a, kaiming_uniform_bound((100, 16)))  # = 1/sqrt(r)


def test_paper_expert_b_is_zero():
    for layer in layers(adapted("paper")):
        assert torch.equal(layer.spectralmoe_B["default"], torch.zeros(6, 16, HIDDEN))


def test_paper_gates_of_both_streams_are_zero():
    tuner = adapted("paper")
    for layer in layers(tuner):
        for gate in (layer.spectralmoe_gate_visual, layer.spectralmoe_gate_depth):
            assert torch.equal(gate["default"], torch.zeros(6, HIDDEN))


def test_paper_noise_weights_of_both_streams_are_zero():
    for layer in layers(adapted("paper")):
        for noise in (layer.spectralmoe_gate_visual_noise, layer.spectralmoe_gate_depth_noise):
            assert torch.equal(noise["default"], torch.zeros(HIDDEN, 6))


@pytest.mark.parametrize("name", ["spectralmoe_token_to_feature", "spectralmoe_delta"])
def test_paper_token_to_feature_and_delta_are_default_linears(name):
    """W_t2f and W_delta (mlp_token2feat, mlp_delta_f): kaiming_uniform(a=sqrt(5)) weights and nn.Linear's default
    bias; the released configs keep zero_mlp_delta_f=False, so W_delta is not zero."""
    linear = getattr(adapted("paper"), name)["default"]
    bound = kaiming_uniform_bound((HIDDEN, HIDDEN))  # = 1/sqrt(D)
    assert_uniform(linear.weight, bound, rel_std=0.1)
    assert linear.bias.abs().max() <= bound and linear.bias.abs().max() > 0


def test_paper_scale_is_scale_init():
    assert adapted("paper").spectralmoe_scale["default"].item() == pytest.approx(1e-3)  # released scale_init=0.001


def test_beyond_the_released_code_depth_projection_and_elevation_encoder_are_torch_defaults():
    """Not in the released code (its depth model is as wide as the ViT; no elevation input): torch's defaults."""
    projection = adapted("paper", depth_hidden_size=48).spectralmoe_depth_projection["default"]
    bound = kaiming_uniform_bound((HIDDEN, 48))
    assert projection.weight.abs().max() <= bound and projection.weight.abs().max() > 0.9 * bound
    encoder = adapted("paper", depth_source="elevation").spectralmoe_elevation_encoder["default"]
    bound = kaiming_uniform_bound(encoder.weight.shape)
    assert encoder.weight.abs().max() <= bound and encoder.weight.abs().max() > 0.9 * bound


def test_default_init_departs_only_in_gates_and_delta():
    """init_weights=True (PEFT's exact identity): W_delta = 0 and gates N(0, 1/D) (routing spread from the first
    forward instead of tied); A, B, noise weights, W_t2f and s as in "paper"."""
    tuner = adapted(True)
    assert torch.equal(tuner.spectralmoe_delta["default"].weight, torch.zeros(HIDDEN, HIDDEN))
    assert torch.equal(tuner.spectralmoe_delta["default"].bias, torch.zeros(HIDDEN))
    gates = torch.cat([layer.spectralmoe_gate_visual["default"] for layer in layers(tuner)])
    torch.testing.assert_close(gates.std(), torch.tensor(1 / math.sqrt(HIDDEN)), rtol=0.1, atol=0)
    for layer in layers(tuner):
        assert_uniform(layer.spectralmoe_A["default"], kaiming_uniform_bound((100, 16)))
        assert not layer.spectralmoe_B["default"].any()
        assert not layer.spectralmoe_gate_visual_noise["default"].any()


def train_paper_init(noisy_gating, steps):
    torch.manual_seed(0)
    model = get_peft_model(make_model("dinov2"), SpectralMoEConfig(
        num_experts=4, num_tokens=6, expert_rank=4, depth_hidden_size=48, init_weights="paper",
        noisy_gating=noisy_gating))
    model.set_depth_model(make_depth_model())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(steps):
        loss = model(pixel_values=x).last_hidden_state.pow(2).mean() + model.base_model.get_aux_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [gate["default"] for layer in layers(model.base_model)
            for gate in (layer.spectralmoe_gate_visual, layer.spectralmoe_gate_depth)]


def test_paper_zero_gates_untie_under_the_learned_noise():
    """Zero gates give every expert the same logit; the noise (noisy_gating=True, the released setting) routes
    tokens at random, so each gate gets its own gradient and after a few steps every gate differs from every
    other."""
    for gate in train_paper_init(noisy_gating=True, steps=5):
        distances = torch.cdist(gate, gate)[~torch.eye(4, dtype=torch.bool)]
        assert distances.min() > 1e-3


def test_paper_zero_gates_without_noise_tie_all_but_one_expert():
    """Without noise every token goes to the same expert (top-k's choice among equal logits) and the other E-1
    experts get bitwise the same gradient, so they stay tied: with noisy_gating=False use init_weights=True."""
    for gate in train_paper_init(noisy_gating=False, steps=1):
        distinct, counts = torch.unique(gate.detach(), dim=0, return_counts=True)
        assert sorted(counts.tolist()) == [1, 3]
