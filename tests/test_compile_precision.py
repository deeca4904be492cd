"""torch.compile without graph breaks inside the adapter; bf16/fp16 autocast finite and close to fp32, with the
router's statistics in fp32."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from peft import get_peft_model
from tiny_models import make_depth_model, make_model

from spectralmoe_peft import SpectralMoEConfig


def adapted(**overrides):
    torch.manual_seed(0)
    config = SpectralMoEConfig(**{"num_experts": 3, "num_tokens": 6, "expert_rank": 4, "depth_hidden_size": 48,
                                  "init_weights": False, "scale_init": 0.5, **overrides})
    model = get_peft_model(make_model("dinov2"), config)
    if config.use_depth:
        model.set_depth_model(make_depth_model())
    return model


def test_compiled_model_has_no_graph_break_inside_the_adapter():
    model = adapted().train()
    x = torch.rand(2, 3, 32, 32)
    explanation = torch._dynamo.explain(model)(pixel_values=x)
    # transformers' own output capturing breaks graphs (a lock); none may originate in this package's code
    innermost = [reason.user_stack[-1].filename for reason in explanation.break_reasons if reason.user_stack]
    assert not [f for f in innermost if "spectralmoe_peft" in f], innermost
    torch._dynamo.reset()
    model.eval()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values=x).last_hidden_state, model(pixel_values=x).last_hidden_state)


def test_refinement_compiles_as_one_graph_in_training():
    model = adapted().train()
    layer = model.base_model.model.encoder.layer[0]
    feats, depth = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    compiled = torch.compile(layer.refine_patch_tokens, backend="eager", fullgraph=True)
    out = compiled(feats, depth, "default")  # fullgraph=True raises on any break or host sync
    out.sum().backward()
    assert layer.spectralmoe_A["default"].grad is not None


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.08), (torch.float16, 0.02)])
def test_autocast_is_finite_close_to_fp32_and_routes_in_fp32(dtype, tolerance):
    model = adapted().eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(pixel_values=x).last_hidden_state
        with torch.autocast("cpu", dtype=dtype):
            out = model(pixel_values=x).last_hidden_state
    assert torch.isfinite(out).all()
    error = (out.float() - reference).norm() / reference.norm()
    assert error < tolerance, float(error)
    model.train()
    with torch.autocast("cpu", dtype=dtype):
        loss = model(pixel_values=x).last_hidden_state.float().pow(2).mean() + model.get_aux_loss()
    assert model.get_aux_loss().dtype == torch.float32
    for streams in model.get_routing_stats().values():
        for stats in streams.values():
            assert stats.expert_load.dtype == torch.float32 and stats.gate_entropy.dtype == torch.float32
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "spectralmoe_" in n)
