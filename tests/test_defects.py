"""One regression test per defect of the released reference code (DESIGN.md section 1), so none comes back."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import HIDDEN, make_model

from spectralmoe_peft import SpectralMoEConfig, SpectralMoELayer
from spectralmoe_peft.depth import resample_to_grid
from spectralmoe_peft.experts import expert_mixture
from spectralmoe_peft.fusion import fuse


def test_1_expert_logits_are_x_times_tokens_transposed():
    """The released einsum('bc,td->bt') scored the outer product of row sums instead of x . T^T."""
    torch.manual_seed(0)
    dim, tokens_per_expert = 8, 4
    tokens = torch.randn(1, tokens_per_expert, dim, dtype=torch.float64)
    values = torch.randn(1, tokens_per_expert, dim, dtype=torch.float64)
    gate = torch.ones(1, 2, 1, dtype=torch.float64)
    x = torch.randn(1, 2, dim, dtype=torch.float64)
    x[0, 1] = x[0, 0].flip(0)  # same row sum as token 0, different direction
    out = expert_mixture(x, tokens, values, gate)
    expected = (x[0] @ tokens[0].T / math.sqrt(dim)).softmax(-1)[:, 1:] @ values[0, 1:]
    torch.testing.assert_close(out[0], expected)
    assert not torch.allclose(out[0, 0], out[0, 1])  # the row-sum version gives these two tokens the same output


def test_2_fusion_attends_to_other_depth_tokens():
    """The released einsum('bnn,bnc->bnc') kept only the diagonal of the N x N attention."""
    torch.manual_seed(0)
    visual = torch.randn(1, 5, 8, dtype=torch.float64)
    depth = torch.randn(1, 5, 8, dtype=torch.float64)
    out = fuse(visual, depth, "cross_attention")
    attention = (visual[0] @ depth[0].T / math.sqrt(8)).softmax(-1)
    torch.testing.assert_close(out[0], visual[0] + attention @ depth[0])
    changed = depth.clone()
    changed[0, 3] += 1.0  # an off-diagonal depth token for query 0
    assert not torch.allclose(fuse(visual, changed, "cross_attention")[0, 0], out[0, 0])


def test_3_router_gets_task_gradient_with_top_1():
    """The released code combined expert outputs without the gate values: the router never saw the task loss."""
    config = SpectralMoEConfig(num_experts=4, top_k=1, num_tokens=5, expert_rank=3, init_weights=False,
                               use_depth=False, balance_loss_weight=0.0, noisy_gating=False)
    model = get_peft_model(make_model(), config)
    out = model(pixel_values=torch.randn(2, 3, 32, 32)).last_hidden_state
    out.pow(2).mean().backward()  # task loss only: the balance loss is weighted 0
    layer = next(m for m in model.modules() if isinstance(m, SpectralMoELayer))
    grad = layer.spectralmoe_gate_visual["default"].grad
    assert grad is not None and grad.abs().sum() > 0


def test_4_combine_is_linear_not_log_space():
    """The released code combined in log space: log-sum-exp of feature deltas (wrong for k > 1, overflows)."""
    dim = 4
    tokens = torch.zeros(2, 2, dim, dtype=torch.float64)  # uniform attention over the 2 tokens of each expert
    values = torch.zeros(2, 2, dim, dtype=torch.float64)
    values[0, 1] = torch.tensor([1e4, -1e4, 3.0, -2.0])  # huge and negative deltas: log space turns them to inf/nan
    values[1, 1] = torch.tensor([-5.0, 7.0, 1e4, 0.0])
    combine = torch.tensor([[[0.3, 0.7]]], dtype=torch.float64)  # B=1, N=1, E=2 (top-2)
    out = expert_mixture(torch.zeros(1, 1, dim, dtype=torch.float64), tokens, values, combine)
    expected = 0.5 * (0.3 * values[0, 1] + 0.7 * values[1, 1])  # sink takes half of each expert's attention
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0], expected)


def test_5_no_host_syncs_and_every_parameter_gets_a_gradient():
    """The released code looped over experts with nonzero/.tolist() (host syncs) and left unused experts
    out of the graph (DDP needed find_unused_parameters)."""
    config = SpectralMoEConfig(num_experts=6, top_k=1, num_tokens=5, expert_rank=3, init_weights=False)
    model = get_peft_model(make_model(), config)
    layer = next(m for m in model.modules() if isinstance(m, SpectralMoELayer))
    with torch.no_grad():  # send every token to expert 0: experts 1..5 are never chosen
        layer.spectralmoe_gate_visual["default"].zero_()
        layer.spectralmoe_gate_visual["default"][0] = 0.0
        layer.spectralmoe_gate_visual["default"][1:] = 50.0
        layer.spectralmoe_gate_depth["default"].copy_(layer.spectralmoe_gate_visual["default"])
    depth = tuple(torch.randn(2, HIDDEN, 4, 4) for _ in range(3))
    out = model(pixel_values=torch.randn(2, 3, 32, 32), depth_hidden_states=depth).last_hidden_state
    (out.pow(2).mean() + model.get_aux_loss()).backward()
    chosen = model.get_routing_stats()[layer.block_index]["visual"].topk_indices
    assert (chosen == 0).all()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters outside the graph: {missing}"

    # no data-dependent control flow: dynamo traces the refinement as one graph (nonzero/.tolist() would break it)
    torch._dynamo.reset()
    feats = torch.randn(2, 16, HIDDEN)
    compiled = torch.compile(layer.refine_patch_tokens, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(feats, feats, "default"), layer.refine_patch_tokens(feats, feats, "default"))


def test_6_depth_tokens_are_resampled_in_2d():
    """The released code aligned a patch-14 depth grid to a patch-16 visual grid by 1-D interpolation of the
    flattened tokens, which mixes rows."""
    depth_h, depth_w, visual_h, visual_w = 6, 9, 4, 7
    columns = torch.arange(depth_w, dtype=torch.float64).expand(depth_h, depth_w)  # a left-right ramp
    rows = torch.arange(depth_h, dtype=torch.float64).unsqueeze(1).expand(depth_h, depth_w)  # a top-bottom ramp
    grid = torch.stack([columns, rows]).unsqueeze(0)  # 1, 2, h, w
    tokens = resample_to_grid(grid, (visual_h, visual_w)).reshape(visual_h, visual_w, 2)
    # each visual token lands on the depth position of its own centre: x = (j + 0.5) * w / W - 0.5
    expected_x = ((torch.arange(visual_w) + 0.5) * depth_w / visual_w - 0.5).clamp(0, depth_w - 1)
    expected_y = ((torch.arange(visual_h) + 0.5) * depth_h / visual_h - 0.5).clamp(0, depth_h - 1)
    torch.testing.assert_close(tokens[..., 0], expected_x.double().expand(visual_h, visual_w))
    torch.testing.assert_close(tokens[..., 1], expected_y.double().unsqueeze(1).expand(visual_h, visual_w))
    flat_1d = F.interpolate(grid.flatten(2), size=visual_h * visual_w, mode="linear").reshape(2, visual_h, visual_w)
    assert not torch.allclose(flat_1d[0], tokens[..., 0])  # what the released code did


def test_7_prefix_tokens_come_from_the_config():
    """The released code hard-coded the CLS/register count of one backbone."""
    config = tf.Dinov2WithRegistersConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, image_size=32, patch_size=8, num_register_tokens=3)
    torch.manual_seed(0)
    base = tf.Dinov2WithRegistersModel(config).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        reference = base(pixel_values=x).last_hidden_state
    # adapt the last block only, so no later attention mixes refined patches into the prefix tokens
    config = SpectralMoEConfig(init_weights=False, use_depth=False, num_tokens=4, layers_to_transform=[1])
    model = get_peft_model(base, config).eval()
    layers = [m for m in model.modules() if isinstance(m, SpectralMoELayer)]
    assert len(layers) == 1 and layers[0].num_prefix_tokens == 4  # CLS + 3 registers
    with torch.no_grad():
        out = model(pixel_values=x).last_hidden_state
    assert out.shape == reference.shape
    assert not torch.allclose(out[:, 4:], reference[:, 4:])
    # the final layernorm acts per token: prefix tokens equal the base model's exactly when they were untouched
    torch.testing.assert_close(out[:, :4], reference[:, :4], rtol=0, atol=0)


class SpyDepthModel(torch.nn.Module):
    """Records what the depth model is given; returns DINOv2-shaped hidden states."""

    def __init__(self) -> None:
        super().__init__()
        self.config = tf.Dinov2Config(hidden_size=HIDDEN, patch_size=8)
        self.proj = torch.nn.Linear(3, HIDDEN)
        self.seen = None

    def forward(self, pixel_values, output_hidden_states=True):
        self.seen = pixel_values.clone()
        patches = F.avg_pool2d(pixel_values, 8).flatten(2).transpose(1, 2)  # B, h*w, 3
        tokens = torch.cat([patches.mean(1, keepdim=True), patches], dim=1)
        return tf.modeling_outputs.BaseModelOutput(hidden_states=(self.proj(tokens),) * 3)


def test_8_band_selection_and_depth_normalization_are_configurable():
    """The released code hard-coded the RGB bands and fed the depth model unnormalized values."""
    base = make_model(num_channels=6)
    config = SpectralMoEConfig(rgb_band_indices=[2, 1, 0], depth_input_rescale=1e-4, num_tokens=4)
    model = get_peft_model(base, config)
    spy = SpyDepthModel()
    model.set_depth_model(spy)
    x = torch.rand(2, 6, 32, 32) * 1e4  # reflectance x 1e4, as Sentinel-2 L1C stores it
    model(pixel_values=x)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(spy.seen, (x[:, [2, 1, 0]] * 1e-4 - mean) / std)


def test_9_missing_or_mismatched_adapter_weights_raise(tmp_path):
    """The released code only warned about missing or mismatched weights."""
    config = SpectralMoEConfig(use_depth=False, num_tokens=4, init_weights=False)
    get_peft_model(make_model(), config).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    with pytest.raises(ValueError, match="shape mismatches"):
        PeftModel.from_pretrained(make_model(hidden_size=48), tmp_path)
    with pytest.raises(ValueError, match="no place for"):
        PeftModel.from_pretrained(make_model(num_hidden_layers=1), tmp_path)
    save_file({k: v for k, v in tensors.items() if "layer.1.spectralmoe_B" not in k}, path)
    with pytest.raises(ValueError, match="missing"):
        PeftModel.from_pretrained(make_model(), tmp_path)
