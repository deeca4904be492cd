"""Balancing: the reduction of the balance loss over blocks, and auxiliary-loss-free balancing (DeepSeek-V3): a
per-expert routing bias that shifts which experts are chosen (not their weights), moved by the sign of each expert's
load error after every training forward, saved with the adapter, identical under checkpoint recomputation."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import make_depth_model, make_model

from spectralmoe_peft import SpectralMoEConfig, SpectralMoELayer
from spectralmoe_peft.routing import route, update_selection_bias


def config(**overrides) -> SpectralMoEConfig:
    return SpectralMoEConfig(**{"num_experts": 4, "num_tokens": 4, "expert_rank": 2, "init_weights": False,
                                "scale_init": 0.5, "use_depth": False, **overrides})


def layers(model) -> list[SpectralMoELayer]:
    return [m for m in model.modules() if isinstance(m, SpectralMoELayer)]


def test_the_bias_chooses_experts_but_does_not_weight_them():
    torch.manual_seed(0)
    x, gate = torch.randn(2, 5, 8), torch.randn(4, 8)
    plain = route(x, gate, None, top_k=1, gating="softmax", noisy=False)
    bias = torch.tensor([100.0, 0.0, 0.0, 0.0])
    biased = route(x, gate, None, top_k=1, gating="softmax", noisy=False, selection_bias=bias)
    assert (biased.topk_indices == 0).all()
    torch.testing.assert_close(biased.combine_weights[..., 0], plain.probs[..., 0])  # the unbiased gate value
    torch.testing.assert_close(biased.probs, plain.probs)
    same = route(x, gate, None, top_k=1, gating="softmax", noisy=False, selection_bias=torch.zeros(4))
    torch.testing.assert_close(same.combine_weights, plain.combine_weights, rtol=0, atol=0)


def test_the_bias_moves_against_the_load_error_by_its_rate():
    bias = torch.zeros(4)
    update_selection_bias(bias, torch.tensor([0.7, 0.1, 0.2, 0.0]), rate=0.01)  # mean 0.25
    torch.testing.assert_close(bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    update_selection_bias(bias, torch.tensor([0.25, 0.25, 0.25, 0.25]), rate=0.01)  # balanced: no move
    torch.testing.assert_close(bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))


def test_training_forwards_move_the_bias_and_it_is_saved(tmp_path):
    model = get_peft_model(make_model(), config(balancing="aux_free", bias_update_rate=0.05))
    biases = [layer.spectralmoe_gate_visual_bias["default"] for layer in layers(model)]
    assert all(not b.any() and not b.requires_grad for b in biases)
    assert not any("bias" in n and "gate" in n for n, _ in model.named_parameters())  # not for the optimizer
    with torch.no_grad():
        model.eval()(pixel_values=torch.rand(2, 3, 32, 32))
    assert all(not b.any() for b in biases)  # evaluation does not move it
    for _ in range(3):
        model.train()(pixel_values=torch.rand(2, 3, 32, 32)).last_hidden_state.sum().backward()
    assert all(b.abs().sum() > 0 for b in biases)
    assert all(torch.allclose(b.abs(), torch.full_like(b, 0.05)) or b.abs().max() <= 0.15 + 1e-6 for b in biases)
    assert float(model.get_aux_loss()) == 0.0  # aux-free: no balance term
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(pixel_values=x).last_hidden_state
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(), tmp_path).eval()
    for mine, theirs in zip(layers(model), layers(loaded)):
        torch.testing.assert_close(theirs.spectralmoe_gate_visual_bias["default"],
                                   mine.spectralmoe_gate_visual_bias["default"], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).last_hidden_state, expected, rtol=0, atol=0)


def test_aux_free_balancing_balances_a_collapsed_router():
    """All tokens start on one expert (its gate moved onto the tokens); the bias alone spreads them out, where the
    same router without it (and without a balance loss) stays collapsed."""
    def last_loads(balancing: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = get_peft_model(make_model(), config(balancing=balancing, bias_update_rate=0.05, noisy_gating=False,
                                                    balance_loss_weight=0.0))
        for layer in layers(model):
            with torch.no_grad():
                layer.spectralmoe_gate_visual["default"][0] = 0.0  # laplace: nearest to every (normalized) token
                layer.spectralmoe_gate_visual["default"][1:] *= 2.0
        gen = torch.Generator().manual_seed(0)
        loads = []
        for _ in range(40):
            model.train()(pixel_values=torch.rand(4, 3, 32, 32, generator=gen))  # a training forward moves it
            loads.append(model.get_routing_stats()[0]["visual"].expert_load.clone())
        return loads

    free, control = last_loads("aux_free"), last_loads("aux_loss")
    assert free[0].max() > 0.9 and control[0].max() > 0.9  # collapsed at first
    assert all(load.max() > 0.9 for load in control[-10:])  # nothing else moves the choice
    assert torch.stack(free[-10:]).max(-1).values.mean() < 0.75 and (torch.stack(free[-10:]).mean(0) > 0.05).sum() >= 3


def test_mean_reduction_divides_the_sum_by_the_adapted_blocks():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    totals = {}
    for reduction in ("sum", "mean"):
        model = get_peft_model(make_model(), config(balance_loss_reduction=reduction, noisy_gating=False,
                                                    layers_to_transform=[0, 1]))
        with torch.no_grad():
            model.train()(pixel_values=x)
        totals[reduction] = model.get_aux_loss()
    torch.testing.assert_close(totals["mean"], totals["sum"] / 2)


@pytest.mark.parametrize("balancing", ["aux_free", "both"])
def test_checkpoint_recomputation_routes_with_the_bias_its_forward_used(balancing):
    """The bias moves after each training forward; a recomputation in backward must still choose what its forward
    chose, or the gradients would be those of another routing."""
    def grads(checkpointing: bool):
        torch.manual_seed(3)
        model = get_peft_model(make_model(), config(use_depth=True, depth_hidden_size=48, balancing=balancing,
                                                    bias_update_rate=0.5))
        model.set_depth_model(make_depth_model())
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
        model.train()
        torch.manual_seed(4)
        first = model(pixel_values=torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
        second = model(pixel_values=torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
        (first.last_hidden_state.pow(2).mean() + second.last_hidden_state.mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert set(plain) == set(checkpointed)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("overrides", [{"balancing": "aux_free"}, {"balance_loss_weight": 0.0}])
def test_an_unweighted_aux_loss_keeps_its_graph_when_the_user_adds_it(overrides):
    """Terms with weight 0 stay out of the graph; with aux_loss_in_graph=False, get_aux_loss() is still a tensor with
    a graph (a zero), so code that calls .backward() on it on its own keeps working."""
    model = get_peft_model(make_model(), config(aux_loss_in_graph=False, use_depth=False, **overrides)).train()
    model(pixel_values=torch.rand(2, 3, 32, 32))
    aux = model.get_aux_loss()
    assert aux.requires_grad and float(aux) == 0.0
    aux.backward()  # no error; nothing to learn from a zero


def test_terms_with_weight_zero_stay_out_of_the_aux_loss():
    """docs/performance.md: a balance term with weight 0 is left out, not multiplied by 0 (no backward through it, and
    an overflowing z-loss cannot turn the sum into 0 * inf = NaN)."""
    from spectralmoe_peft.layer import weighted_aux_loss
    from spectralmoe_peft.routing import route

    x = torch.randn(2, 5, 8, requires_grad=True)
    routed = route(x, torch.randn(3, 8), None, top_k=1, gating="softmax", noisy=False)
    overflowing = routed._replace(z_loss=torch.tensor(float("inf")), switch_loss=torch.tensor(float("nan")))
    aux = weighted_aux_loss(config(switch_loss_weight=0.0, router_z_loss_weight=0.0), overflowing)
    torch.testing.assert_close(aux, config().balance_loss_weight * routed.balance_loss)
    assert torch.isnan(weighted_aux_loss(config(router_z_loss_weight=1e-3, switch_loss_weight=1.0), overflowing))
