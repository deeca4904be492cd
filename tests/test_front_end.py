"""Multispectral / hyperspectral front end: depth models of other shapes, band choice, alignment, other depth
sources, nodata, and reloading with a depth model attached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from spectralmoe_peft import SpectralMoEConfig, SpectralMoELayer
from spectralmoe_peft.bands import widen_patch_embedding

TESTS_DIR = Path(__file__).parent
VISUAL = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=16,
              image_size=64, num_register_tokens=2)


def dinov3(num_channels: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tf.DINOv3ViTModel(tf.DINOv3ViTConfig(**VISUAL, num_channels=num_channels)).eval()


def depth_anything(seed: int = 1) -> torch.nn.Module:
    """Depth-Anything-shaped: patch 14, width 48, 3 layers (the ViT: patch 16, width 32, 4 layers)."""
    torch.manual_seed(seed)
    backbone = tf.Dinov2Config(hidden_size=48, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                               image_size=28, patch_size=14, out_features=["stage1", "stage2", "stage3"],
                               reshape_hidden_states=False)
    config = tf.DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=48, patch_size=14,
                                    fusion_hidden_size=16, head_hidden_size=8, neck_hidden_sizes=[8, 16, 24])
    return tf.DepthAnythingForDepthEstimation(config).eval()


def config(**overrides) -> SpectralMoEConfig:
    settings = dict(num_experts=3, top_k=1, expert_rank=4, num_tokens=5, init_weights=False, scale_init=0.5,
                    depth_hidden_size=48)
    return SpectralMoEConfig(**{**settings, **overrides})


@pytest.mark.parametrize("num_bands, rgb", [(4, [1, 2, 3]), (200, [60, 40, 20])])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_depth_anything_on_dinov3_with_many_bands_and_non_square_images(num_bands, rgb, size):
    model = get_peft_model(dinov3(num_channels=num_bands), config(rgb_band_indices=rgb))
    model.set_depth_model(depth_anything())
    model.train()
    x = torch.rand(2, num_bands, *size)
    out = model(pixel_values=x).last_hidden_state
    grid = (size[0] // 16, size[1] // 16)
    assert out.shape == (2, 1 + 2 + grid[0] * grid[1], 32)
    (out.pow(2).mean() + model.get_aux_loss()).backward()
    stats = model.get_routing_stats()
    assert set(stats) == {0, 1, 2, 3} and stats[3]["depth"].grid == grid
    assert model.base_model.spectralmoe_depth_projection["default"].weight.grad.abs().sum() > 0


class PositionDepthModel(torch.nn.Module):
    """A depth model whose patch features are their own position: channel 0 the column centre, channel 1 the row
    centre, as fractions of the image, on a patch-14 grid, behind one CLS token."""

    def __init__(self) -> None:
        super().__init__()
        self.config = tf.Dinov2Config(hidden_size=32, patch_size=14, num_hidden_layers=2)
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values, output_hidden_states=True):
        batch, _, height, width = pixel_values.shape
        h, w = height // 14, width // 14
        features = torch.zeros(batch, 32, h, w)
        features[:, 0] = ((torch.arange(w) + 0.5) / w).expand(h, w)
        features[:, 1] = ((torch.arange(h) + 0.5) / h).unsqueeze(1).expand(h, w)
        tokens = torch.cat([torch.full((batch, 1, 32), -7.0), features.flatten(2).transpose(1, 2)], dim=1)
        return tf.modeling_outputs.BaseModelOutput(hidden_states=(tokens,) * 3)


def test_alignment_ramp_lands_on_the_matching_visual_tokens():
    """Left-right and top-bottom ramps from a patch-14 depth grid arrive at the matching patch-16 visual tokens,
    for a non-square image."""
    model = get_peft_model(dinov3(), config(depth_hidden_size=None))
    model.set_depth_model(PositionDepthModel())
    seen = {}
    layer = next(m for m in model.modules() if isinstance(m, SpectralMoELayer) and m.block_index == 2)
    original = layer.refine

    def spy(feats, depth, adapter_name, valid=None, **kwargs):
        seen["depth"] = depth
        return original(feats, depth, adapter_name, valid=valid, **kwargs)

    layer.refine = spy
    model(pixel_values=torch.rand(1, 3, 96, 160))  # visual grid 6 x 10; depth input 98 x 154 -> grid 7 x 11
    depth = seen["depth"].reshape(1, 6, 10, 32)
    columns = (torch.arange(10) + 0.5) / 10
    rows = (torch.arange(6) + 0.5) / 6
    torch.testing.assert_close(depth[0, :, :, 0], columns.expand(6, 10), atol=0.03, rtol=0)
    torch.testing.assert_close(depth[0, :, :, 1], rows.unsqueeze(1).expand(6, 10), atol=0.03, rtol=0)
    assert (depth[..., 0].diff(dim=2) > 0).all() and (depth[..., 1].diff(dim=1) > 0).all()
    assert (depth[..., 2:] == 0).all()  # the CLS token (-7) was dropped, not resampled in


def test_bands_by_wavelength():
    sentinel2 = [443, 490, 560, 665, 705, 740, 783, 842, 865, 945, 1375, 1610, 2190]
    assert SpectralMoEConfig(band_wavelengths_nm=sentinel2).resolved_rgb_band_indices() == [3, 2, 1]
    assert SpectralMoEConfig().resolved_rgb_band_indices() == [0, 1, 2]
    assert SpectralMoEConfig(rgb_band_indices=[5, 4, 3]).resolved_rgb_band_indices() == [5, 4, 3]
    with pytest.raises(ValueError, match="band_wavelengths_nm"):
        SpectralMoEConfig(band_wavelengths_nm=[1600, 1610, 2190])

    model = get_peft_model(dinov3(num_channels=13), config(band_wavelengths_nm=sentinel2))
    seen = {}
    depth = depth_anything()
    # the adapter runs the depth model's ViT backbone (whose hidden_states it reads), not its head
    depth.backbone.register_forward_pre_hook(lambda module, args, kwargs: seen.update(x=kwargs["pixel_values"]),
                                             with_kwargs=True)
    model.set_depth_model(depth)
    x = torch.rand(1, 13, 56, 56)
    model(pixel_values=x)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen["x"], (x[:, [3, 2, 1]] - mean) / std)


def test_reload_in_a_fresh_process_finds_the_depth_model_by_hub_id(tmp_path):
    """The depth model named by its Hub id (here served from a local Hub cache, offline) is saved in the config and
    loaded again in a fresh process; a local folder is never written into the config (see test_hub.py)."""
    from test_hub import publish

    cache = tmp_path / "hub-cache"
    snapshot = publish(cache, "tiny-org/depth-anything", depth_anything())
    processor = {"image_processor_type": "DPTImageProcessor", "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4]}
    (snapshot / "preprocessor_config.json").write_text(json.dumps(processor))
    model = get_peft_model(dinov3(num_channels=4), config(rgb_band_indices=[2, 1, 0]))
    import huggingface_hub.constants as constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        model.set_depth_model("tiny-org/depth-anything")
    assert model.peft_config["default"].depth_image_mean == [0.4, 0.5, 0.6]  # read from its image processor
    model.eval()
    x = torch.rand(2, 4, 48, 64)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
    model.save_pretrained(tmp_path / "adapter")
    torch.save(x, tmp_path / "x.pt")
    assert all("spectralmoe_" in k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(TESTS_DIR)!r})
        import spectralmoe_peft
        from peft import PeftModel
        from test_front_end import dinov3
        model = PeftModel.from_pretrained(dinov3(num_channels=4), {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():   # no set_depth_model: the Hub id saved in the config is loaded
            out = model(pixel_values=torch.load({str(tmp_path / "x.pt")!r})).last_hidden_state
        assert model.base_model.depth_model is not None
        torch.save(out, {str(tmp_path / "out.pt")!r})
        """
    )
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["depth_model_name_or_path"] == (
        "tiny-org/depth-anything")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_elevation_source_trains_saves_and_reloads(tmp_path):
    model = get_peft_model(dinov3(), config(depth_source="elevation", depth_hidden_size=None))
    x, dsm = torch.rand(2, 3, 64, 48), torch.rand(2, 1, 64, 48) * 30.0
    model.train()
    out = model(pixel_values=x, elevation=dsm).last_hidden_state
    out.pow(2).mean().backward()
    encoder = model.base_model.spectralmoe_elevation_encoder["default"]
    assert encoder.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=x, elevation=dsm).last_hidden_state
        flat = model(pixel_values=x, elevation=torch.zeros_like(dsm)).last_hidden_state
    assert not torch.allclose(expected, flat)
    model.save_pretrained(tmp_path)
    assert any("elevation_encoder" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(dinov3(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x, elevation=dsm).last_hidden_state, expected)
    with pytest.raises(ValueError, match="elevation="):
        loaded(pixel_values=x)


def test_nodata_patches_stay_out_of_routing_statistics():
    model = get_peft_model(dinov3(num_channels=4), config(use_depth=False, nodata_value=-9999.0, top_k=1))
    layer = next(m for m in model.modules() if isinstance(m, SpectralMoELayer))
    masks, original = [], layer.refine

    def spy(feats, depth, adapter_name, valid=None, **kwargs):
        masks.append(valid)
        return original(feats, depth, adapter_name, valid=valid, **kwargs)

    layer.refine = spy
    x = torch.rand(1, 4, 64, 64)
    x[:, :, :32, :] = -9999.0  # the top half of the image is nodata: patch rows 0-1 of 4
    model(pixel_values=x)
    mask = masks[-1]
    assert mask.shape == (1, 16) and mask[0, :8].logical_not().all() and mask[0, 8:].all()
    stats = model.get_routing_stats()[0]["visual"]
    chosen = stats.topk_indices[0, 8:, 0]
    expected_load = torch.bincount(chosen, minlength=3).float() / 8
    torch.testing.assert_close(stats.expert_load, expected_load)
    with pytest.raises(ValueError, match="nodata_mask"):
        model(pixel_values=x, nodata_mask=torch.zeros(1, 10, 10, dtype=torch.bool))
    model(pixel_values=torch.rand(1, 4, 64, 64), nodata_mask=torch.ones(1, 64, 64, dtype=torch.bool))
    assert not masks[-1].any()


def test_widened_patch_embedding_is_trained_and_saved_with_the_adapter(tmp_path):
    base = dinov3()
    path = widen_patch_embedding(base, 6, rgb_band_indices=[2, 1, 0])
    grey = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        rgb_out = dinov3()(pixel_values=grey.expand(-1, 3, -1, -1)).last_hidden_state
        wide_out = base(pixel_values=grey.expand(-1, 6, -1, -1)).last_hidden_state
    torch.testing.assert_close(wide_out, rgb_out, rtol=1e-4, atol=1e-5)  # same scale on band-constant input

    model = get_peft_model(base, config(use_depth=False, modules_to_save=[path]))
    assert any(path in n and p.requires_grad for n, p in model.named_parameters())
    x = torch.rand(2, 6, 64, 64)
    model.train()
    model(pixel_values=x).last_hidden_state.pow(2).mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
    model.save_pretrained(tmp_path)
    fresh = dinov3()
    widen_patch_embedding(fresh, 6, rgb_band_indices=[2, 1, 0])
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).last_hidden_state, expected)
    with pytest.raises(ValueError, match="RGB"):
        widen_patch_embedding(dinov3(num_channels=4), 6)


def test_front_end_errors():
    with pytest.raises(ValueError, match=r"rgb_band_indices: is out of range for num_input_bands=4"):
        get_peft_model(dinov3(num_channels=4), config(rgb_band_indices=[4, 1, 0]))  # refused when created
    two_band = get_peft_model(dinov3(num_channels=2), config())
    two_band.set_depth_model(depth_anything())
    with pytest.raises(ValueError, match="3 bands"):
        two_band(pixel_values=torch.rand(1, 2, 64, 64))
    with pytest.raises(ValueError, match="no depth source"):
        get_peft_model(dinov3(), config())(pixel_values=torch.rand(1, 3, 64, 64))

    class NoHiddenStates(torch.nn.Module):
        config = tf.Dinov2Config(hidden_size=48, patch_size=14)

        def forward(self, pixel_values, output_hidden_states=True):
            return tf.modeling_outputs.BaseModelOutput(last_hidden_state=pixel_values)

    silent = get_peft_model(dinov3(), config())
    silent.set_depth_model(NoHiddenStates())
    with pytest.raises(ValueError, match="no hidden_states"):
        silent(pixel_values=torch.rand(1, 3, 64, 64))
    explicit = get_peft_model(dinov3(), config(depth_num_prefix_tokens=1))
    with pytest.raises(ValueError, match="aspect ratio"):  # 1 + 7 tokens cannot form a 4 x 4-shaped grid
        explicit(pixel_values=torch.rand(1, 3, 64, 64), depth_hidden_states=[torch.rand(1, 8, 48)] * 3)


# --- bands travel with the adapter ------------------------------------------------------------------------------------
SENTINEL2 = dict(band_names=["B02", "B03", "B04", "B08", "B11", "B12"], band_wavelengths_nm=[490, 560, 665, 842, 1610,
                                                                                              2190])


def test_the_adapter_config_records_the_bands_of_the_model_it_is_made_on():
    native = get_peft_model(dinov3(num_channels=4), config(use_depth=False)).peft_config["default"]
    assert (native.num_input_bands, native.rgb_band_indices, native.widened_patch_embedding) == (4, [0, 1, 2], None)

    base = dinov3()
    path = widen_patch_embedding(base, **SENTINEL2)  # R, G, B from the wavelengths: bands 2, 1, 0
    recorded = get_peft_model(base, config(use_depth=False)).peft_config["default"]
    assert recorded.num_input_bands == 6 and recorded.rgb_band_indices == [2, 1, 0]
    assert recorded.band_names == SENTINEL2["band_names"] and recorded.band_wavelengths_nm == [490.0, 560.0, 665.0,
                                                                                              842.0, 1610.0, 2190.0]
    assert recorded.widened_patch_embedding == path == "embeddings.patch_embeddings"

    named = dinov3()
    widen_patch_embedding(named, band_names=["nir", "Blue", "Green", "Red", "swir"])
    assert get_peft_model(named, config(use_depth=False)).peft_config["default"].rgb_band_indices == [3, 2, 1]


def test_widen_by_wavelength_is_widen_by_the_indices_it_picks():
    by_index, by_wavelength = dinov3(), dinov3()
    widen_patch_embedding(by_index, 6, rgb_band_indices=[2, 1, 0])
    widen_patch_embedding(by_wavelength, band_wavelengths_nm=SENTINEL2["band_wavelengths_nm"])
    torch.testing.assert_close(by_wavelength.embeddings.patch_embeddings.weight,
                               by_index.embeddings.patch_embeddings.weight, rtol=0, atol=0)
    # the R filter sits on band 2, scaled by 3/6; band 3 (NIR) gets the mean of R, G, B
    rgb = dinov3().embeddings.patch_embeddings.weight
    wide = by_index.embeddings.patch_embeddings.weight
    torch.testing.assert_close(wide[:, 2], rgb[:, 0] * 0.5)
    torch.testing.assert_close(wide[:, 3], rgb.mean(dim=1) * 0.5)


@pytest.mark.parametrize("saved_embedding", [True, False])
def test_a_multi_band_adapter_loads_onto_the_rgb_base_and_widens_it(tmp_path, saved_embedding):
    """PeftModel.from_pretrained(rgb_base, path) widens the patch embedding again: with it in modules_to_save its
    trained weights are loaded; frozen, the same widening of the same RGB weights reproduces it exactly."""
    base = dinov3()
    path = widen_patch_embedding(base, **SENTINEL2)
    model = get_peft_model(base, config(modules_to_save=[path] if saved_embedding else None))
    model.set_depth_model(depth_anything())
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)  # as trained
    model.eval()
    x = torch.rand(2, 6, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
    model.save_pretrained(tmp_path)
    rgb_base = dinov3()
    loaded = PeftModel.from_pretrained(rgb_base, tmp_path).eval()
    loaded.set_depth_model(depth_anything())
    assert rgb_base.embeddings.patch_embeddings.in_channels == 6
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).last_hidden_state, expected)
    loaded.load_adapter(tmp_path, adapter_name="again")  # a second adapter on the widened (and wrapped) embedding
    assert loaded.peft_config["again"].widened_patch_embedding == path
    loaded.set_adapter("again")
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).last_hidden_state, expected)
    # the old way (widening the fresh base by hand first) keeps working
    by_hand = dinov3()
    widen_patch_embedding(by_hand, 6, rgb_band_indices=[2, 1, 0])
    loaded = PeftModel.from_pretrained(by_hand, tmp_path).eval()
    loaded.set_depth_model(depth_anything())
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).last_hidden_state, expected)


def test_a_base_with_other_bands_is_refused_with_the_call_that_fixes_it(tmp_path):
    get_peft_model(dinov3(num_channels=6), config(use_depth=False, rgb_band_indices=[2, 1, 0])).save_pretrained(
        tmp_path / "native")  # a natively 6-band ViT: nothing recorded to widen
    rgb_base = dinov3()
    with pytest.raises(ValueError, match=r"trained on 6 input bands.*takes 3: call widen_patch_embedding\(base, "
                                         r"num_bands=6, rgb_band_indices=\[2, 1, 0\]\)"):
        PeftModel.from_pretrained(rgb_base, tmp_path / "native")
    assert rgb_base.embeddings.patch_embeddings.in_channels == 3  # untouched
    with pytest.raises(ValueError, match="trained on 6 input bands.*takes 4: load it onto a base model whose patch "
                                         "embedding takes 6 bands"):
        PeftModel.from_pretrained(dinov3(num_channels=4), tmp_path / "native")


def test_band_mistakes_are_refused_when_the_adapter_is_created():
    with pytest.raises(ValueError, match=r"band_wavelengths_nm: lists 6 bands, but the model's patch embedding .* "
                                         r"takes 3.*widen_patch_embedding\(model, band_wavelengths_nm=\.\.\.\)"):
        get_peft_model(dinov3(), config(band_wavelengths_nm=SENTINEL2["band_wavelengths_nm"]))
    base = dinov3()
    widen_patch_embedding(base, 6, rgb_band_indices=[2, 1, 0])
    with pytest.raises(ValueError, match=r"rgb_band_indices: .*\[3, 1, 0\].*widened with its R, G, B filters on "
                                         r"bands \[2, 1, 0\]"):
        get_peft_model(base, config(rgb_band_indices=[3, 1, 0]))
    assert get_peft_model(base, config(rgb_band_indices=[2, 1, 0])).peft_config["default"].num_input_bands == 6
    with pytest.raises(ValueError, match="already carries PEFT adapters"):
        widen_patch_embedding(get_peft_model(dinov3(), config(use_depth=False)), 6)
    with pytest.raises(ValueError, match="band counts disagree"):
        widen_patch_embedding(dinov3(), 5, band_names=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="no distinct bands near"):
        widen_patch_embedding(dinov3(), band_wavelengths_nm=[1600, 1610, 2190])


def test_an_adapter_saved_before_bands_were_recorded_keeps_its_bands_on_a_base_widened_by_hand(tmp_path):
    """0.1.0 configs have no band fields: loaded onto a base widened by hand (R, G, B filters on bands 2, 1, 0), the
    adapter keeps reading bands 0, 1, 2 for depth, as it was trained, and records that."""
    get_peft_model(dinov3(num_channels=6), config(use_depth=False)).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    for name in ("num_input_bands", "band_names", "widened_patch_embedding", "rgb_band_indices"):
        saved.pop(name)
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    base = dinov3()
    widen_patch_embedding(base, band_names=["B02", "B03", "B04", "B08", "B11", "B12"], rgb_band_indices=[2, 1, 0])
    loaded = PeftModel.from_pretrained(base, tmp_path).peft_config["default"]
    assert (loaded.num_input_bands, loaded.rgb_band_indices, loaded.widened_patch_embedding) == (6, [0, 1, 2], None)
    assert loaded.band_names == ["B02", "B03", "B04", "B08", "B11", "B12"]
