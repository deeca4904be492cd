"""Hostile inputs, round two (issue 11): integer rasters, elevation voids, a base model wrapped twice, the ViT as its
own depth model, depth hidden states of the wrong count or width, every depth family on non-square input, prefix
counts that leave no patches, wavelengths that do not match the input, and the small ones."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model
from tiny_models import DEPTH_FAMILIES, HIDDEN, make_depth_family, make_depth_model, make_model

from spectralmoe_peft import SpectralMoEConfig


def config(**overrides) -> SpectralMoEConfig:
    return SpectralMoEConfig(**{"num_experts": 3, "num_tokens": 4, "expert_rank": 2, "init_weights": False,
                                "scale_init": 0.5, **overrides})


def with_depth(**overrides):
    model = get_peft_model(make_model(), config(depth_hidden_size=48, **overrides)).eval()
    model.set_depth_model(make_depth_model())
    return model


def run(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


# --- 1. integer rasters ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, top, rescale", [(torch.uint8, 255, 1 / 255), (torch.int16, 10000, 1e-4)],
                         ids=["uint8 digital numbers", "int16 reflectance x 1e4"])
def test_integer_rasters_give_the_result_of_the_same_values_as_float(dtype, top, rescale):
    model = with_depth(depth_input_rescale=rescale)
    values = torch.randint(0, top + 1, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    from_int = run(model, pixel_values=values.to(dtype))
    from_float = run(model, pixel_values=values.float())
    assert torch.isfinite(from_int).all()
    torch.testing.assert_close(from_int, from_float, rtol=0, atol=0)


def test_integer_raster_with_a_nan_nodata_marker_is_not_garbage():
    model = with_depth(nodata_value=float("nan"), depth_input_rescale=1 / 255)
    out = run(model, pixel_values=torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))
    assert torch.isfinite(out).all()


# --- 4. elevation voids ----------------------------------------------------------------------------------------------


def elevation_model(**overrides):
    return get_peft_model(make_model(), config(depth_source="elevation", **overrides)).train()


def test_elevation_voids_are_masked_like_nodata():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    elevation = torch.rand(2, 1, 32, 32) * 100
    holed = elevation.clone()
    holed[0, 0, 0:4, 0:4] = float("nan")  # one void in patch (0, 0) of sample 0
    holed[1, 0, 8:16, 8:16] = -9999.0  # a fill value equal to nodata_value: patch (1, 1) of sample 1
    model = elevation_model(nodata_value=-9999.0)
    out = model(pixel_values=x, elevation=holed).last_hidden_state
    assert torch.isfinite(out).all() and torch.isfinite(model.get_aux_loss())
    # the fully void patch is left out of the routing statistics; the 1/4-void one stays (the nodata rule: >= half)
    layer = next(m for m in model.modules() if type(m).__name__ == "SpectralMoELayer")
    masks, original = [], layer.refine
    layer.refine = lambda f, d, a, valid=None, **kw: masks.append(valid) or original(f, d, a, valid=valid, **kw)
    model(pixel_values=x, elevation=holed)
    valid = masks[-1]
    assert valid is not None and valid.shape == (2, 16)
    assert valid[0].all() and not valid[1, 5] and valid[1].sum() == 15


def test_elevation_voids_do_not_change_the_other_samples():
    model = elevation_model().eval()
    x, elevation = torch.rand(2, 3, 32, 32), torch.rand(2, 1, 32, 32)
    holed = elevation.clone()
    holed[0, 0, 3, 3] = float("nan")
    with torch.no_grad():
        clean = model(pixel_values=x, elevation=elevation).last_hidden_state
        voided = model(pixel_values=x, elevation=holed).last_hidden_state
    torch.testing.assert_close(voided[1], clean[1], rtol=0, atol=0)
    assert torch.isfinite(voided).all()


# --- 5, 6. state that must not be corrupted -------------------------------------------------------------------------


def test_wrapping_the_same_base_model_twice_is_a_clear_error():
    base = make_model()
    first = get_peft_model(base, config(use_depth=False))
    with pytest.raises(ValueError, match="already carries SpectralMoE adapters"):
        get_peft_model(base, config(use_depth=False))
    out = first(pixel_values=torch.rand(1, 3, 32, 32)).last_hidden_state  # the first one still trains
    out.sum().backward()
    assert first.get_aux_loss() > 0
    assert all(p.grad is not None for n, p in first.named_parameters() if p.requires_grad and "spectralmoe_A" in n)


def test_the_vit_itself_as_depth_model_is_refused_and_freezes_nothing():
    model = get_peft_model(make_model(), config())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for candidate in (model.base_model.model, model.base_model.model.encoder):
        with pytest.raises(ValueError, match="adapted model itself"):
            model.set_depth_model(candidate)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    model.set_depth_model(make_depth_model())
    assert torch.isfinite(model(pixel_values=torch.rand(1, 3, 32, 32)).last_hidden_state).all()


# --- 9. depth hidden states of the wrong count or width -------------------------------------------------------------


def test_depth_hidden_states_of_the_wrong_count_or_width_get_clear_errors():
    model = with_depth()
    x = torch.rand(1, 3, 32, 32)
    reference = run(model, pixel_values=x)
    for count in (2, 7):  # the depth model has 3 layers: 4 hidden states
        with pytest.raises(ValueError, match=f"has {count} entries but the attached depth model has 3 layers"):
            model(pixel_values=x, depth_hidden_states=[torch.randn(1, 48, 4, 4)] * count)
    with pytest.raises(ValueError, match="made for a depth model 48 wide"):
        model(pixel_values=x, depth_hidden_states=[torch.randn(1, 40, 4, 4)] * 4)
    torch.testing.assert_close(run(model, pixel_values=x), reference, rtol=0, atol=0)


# --- 10, 11. every depth family: only its encoder runs, on non-square input --------------------------------------


@pytest.mark.parametrize("family", sorted(DEPTH_FAMILIES))
def test_every_depth_family_runs_only_its_encoder_on_non_square_input(family):
    depth_model = make_depth_family(family)
    heads = []
    for name in ("head", "neck"):
        if hasattr(depth_model, name):
            getattr(depth_model, name).register_forward_hook(lambda *args, n=name: heads.append(n))
    model = get_peft_model(make_model(), config())
    model.set_depth_model(depth_model)
    out = run(model.eval(), pixel_values=torch.rand(2, 3, 32, 56))  # 4 x 7 patches
    assert out.shape == (2, 1 + 28, HIDDEN) and torch.isfinite(out).all()
    assert not heads  # the neck and head would be discarded: they never ran


# --- 14, 15. prefix counts and wavelengths that do not fit the input ------------------------------------------------


def test_a_prefix_count_that_leaves_no_patches_is_an_error_not_a_no_op():
    model = get_peft_model(make_model(), config(use_depth=False, num_prefix_tokens=17))
    with pytest.raises(ValueError, match="num_prefix_tokens=17 .* would leave no patch tokens"):
        model(pixel_values=torch.rand(1, 3, 32, 32))


def test_a_wrong_prefix_count_names_the_setting_not_pixel_values():
    model = get_peft_model(make_model(), config(num_prefix_tokens=2, depth_hidden_size=48))
    model.set_depth_model(make_depth_model())
    with pytest.raises(ValueError, match="15 patch tokens after num_prefix_tokens=2, but pixel_values give a 4x4"):
        model(pixel_values=torch.rand(1, 3, 32, 32))


def test_wavelengths_must_match_the_input_bands():
    with pytest.raises(ValueError, match="lists 6 bands, but the model's patch embedding .* takes 3"):
        with_depth(band_wavelengths_nm=[490, 560, 665, 842, 1610, 2190])  # refused when the adapter is made
    model = with_depth()
    model.peft_config["default"].band_wavelengths_nm = [490.0, 560.0, 665.0, 842.0, 1610.0, 2190.0]  # edited later
    with pytest.raises(ValueError, match="lists 6 bands but pixel_values has 3"):
        model(pixel_values=torch.rand(1, 3, 32, 32))


# --- 16, 18 and the depth model a config names ------------------------------------------------------------------------


def test_routing_stats_after_deleting_the_last_adapter_is_a_clear_error():
    model = get_peft_model(make_model(), config(use_depth=False))
    model(pixel_values=torch.rand(1, 3, 32, 32))
    model.base_model.delete_adapter("default")
    with pytest.raises(ValueError, match="no SpectralMoE adapter left"):
        model.base_model.get_routing_stats()


def test_routing_stats_print_short():
    model = get_peft_model(make_model(), config(use_depth=False))
    model(pixel_values=torch.rand(8, 3, 64, 64))
    text = repr(model.get_routing_stats()[0]["visual"])
    assert "topk_indices=<(8, 64, 1)>" in text and len(text) < 200


def test_a_named_depth_model_with_a_broken_normalization_is_refused(tmp_path):
    folder = tmp_path / "depth"
    make_depth_model().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5],
                                                                 "image_std": [0.2, 0.0, 0.2]}))
    model = get_peft_model(make_model(), config(depth_hidden_size=48))
    with pytest.raises(ValueError, match="unusable normalization"):
        model.set_depth_model(str(folder))
    assert model.base_model.depth_model is None and model.peft_config["default"].depth_model_name_or_path is None
