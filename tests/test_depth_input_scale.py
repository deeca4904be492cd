"""A cheaper depth stream (issue 14): the depth model on R, G, B resized by depth_input_scale (or to depth_input_size).

Checked against a plain reference written here (resize the normalized RGB, run the depth model, drop its prefix,
resample onto the visual grid), for outputs and gradients; scale 1.0 is the default bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from tiny_models import make_depth_model, make_model

from spectralmoe_peft import SpectralMoEConfig

PATCH = 8  # the tiny ViT's patch size
DEPTH_PATCH = 7  # the tiny depth model's


def config(**overrides) -> SpectralMoEConfig:
    settings = dict(num_experts=3, top_k=1, expert_rank=4, num_tokens=5, init_weights=False, scale_init=0.5,
                    depth_hidden_size=48)
    return SpectralMoEConfig(**{**settings, **overrides})


def with_depth(**overrides):
    model = get_peft_model(make_model(), config(**overrides))
    model.set_depth_model(make_depth_model())
    return model.eval()


def depth_inputs(model) -> list[torch.Tensor]:
    """Every input the depth model receives from now on."""
    seen = []
    model.base_model.depth_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"]), with_kwargs=True)
    return seen


def output_and_grads(model, **inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(**inputs).last_hidden_state
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert grads
    return out.detach(), grads


def test_default_is_full_resolution_and_scale_one_is_the_default_bit_for_bit():
    assert SpectralMoEConfig().depth_input_scale == 1.0 and SpectralMoEConfig().depth_input_size is None
    x = torch.rand(2, 3, 32, 32)
    default, scaled = with_depth(), with_depth(depth_input_scale=1.0)
    seen = depth_inputs(default)
    out, grads = output_and_grads(default, pixel_values=x)
    out_1, grads_1 = output_and_grads(scaled, pixel_values=x)
    assert torch.equal(out, out_1) and grads.keys() == grads_1.keys()
    assert all(torch.equal(grads[k], grads_1[k]) for k in grads)
    # the paper's input, unchanged: normalized RGB resized (plain bilinear) to the nearest patch multiple, 35 x 35
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    want = F.interpolate((x - mean) / std, size=(35, 35), mode="bilinear", align_corners=False)
    assert len(seen) == 1 and torch.equal(seen[0], want)


def reference_depth_grids(depth_model, x: torch.Tensor, size: tuple[int, int], visual_grid: tuple[int, int]):
    """The depth stream written out by hand: normalized RGB resized (antialiased bilinear) to ``size``, the depth
    model, its CLS token dropped, each layer's patch grid resampled onto the visual grid: (B, C, H, W) per layer."""
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    rgb = F.interpolate((x[:, :3] - mean) / std, size=size, mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        hidden = depth_model(pixel_values=rgb, output_hidden_states=True).hidden_states
    h, w = size[0] // DEPTH_PATCH, size[1] // DEPTH_PATCH
    grids = []
    for layer in hidden:
        assert layer.shape[1] == 1 + h * w  # one CLS token, then the patches
        grid = layer[:, 1:].transpose(1, 2).reshape(layer.shape[0], -1, h, w)
        grids.append(F.interpolate(grid, size=visual_grid, mode="bilinear", align_corners=False))
    return tuple(grids)


@pytest.mark.parametrize("shape, size", [((56, 56), (28, 28)), ((56, 40), (28, 21))])
def test_half_scale_equals_a_plain_reference_in_output_and_gradients(shape, size):
    model = with_depth(depth_input_scale=0.5)
    x = torch.rand(2, 3, *shape)
    seen = depth_inputs(model)
    out, grads = output_and_grads(model, pixel_values=x)
    assert [tuple(s.shape[-2:]) for s in seen] == [size]
    grids = reference_depth_grids(model.base_model.depth_model, x, size, (shape[0] // PATCH, shape[1] // PATCH))
    want, want_grads = output_and_grads(model, pixel_values=x, depth_hidden_states=grids)
    assert len(seen) == 2  # the reference ran it; the adapter used its grids and did not run the depth model again
    # bit for bit: the same operations in the same order (x * 1.0 + 0.0 is x exactly), only written out by hand
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=0, atol=0, msg=name)
    # and the depth really is another one than at full resolution (the test would pass for any scale otherwise)
    full = reference_depth_grids(model.base_model.depth_model, x, tuple(7 * round(s / 7) for s in shape),
                                 (shape[0] // PATCH, shape[1] // PATCH))
    assert not torch.allclose(full[-1], grids[-1], atol=1e-3)


@pytest.mark.parametrize(
    "overrides, shape, size",
    [
        ({"depth_input_scale": 0.5}, (40, 24), (21, 14)),  # 20 x 12 px snapped to the nearest multiples of 7
        ({"depth_input_scale": 0.25}, (112, 56), (28, 14)),  # exact multiples of 7: no snapping
        ({}, (64, 64), (63, 63)),  # the demo's crops (docs/spectral_inputs.md): 81 tokens
        ({"depth_input_scale": 0.5}, (64, 64), (35, 35)),  # 32 px snapped to 35: 25 tokens
        ({"depth_input_size": 28}, (40, 24), (28, 28)),
        ({"depth_input_size": [30, 20]}, (40, 24), (28, 21)),
        ({"depth_input_size": (70, 35)}, (40, 24), (70, 35)),  # a size may also upsample
    ],
)
def test_depth_model_sees_the_expected_input_size(overrides, shape, size):
    model = with_depth(**overrides)
    seen = depth_inputs(model)
    with torch.no_grad():
        model(pixel_values=torch.rand(1, 3, *shape))
    assert [tuple(s.shape[-2:]) for s in seen] == [size]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_is_resized_in_float32(dtype):
    """The CPU has no half-precision antialiased resize: the input is resized in float32 and keeps its dtype."""
    from spectralmoe_peft.depth import resize_for_depth

    x = torch.rand(2, 3, 40, 24).to(dtype)
    got = resize_for_depth(x, (7, 7), 0.5)
    want = F.interpolate(x.float(), size=(21, 14), mode="bilinear", align_corners=False, antialias=True).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)


def test_depth_pixel_values_are_scaled_the_same_way():
    model = with_depth(depth_input_scale=0.5)
    seen = depth_inputs(model)
    rgb = torch.rand(1, 3, 56, 40)
    with torch.no_grad():
        model(pixel_values=torch.rand(1, 3, 32, 32), depth_pixel_values=rgb)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    want = F.interpolate((rgb - mean) / std, size=(28, 21), mode="bilinear", align_corners=False, antialias=True)
    assert len(seen) == 1 and torch.equal(seen[0], want)


def test_half_scale_runs_the_depth_model_on_a_quarter_of_the_tokens():
    x = torch.rand(1, 3, 56, 56)
    tokens = {}
    for scale in (1.0, 0.5):
        model = with_depth(depth_input_scale=scale)
        grids = model.base_model.compute_depth_hidden_states(x)
        tokens[scale] = grids[-1].shape[-2] * grids[-1].shape[-1]
    assert tokens == {1.0: 64, 0.5: 16}


def test_cached_depth_equals_the_on_the_fly_path_bitwise():
    model = with_depth(depth_input_scale=0.5)
    x = torch.rand(2, 3, 56, 40)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
        cached = model.base_model.compute_depth_hidden_states(x)
        model.set_depth_model(None)  # the cache alone is enough
        got = model(pixel_values=x, depth_hidden_states=cached).last_hidden_state
    assert tuple(cached[-1].shape[-2:]) == (4, 3)  # the 0.5 grid: 28 x 21 px / 7
    assert torch.equal(got, expected)


def test_adapters_with_different_scales_get_different_depth_runs_and_equal_ones_share_one():
    base = make_model()
    model = get_peft_model(base, config(), adapter_name="full")
    model.add_adapter("scaled", config(depth_input_scale=0.5))
    model.add_adapter("scaled_too", config(depth_input_scale=0.5))
    model.add_adapter("sized", config(depth_input_size=28))
    model.set_depth_model(make_depth_model())
    model.base_model.set_adapter(["full", "scaled", "scaled_too", "sized"])
    seen = depth_inputs(model)
    with torch.no_grad():
        model.eval()(pixel_values=torch.rand(1, 3, 56, 56))
    # "scaled" and "scaled_too" share one run; "sized" gets its own although its 28 x 28 px equal "scaled"'s here (the
    # settings differ, and on another input size so would the pixels)
    assert sorted(tuple(s.shape[-2:]) for s in seen) == [(28, 28), (28, 28), (56, 56)]


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"depth_input_scale": 0}, "depth_input_scale"),
        ({"depth_input_scale": -0.5}, "depth_input_scale"),
        ({"depth_input_scale": 1.5}, "depth_input_scale"),
        ({"depth_input_scale": float("nan")}, "depth_input_scale"),
        ({"depth_input_scale": "0.5"}, "depth_input_scale"),
        ({"depth_input_scale": True}, "depth_input_scale"),
        ({"depth_input_size": 0}, "depth_input_size"),
        ({"depth_input_size": 2.5}, "depth_input_size"),
        ({"depth_input_size": [28, 28, 28]}, "depth_input_size"),
        ({"depth_input_size": (0, 28)}, "depth_input_size"),
        ({"depth_input_size": "28"}, "depth_input_size"),
        ({"depth_input_size": 28, "depth_input_scale": 0.5}, "depth_input_size"),
    ],
)
def test_invalid_settings_are_refused_by_name(overrides, field):
    with pytest.raises(ValueError, match=f"SpectralMoEConfig.{field}:"):
        SpectralMoEConfig(**overrides)


def test_a_size_and_a_scale_together_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="depth_input_size: cannot be combined with depth_input_scale=0.5: pass one"):
        SpectralMoEConfig(depth_input_size=28, depth_input_scale=0.5)


def test_settings_are_normalized_to_what_json_gives_back():
    assert SpectralMoEConfig(depth_input_scale=1).depth_input_scale == 1.0
    assert SpectralMoEConfig(depth_input_size=(28, 21)).depth_input_size == [28, 21]
    assert SpectralMoEConfig(depth_input_size=28).depth_input_size == 28


@pytest.mark.parametrize("overrides, field, fix", [
    ({"depth_input_scale": 0.1}, "depth_input_scale", "use depth_input_scale >= 0.219"),  # 7 / 32
    ({"depth_input_size": [28, 5]}, "depth_input_size", "use a size of at least 7x7 px"),
])
def test_a_depth_input_smaller_than_one_patch_is_refused_at_forward_time_by_name(overrides, field, fix):
    model = with_depth(**overrides)
    with pytest.raises(ValueError, match=f"SpectralMoEConfig.{field}=.*smaller than one 7x7 patch.*{fix}"):
        model(pixel_values=torch.rand(1, 3, 32, 32))  # 0.1 x 32 = 3.2 px; 28 x 5 px
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():  # the model stays usable: a large enough input (or cached depth) runs, as it would have
        if field == "depth_input_scale":
            out = model(pixel_values=x).last_hidden_state
        else:
            out = model(pixel_values=x, depth_hidden_states=[torch.rand(1, 48, 4, 4)] * 4).last_hidden_state
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("side", [30, 32, 36])
def test_the_suggested_smallest_scale_works(side):
    """The refusal's suggested scale, as printed, is rounded up: using it runs (7 / 36 = 0.19444 -> 0.195, not 0.194)."""
    import re

    with pytest.raises(ValueError) as refused:
        with_depth(depth_input_scale=0.1)(pixel_values=torch.rand(1, 3, side, side))
    suggested = float(re.search(r"use depth_input_scale >= ([0-9.]+)", str(refused.value)).group(1))
    assert suggested * side >= 7
    with torch.no_grad():
        out = with_depth(depth_input_scale=suggested)(pixel_values=torch.rand(1, 3, side, side)).last_hidden_state
    assert torch.isfinite(out).all()


def test_save_and_load_keep_the_setting(tmp_path):
    x = torch.rand(2, 3, 56, 40)
    for name, overrides in (("scaled", {"depth_input_scale": 0.5}), ("sized", {"depth_input_size": (28, 21)})):
        model = with_depth(**overrides)
        with torch.no_grad():
            expected = model(pixel_values=x).last_hidden_state
        model.save_pretrained(tmp_path / name)
        loaded = PeftModel.from_pretrained(make_model(), tmp_path / name)
        loaded.set_depth_model(make_depth_model())
        saved = loaded.peft_config["default"]
        assert (saved.depth_input_scale, saved.depth_input_size) == (
            overrides.get("depth_input_scale", 1.0), list(overrides["depth_input_size"]) if name == "sized" else None)
        seen = depth_inputs(loaded)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(pixel_values=x).last_hidden_state, expected)
        assert tuple(seen[0].shape[-2:]) == (28, 21)


def test_a_config_saved_without_the_fields_loads_at_full_resolution():
    saved = config().to_dict()
    for key in ("depth_input_scale", "depth_input_size"):
        saved.pop(key)
    loaded = SpectralMoEConfig(**{k: v for k, v in saved.items() if k != "peft_type"})
    assert (loaded.depth_input_scale, loaded.depth_input_size) == (1.0, None)
    assert math.isclose(loaded.scale_init, 0.5)
