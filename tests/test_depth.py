"""The depth stream: layer map, grids, the attached depth model, explicit hidden states, and clear errors."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import HIDDEN, make_depth_model, make_model

from spectralmoe_peft import SpectralMoEConfig
from spectralmoe_peft.depth import depth_layer_index, infer_grid, select_rgb


def config(**overrides) -> SpectralMoEConfig:
    settings = dict(num_experts=3, top_k=1, expert_rank=4, num_tokens=5, init_weights=False, scale_init=0.5,
                    depth_hidden_size=48)
    return SpectralMoEConfig(**{**settings, **overrides})


def test_layer_map_is_round_half_up():
    assert [depth_layer_index(i, 4, 2) for i in range(4)] == [1, 1, 2, 2]  # 0.5 -> 1, 1.5 -> 2
    assert [depth_layer_index(i, 12, 24) for i in range(12)] == list(range(2, 25, 2))
    assert [depth_layer_index(i, 24, 12) for i in range(24)] == [int(l / 2 + 0.5) for l in range(1, 25)]
    assert depth_layer_index(11, 12, 12) == 12


def test_infer_grid_keeps_the_aspect_ratio():
    assert infer_grid(16, (4, 4)) == (4, 4)
    assert infer_grid(24, (2, 3)) == (4, 6)
    assert infer_grid(12, (8, 5)) == (4, 3)
    with pytest.raises(ValueError, match="aspect ratio"):
        infer_grid(7, (4, 4))


def test_band_selection_errors():
    with pytest.raises(ValueError, match="3 bands"):
        select_rgb(torch.zeros(1, 2, 8, 8), [0, 1, 2])
    with pytest.raises(ValueError, match="out of range"):
        select_rgb(torch.zeros(1, 4, 8, 8), [4, 1, 0])


def test_attached_depth_model_of_other_width_depth_and_patch_size():
    model = get_peft_model(make_model(), config())
    depth = make_depth_model()  # width 48, 3 layers, patch 7 vs the ViT's 32, 2 layers, patch 8
    model.set_depth_model(depth)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    out = model(pixel_values=x).last_hidden_state
    assert not depth.training and not any(p.requires_grad for p in depth.parameters())
    stats = model.get_routing_stats()
    assert set(stats) == {0, 1} and set(stats[0]) == {"visual", "depth"}
    assert stats[0]["depth"].topk_indices.shape == (2, 16, 1) and stats[0]["visual"].grid == (4, 4)
    (out.pow(2).mean() + model.get_aux_loss()).backward()
    projection = model.base_model.spectralmoe_depth_projection["default"]
    assert projection.weight.shape == (HIDDEN, 48) and projection.weight.grad.abs().sum() > 0


def test_depth_model_moves_with_the_model_and_is_never_saved(tmp_path):
    model = get_peft_model(make_model(), config())
    depth = make_depth_model()
    model.set_depth_model(depth)
    model.to(torch.float64)
    assert next(depth.parameters()).dtype == torch.float64
    model.to(torch.float32)
    assert all("embeddings" not in name for name, _ in model.base_model.named_parameters() if "depth" in name)
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert all("spectralmoe_" in key for key in keys)
    depth_numel = sum(p.numel() for p in depth.parameters())
    saved_numel = sum(t.numel() for t in load_file(tmp_path / "adapter_model.safetensors").values())
    assert saved_numel < depth_numel
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
    loaded = PeftModel.from_pretrained(make_model(), tmp_path).eval()
    loaded.set_depth_model(make_depth_model())
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).last_hidden_state, expected)


def test_explicit_depth_hidden_states_token_and_grid_forms_agree():
    model = get_peft_model(make_model(), config(depth_hidden_size=None, depth_num_prefix_tokens=1)).eval()
    grids = [torch.randn(2, HIDDEN, 3, 3) for _ in range(4)]
    tokens = [torch.cat([torch.randn(2, 1, HIDDEN), g.flatten(2).transpose(1, 2)], dim=1) for g in grids]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        from_grids = model(pixel_values=x, depth_hidden_states=grids).last_hidden_state
        from_tokens = model(pixel_values=x, depth_hidden_states=tuple(tokens)).last_hidden_state
        without = model(pixel_values=x, depth_hidden_states=[torch.zeros_like(g) for g in grids]).last_hidden_state
    torch.testing.assert_close(from_tokens, from_grids)
    assert not torch.allclose(from_grids, without)


def test_depth_pixel_values_are_used_instead_of_the_input_bands():
    model = get_peft_model(make_model(), config()).eval()
    model.set_depth_model(make_depth_model())
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        from_bands = model(pixel_values=x).last_hidden_state
        from_own_rgb = model(pixel_values=x, depth_pixel_values=x).last_hidden_state
        other_rgb = model(pixel_values=x, depth_pixel_values=torch.rand(1, 3, 28, 28)).last_hidden_state
    torch.testing.assert_close(from_own_rgb, from_bands)
    assert not torch.allclose(other_rgb, from_bands)


def test_clear_errors():
    model = get_peft_model(make_model(), config())
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="no depth source"):
        model(pixel_values=x)
    with pytest.raises(ValueError, match="made for a depth model 40 wide"):
        get_peft_model(make_model(), config(depth_hidden_size=40)).set_depth_model(make_depth_model())
    with pytest.raises(ValueError, match="depth_num_prefix_tokens"):
        model(pixel_values=x, depth_hidden_states=[torch.randn(1, 10, 48)] * 3)
    with pytest.raises(ValueError, match="tuple/list"):
        model(pixel_values=x, depth_hidden_states=torch.randn(3, 1, 10, 48))
    with pytest.raises(ValueError, match="patch_size"):
        model.set_depth_model(torch.nn.Linear(3, 3))
    # a failed forward leaves the model usable
    model.set_depth_model(make_depth_model())
    assert torch.isfinite(model(pixel_values=x).last_hidden_state).all()
    # visual-only adapters need no depth at all
    visual_only = get_peft_model(make_model(), config(use_depth=False))
    assert torch.isfinite(visual_only(pixel_values=x).last_hidden_state).all()
    assert all(stream == {"visual"} for stream in map(set, visual_only.get_routing_stats().values()))


def test_get_aux_loss_before_any_forward_raises():
    model = get_peft_model(make_model(), config(use_depth=False))
    with pytest.raises(RuntimeError, match="forward"):
        model.get_aux_loss()


def test_depth_estimation_models_run_only_their_encoder():
    """Depth Anything's hidden_states come from its ViT backbone; the neck and head are not run (their output
    would be discarded), and the adapter sees exactly the hidden states the full model returns."""
    import transformers as tf
    from peft import get_peft_model
    from tiny_models import make_model

    from spectralmoe_peft import SpectralMoEConfig

    torch.manual_seed(0)
    backbone = tf.Dinov2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                               patch_size=7, image_size=63, out_indices=[1, 2], reshape_hidden_states=False)
    depth_model = tf.DepthAnythingForDepthEstimation(tf.DepthAnythingConfig(
        backbone_config=backbone, patch_size=7, reassemble_hidden_size=24, fusion_hidden_size=16,
        head_hidden_size=8, neck_hidden_sizes=[12, 24], reassemble_factors=[2, 1])).eval()
    calls, seen = [], []
    depth_model.head.register_forward_hook(lambda *args: calls.append("head"))
    def record(module, args, kwargs):
        seen.append(kwargs.get("pixel_values", args[0] if args else None))

    depth_model.backbone.register_forward_pre_hook(record, with_kwargs=True)
    model = get_peft_model(make_model("dinov2"), SpectralMoEConfig(num_experts=2, num_tokens=4, expert_rank=2,
                                                                  depth_hidden_size=24, init_weights=False)).eval()
    model.set_depth_model(depth_model)
    captured = []
    model.base_model._depth_stream.model.backbone.register_forward_hook(
        lambda module, args, output: captured.extend(output.hidden_states))
    with torch.no_grad():
        out = model(pixel_values=torch.rand(2, 3, 32, 32)).last_hidden_state
        used = list(captured)  # what the adapter's forward got (the full call below runs the backbone again)
        assert not calls and len(seen) == 1 and torch.isfinite(out).all()  # the head never ran
        rgb = seen[0]
        full = depth_model(pixel_values=rgb, output_hidden_states=True).hidden_states
    assert calls == ["head"] and len(used) == len(full)
    assert all(torch.equal(a, b) for a, b in zip(used, full))  # exactly what the full model would have given
