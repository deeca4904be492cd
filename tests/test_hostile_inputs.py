"""Hostile inputs and states: each gets a clear error that names the problem, or a documented, tested behaviour.

After every failing forward the model must stay usable: the next valid forward gives exactly the output it gave
before the failure, and get_aux_loss() still answers.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from tiny_models import HIDDEN, main_output, make_depth_model, make_model

from spectralmoe_peft import SpectralMoEConfig, SpectralMoELayer
from spectralmoe_peft.depth import patch_validity

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]


def config(**overrides) -> SpectralMoEConfig:
    settings = {"num_experts": 3, "top_k": 2, "expert_rank": 4, "num_tokens": 5, "use_depth": False,
                "init_weights": False, "scale_init": 0.5}
    return SpectralMoEConfig(**{**settings, **overrides})


def images(batch: int = 2, channels: int = 3, size=(32, 32), seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(seed))


def grid_depth(num: int = 3, batch: int = 2, width: int = HIDDEN, seed: int = 11) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, width, 4, 4, generator=generator) for _ in range(num))


def run(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(**kwargs))


def assert_still_usable(model, reference: torch.Tensor, **clean_kwargs) -> None:
    """The clean forward gives exactly the pre-failure output, and the aux loss / routing stats answer."""
    assert torch.equal(run(model, **clean_kwargs), reference)
    aux = model.get_aux_loss()
    assert aux.ndim == 0 and torch.isfinite(aux)
    assert model.get_routing_stats()


@pytest.fixture
def visual_model():
    return get_peft_model(make_model("dinov2"), config()).eval()


@pytest.fixture
def depth_model():
    return get_peft_model(make_model("dinov2"), config(use_depth=True)).eval()


# --- NaN / Inf ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_pixels_propagate_without_raising_and_stay_in_their_sample(visual_model, bad):
    """Documented: non-finite pixels are not checked; they reach the output as NaN/Inf (no exception inside the
    adapter), only in the sample that carried them (routing and experts are per token, the ViT attends per image).
    The aux loss of that forward is NaN (the balance loss pools the batch). The next clean forward is unaffected."""
    x = images()
    reference = run(visual_model, pixel_values=x)
    poisoned = x.clone()
    poisoned[0, 1, 5, 9] = bad
    out = run(visual_model, pixel_values=poisoned)
    assert not torch.isfinite(out[0]).all()
    torch.testing.assert_close(out[1], reference[1], rtol=1e-5, atol=1e-6)
    assert torch.isnan(visual_model.get_aux_loss())
    assert_still_usable(visual_model, reference, pixel_values=x)


def test_non_finite_pixels_through_the_depth_model_stay_in_their_sample():
    model = get_peft_model(make_model("dinov2"), config(use_depth=True, depth_hidden_size=48)).eval()
    model.set_depth_model(make_depth_model())
    x = images()
    reference = run(model, pixel_values=x)
    poisoned = x.clone()
    poisoned[1, 0, 0, 0] = float("nan")
    out = run(model, pixel_values=poisoned)
    assert torch.isnan(out[1]).any() and torch.isfinite(out[0]).all()
    torch.testing.assert_close(out[0], reference[0], rtol=1e-5, atol=1e-6)
    assert_still_usable(model, reference, pixel_values=x)


# --- channels, image size, empty batch ------------------------------------------------------------------------------


def test_model_stays_usable_after_the_base_model_raises(visual_model):
    """The base model's own errors (here: too many channels) leave the adapter's per-forward state usable."""
    x = images()
    reference = run(visual_model, pixel_values=x)
    with pytest.raises(ValueError):
        visual_model(pixel_values=images(channels=4))
    assert_still_usable(visual_model, reference, pixel_values=x)


def test_depth_needs_three_bands_and_in_range_rgb_indices():
    two_band = get_peft_model(make_model("dinov2", num_channels=2), config(use_depth=True, depth_hidden_size=48))
    two_band.set_depth_model(make_depth_model())
    with pytest.raises(ValueError, match="needs 3 bands.*has 2"):
        two_band(pixel_values=images(channels=2))

    with pytest.raises(ValueError, match=r"rgb_band_indices: is out of range for num_input_bands=4"):  # at creation
        get_peft_model(make_model("dinov2", num_channels=4),
                       config(use_depth=True, depth_hidden_size=48, rgb_band_indices=[0, 1, 5]))
    four_band = get_peft_model(
        make_model("dinov2", num_channels=4), config(use_depth=True, depth_hidden_size=48, rgb_band_indices=[0, 1, 2])
    ).eval()
    four_band.set_depth_model(make_depth_model())
    for cfg in four_band.peft_config.values():
        cfg.rgb_band_indices = [0, 1, 5]  # changed after creation: caught by the forward
    with pytest.raises(ValueError, match=r"rgb_band_indices=\[0, 1, 5\] is out of range for an input with 4 bands"):
        four_band(pixel_values=images(channels=4))
    # fixing the band choice on the same model works
    for cfg in four_band.peft_config.values():
        cfg.rgb_band_indices = [3, 2, 1]
    out = run(four_band, pixel_values=images(channels=4))
    assert out.shape == (2, 1 + 16, HIDDEN) and torch.isfinite(out).all()
    assert torch.isfinite(four_band.get_aux_loss())


@pytest.mark.parametrize("size, grid", [((36, 36), (4, 4)), ((36, 44), (4, 5)), ((39, 33), (4, 4))])
def test_image_size_not_divisible_by_patch_size_dinov2_floors_the_grid(size, grid):
    """Documented: Dinov2 patch-embeds with a stride-8 conv, dropping the remainder pixels (floor), and interpolates
    its position embeddings. The adapter's grid is the same floor(H/p) x floor(W/p), so with an identity adapter the
    output equals the base model's, and the routing grid is the floored one."""
    x = images(size=size)
    base_out = run(make_model("dinov2"), pixel_values=x)
    identity = get_peft_model(make_model("dinov2"), config(init_weights=True)).eval()
    assert torch.equal(run(identity, pixel_values=x), base_out)
    assert base_out.shape == (2, 1 + grid[0] * grid[1], HIDDEN)

    model = get_peft_model(make_model("dinov2"), config(use_depth=True, depth_hidden_size=48)).eval()
    model.set_depth_model(make_depth_model())
    out = run(model, pixel_values=x)
    assert out.shape == base_out.shape and torch.isfinite(out).all()
    stats = model.get_routing_stats()
    assert stats[0]["visual"].grid == grid and stats[1]["depth"].grid == grid


def test_refinement_itself_accepts_an_empty_batch(depth_model):
    layer = next(m for m in depth_model.modules() if isinstance(m, SpectralMoELayer))
    refined = layer.refine(torch.randn(0, 16, HIDDEN), torch.randn(0, 16, HIDDEN), "default")
    assert refined.tokens.shape == (0, 16, HIDDEN)
    assert set(refined.routing) == {"visual", "depth"}
    assert all(torch.isfinite(r.balance_loss) and torch.isfinite(r.z_loss) for r in refined.routing.values())


# --- depth_hidden_states --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hidden_states, message",
    [
        (grid_depth(1), "needs at least 2 entries; got 1"),
        ((), "needs at least 2 entries; got 0"),
        (torch.randn(3, 2, HIDDEN, 4, 4), "must be a tuple/list of per-layer tensors"),
        (grid_depth(3, batch=3), "Depth features have batch size 3 but the images have 2"),
        (grid_depth(3, width=16), "Depth features are 16 wide but the ViT is 32 wide"),
        (tuple(torch.randn(2, 17, HIDDEN) for _ in range(3)), "need SpectralMoEConfig.depth_num_prefix_tokens"),
        (tuple(torch.randn(2, HIDDEN) for _ in range(3)), r"must be \(B, tokens, C\) or \(B, C, h, w\); got \(2, 32\)"),
        (tuple(torch.randn(2, HIDDEN, 4, 4, 1) for _ in range(3)), r"must be \(B, tokens, C\) or \(B, C, h, w\)"),
    ],
    ids=["one-entry", "empty", "stacked-tensor", "batch", "width", "tokens-without-prefix-count", "2d", "5d"],
)
def test_bad_depth_hidden_states_give_clear_errors(depth_model, hidden_states, message):
    x, depth = images(), grid_depth(3)
    reference = run(depth_model, pixel_values=x, depth_hidden_states=depth)
    with pytest.raises(ValueError, match=message):
        depth_model(pixel_values=x, depth_hidden_states=hidden_states)
    assert_still_usable(depth_model, reference, pixel_values=x, depth_hidden_states=depth)


def test_depth_tokens_that_fit_no_grid_give_a_clear_error():
    model = get_peft_model(make_model("dinov2"), config(use_depth=True, depth_num_prefix_tokens=1)).eval()
    with pytest.raises(ValueError, match="Cannot arrange 7 depth tokens on a grid"):
        model(pixel_values=images(), depth_hidden_states=tuple(torch.randn(2, 1 + 7, HIDDEN) for _ in range(3)))
    out = run(model, pixel_values=images(), depth_hidden_states=tuple(torch.randn(2, 1 + 9, HIDDEN) for _ in range(3)))
    assert torch.isfinite(out).all()


def test_missing_depth_source_gives_a_clear_error(depth_model):
    with pytest.raises(ValueError, match="uses depth .*no depth source was given"):
        depth_model(pixel_values=images())


def test_failure_inside_the_blocks_makes_the_routing_getters_raise(depth_model):
    """A forward that fails inside the blocks has already reset the per-forward state: reading its (partial)
    aux loss could feed a silent 0 into training, so the getters raise until the next successful forward."""
    x, depth = images(), grid_depth(3)
    run(depth_model, pixel_values=x, depth_hidden_states=depth)
    aux = depth_model.get_aux_loss()
    assert aux > 0
    with pytest.raises(ValueError, match="batch size 3"):
        depth_model(pixel_values=x, depth_hidden_states=grid_depth(3, batch=3))
    with pytest.raises(RuntimeError, match="raised before it finished"):
        depth_model.get_aux_loss()
    with pytest.raises(RuntimeError, match="raised before it finished"):
        depth_model.get_routing_stats()
    run(depth_model, pixel_values=x, depth_hidden_states=depth)
    assert torch.equal(depth_model.get_aux_loss(), aux)


def test_failure_before_the_blocks_keeps_the_previous_forwards_routing_state(depth_model):
    x, depth = images(), grid_depth(3)
    run(depth_model, pixel_values=x, depth_hidden_states=depth)
    aux = depth_model.get_aux_loss()
    with pytest.raises(ValueError, match="at least 2 entries"):
        depth_model(pixel_values=x, depth_hidden_states=grid_depth(1))
    assert torch.equal(depth_model.get_aux_loss(), aux)


# --- nodata ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 16, 16), (3, 32, 32), (2, 32), (2, 3, 16, 16)])
def test_nodata_mask_of_the_wrong_shape_is_a_clear_error(visual_model, shape):
    x = images()
    reference = run(visual_model, pixel_values=x)
    with pytest.raises(ValueError, match=r"nodata_mask must be \(batch, height, width\) = \(2, 32, 32\)"):
        visual_model(pixel_values=x, nodata_mask=torch.zeros(shape, dtype=torch.bool))
    assert_still_usable(visual_model, reference, pixel_values=x)


def test_nodata_mask_per_band_is_reduced_with_any(visual_model):
    x = images()
    reference = run(visual_model, pixel_values=x)
    out = run(visual_model, pixel_values=x, nodata_mask=torch.zeros(2, 3, 32, 32, dtype=torch.bool))
    assert torch.equal(out, reference)  # masking only changes statistics, never the features


def test_nan_nodata_value_marks_exactly_the_nan_patches_invalid():
    """A patch is invalid when over half its pixels are NaN in any band; every other patch stays valid."""
    config(nodata_value=float("nan"))  # accepted by the config
    x = torch.rand(2, 3, 32, 48)  # a 4 x 6 patch grid, not square: a height/width swap cannot fit
    x[0, :, :16, :16] = float("nan")  # patches (0, 0), (0, 1), (1, 0), (1, 1): nodata in every band
    x[0, 1, 24:32, 0:8] = float("nan")  # patch (3, 0): nodata in one band only, which makes its pixels invalid
    x[0, :, 16:20, 40:48] = float("nan")  # patch (2, 5): exactly half its pixels nodata, so still valid
    x[0, :, 24:28, 40:48] = float("nan")
    x[0, 0, 28, 40] = float("nan")  # patch (3, 5): 33 of 64 pixels nodata, invalid
    x[0, 2, 0:8, 40:48] = 0.0  # patch (0, 5): zeros are data when the marker is NaN
    expected = torch.ones(2, 4, 6, dtype=torch.bool)
    expected[0, :2, :2] = expected[0, 3, 0] = expected[0, 3, 5] = False
    valid = patch_validity(x, None, float("nan"), (8, 8))
    assert torch.equal(valid.reshape(2, 4, 6), expected)
    per_band = patch_validity(x, None, [float("nan"), 5.0, 5.0], (8, 8))  # NaN marks nodata in band 0 only
    expected_per_band = torch.ones(2, 4, 6, dtype=torch.bool)
    expected_per_band[0, :2, :2] = expected_per_band[0, 3, 5] = False
    assert torch.equal(per_band.reshape(2, 4, 6), expected_per_band)


def test_per_band_nodata_value_of_the_wrong_length_is_a_clear_error():
    model = get_peft_model(make_model("dinov2"), config(nodata_value=[0.0, 0.0])).eval()
    with pytest.raises(ValueError, match="nodata_value"):
        model(pixel_values=images())


def test_masked_tokens_stay_out_of_the_gate_entropy():
    """DESIGN/config: flagged patches 'stay out of routing statistics': the expert load and the gate entropy."""
    model = get_peft_model(make_model("dinov2"), config(num_experts=4, top_k=1, gating="softmax")).eval()
    x = images(seed=3)
    x[1] *= 5
    mask = torch.zeros(2, 32, 32, dtype=torch.bool)
    mask[1] = True  # the whole second image is nodata
    run(model, pixel_values=x, nodata_mask=mask)
    masked = model.get_routing_stats()[0]["visual"]
    run(model, pixel_values=x[:1])
    alone = model.get_routing_stats()[0]["visual"]
    torch.testing.assert_close(masked.expert_load, alone.expert_load)
    torch.testing.assert_close(masked.gate_entropy, alone.gate_entropy, rtol=1e-5, atol=1e-6)


# --- elevation (depth_source="elevation") ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "elevation, message",
    [
        (None, "uses depth_source='elevation': pass the nDSM/DEM raster"),
        (torch.randn(3, 1, 32, 32), "elevation has batch size 3, the images 2"),
        (torch.randn(1, 32, 32), "elevation has batch size 1, the images 2"),
        (torch.randn(2, 2, 32, 32), r"elevation must be \(batch, 1, height, width\); got \(2, 2, 32, 32\)"),
    ],
    ids=["missing", "batch", "batch-3d", "two-channels"],
)
def test_bad_elevation_gives_clear_errors(elevation, message):
    model = get_peft_model(make_model("dinov2"), config(use_depth=True, depth_source="elevation")).eval()
    x, good = images(), torch.randn(2, 1, 32, 32)
    reference = run(model, pixel_values=x, elevation=good)
    kwargs = {} if elevation is None else {"elevation": elevation}
    with pytest.raises(ValueError, match=message):
        model(pixel_values=x, **kwargs)
    assert_still_usable(model, reference, pixel_values=x, elevation=good)


def test_flat_or_resized_elevation_gives_finite_outputs():
    model = get_peft_model(make_model("dinov2"), config(use_depth=True, depth_source="elevation")).eval()
    for elevation in (torch.full((2, 1, 32, 32), 312.0), torch.randn(2, 17, 13)):  # flat; another size, no channel
        out = run(model, pixel_values=images(), elevation=elevation)
        assert out.shape == (2, 17, HIDDEN) and torch.isfinite(out).all()


def test_single_pixel_elevation_is_a_flat_raster():
    """A 1 x 1 raster is accepted without a warning: standardized per raster, any constant raster (one pixel
    included) is featureless, so it gives exactly the output of a flat full-size raster."""
    model = get_peft_model(make_model("dinov2"), config(use_depth=True, depth_source="elevation")).eval()
    x = images()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(model, pixel_values=x, elevation=torch.ones(2, 1, 1, 1))
    assert not [w for w in caught if not issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert out.shape == (2, 17, HIDDEN) and torch.isfinite(out).all()
    assert torch.equal(out, run(model, pixel_values=x, elevation=torch.full((2, 1, 32, 32), 312.0)))
    assert not torch.equal(out, run(model, pixel_values=x, elevation=torch.randn(2, 1, 32, 32)))


# --- before any forward ---------------------------------------------------------------------------------------------


def test_aux_loss_and_routing_stats_before_any_forward_raise(visual_model):
    with pytest.raises(RuntimeError, match=r"get_aux_loss\(\).*run a forward pass first"):
        visual_model.get_aux_loss()
    with pytest.raises(RuntimeError, match=r"get_routing_stats\(\).*run a forward pass first"):
        visual_model.get_routing_stats()


def test_aux_loss_before_forward_still_raises_after_a_failed_pre_hook(visual_model):
    with pytest.raises(ValueError, match="nodata_mask"):
        visual_model(pixel_values=images(), nodata_mask=torch.zeros(1, 1, 1, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="run a forward pass first"):
        visual_model.get_aux_loss()


def test_routing_stats_of_an_unknown_adapter_is_a_clear_error(visual_model):
    run(visual_model, pixel_values=images())
    with pytest.raises((ValueError, KeyError), match="typo"):
        visual_model.get_routing_stats("typo")


def test_depth_inputs_given_to_a_visual_only_adapter_are_dropped_silently(visual_model):
    """Documented (odd, against DESIGN's 'nothing is silently ignored'): the pre-hook pops depth_hidden_states /
    elevation / depth_pixel_values whatever they hold when no active adapter uses depth (needed so that the same call
    works under disable_adapter()), so even garbage there is ignored without a word."""
    x = images()
    reference = run(visual_model, pixel_values=x)
    garbage = {"depth_hidden_states": (torch.randn(5),), "elevation": "not a raster", "depth_pixel_values": object()}
    assert torch.equal(run(visual_model, pixel_values=x, **garbage), reference)


# --- loading adapters that do not fit -------------------------------------------------------------------------------


@pytest.fixture
def saved_adapter(tmp_path):
    model = get_peft_model(make_model("dinov2"), config()).eval()
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_adapter_from_a_narrower_vit_names_the_width_mismatch(saved_adapter):
    _, path = saved_adapter
    with pytest.raises(ValueError, match=r"shape mismatches \(was it trained on a ViT of another width.*\(3, 4, 32\) "
                                         r"vs model \(3, 4, 48\)"):
        PeftModel.from_pretrained(make_model("dinov2", hidden_size=48), path)
    target = get_peft_model(make_model("dinov2", hidden_size=48), config())
    with pytest.raises(ValueError, match=r"adapter \['other'\] does not fit this model.*shape mismatches"):
        target.load_adapter(str(path), adapter_name="other")


def test_adapter_from_a_shallower_vit_names_the_missing_blocks(saved_adapter):
    _, path = saved_adapter
    with pytest.raises(ValueError, match=r"4 adapter tensors missing from the checkpoint.*layer\.2\.spectralmoe_A"):
        PeftModel.from_pretrained(make_model("dinov2", num_hidden_layers=3), path)


def test_adapter_from_a_deeper_vit_names_the_extra_blocks(saved_adapter):
    _, path = saved_adapter
    with pytest.raises(ValueError, match=r"4 checkpoint tensors this model has no place for.*deeper ViT"):
        PeftModel.from_pretrained(make_model("dinov2", num_hidden_layers=1), path)


def test_config_edited_against_its_weights_names_the_mismatch(saved_adapter):
    _, path = saved_adapter
    config_file = path / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data["num_experts"] = 4
    config_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"shape mismatches.*num_experts"):
        PeftModel.from_pretrained(make_model("dinov2"), path)
    data["num_experts"] = 0
    config_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"SpectralMoEConfig.num_experts: must be an integer >= 1 \(got 0\)"):
        PeftConfig.from_pretrained(path)


def test_unknown_config_fields_from_a_newer_version_are_ignored_with_a_warning(saved_adapter, tmp_path):
    """An adapter saved by a newer version (config fields this one does not know) loads, with a warning that
    names the fields, and gives exactly the saved model's outputs."""
    model, path = saved_adapter
    newer = tmp_path / "newer"
    shutil.copytree(path, newer)
    config_file = newer / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data.update(future_knob=123, routing_v2={"a": 1})
    config_file.write_text(json.dumps(data))

    with pytest.warns(UserWarning, match=r"future_knob.*routing_v2"):
        loaded_config = PeftConfig.from_pretrained(newer)
    assert isinstance(loaded_config, SpectralMoEConfig)
    assert not hasattr(loaded_config, "future_knob")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(make_model("dinov2"), newer).eval()
    assert any("future_knob" in str(w.message) for w in caught)
    x = images()
    assert torch.equal(run(loaded, pixel_values=x), run(model, pixel_values=x))
