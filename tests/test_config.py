"""Bad configuration is refused up front, with a ValueError that names the field."""

from __future__ import annotations

import pytest
from peft import PeftConfig, PeftType

from spectralmoe_peft import SpectralMoEConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_experts": 3, "top_k": 4}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"num_experts": 0}, "num_experts"),
        ({"gating": "cosine"}, "gating"),
        ({"num_tokens": 1}, "num_tokens"),
        ({"expert_rank": 0}, "expert_rank"),
        ({"fusion": "concat"}, "fusion"),
        ({"init_weights": "gaussian"}, "init_weights"),
        ({"rgb_band_indices": [0, 1]}, "rgb_band_indices"),
        ({"rgb_band_indices": [0, 0, 1]}, "rgb_band_indices"),
        ({"rgb_band_indices": [-1, 0, 1]}, "rgb_band_indices"),
        ({"balance_loss_weight": -1.0}, "balance_loss_weight"),
        ({"scale_init": float("nan")}, "scale_init"),
        ({"depth_image_std": [1.0, 0.0, 1.0]}, "depth_image_std"),
        ({"depth_input_rescale": [1.0, 2.0]}, "depth_input_rescale"),
        ({"layers_to_transform": [0, -1]}, "layers_to_transform"),
        ({"num_prefix_tokens": -1}, "num_prefix_tokens"),
        ({"depth_hidden_size": 0}, "depth_hidden_size"),
        # types: values that Python would take as truthy, or that peft would iterate character by character
        ({"use_depth": "no"}, "use_depth"),
        ({"noisy_gating": "off"}, "noisy_gating"),
        ({"share_gates": "yes"}, "share_gates"),
        ({"use_depth": 1}, "use_depth"),
        ({"init_weights": 1}, "init_weights"),
        ({"init_weights": "true"}, "init_weights"),
        ({"target_modules": 5}, "target_modules"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ["layer.0", 3]}, "target_modules"),
        ({"target_modules": "layer("}, "target_modules"),
        ({"exclude_modules": 7}, "exclude_modules"),
        ({"modules_to_save": "decode_head"}, "modules_to_save"),
        ({"modules_to_save": ["decode_head", None]}, "modules_to_save"),
        ({"num_experts": 2.0}, "num_experts"),
        ({"num_experts": True}, "num_experts"),
        ({"top_k": "1"}, "top_k"),
        ({"gating": ["laplace"]}, "gating"),
        ({"depth_source": None}, "depth_source"),
        ({"scale_init": "0.001"}, "scale_init"),
        ({"scale_init": True}, "scale_init"),
        ({"balance_loss_weight": None}, "balance_loss_weight"),
        ({"depth_model_name_or_path": 3}, "depth_model_name_or_path"),
        ({"depth_model_name_or_path": ""}, "depth_model_name_or_path"),
        ({"depth_image_mean": ["a", "b", "c"]}, "depth_image_mean"),
        ({"depth_image_mean": "imagenet"}, "depth_image_mean"),
        ({"depth_image_std": [0.2, None, 0.2]}, "depth_image_std"),
        ({"depth_input_rescale": "1e-4"}, "depth_input_rescale"),
        ({"depth_input_offset": [0.0, "x", 0.0]}, "depth_input_offset"),
        ({"nodata_value": "nan"}, "nodata_value"),
        ({"nodata_value": []}, "nodata_value"),
        ({"band_wavelengths_nm": [490, 560, "665"]}, "band_wavelengths_nm"),
        ({"rgb_band_indices": [2.0, 1.0, 0.0]}, "rgb_band_indices"),
        ({"layers_to_transform": []}, "layers_to_transform"),
        ({"layers_to_transform": [0, 1.5]}, "layers_to_transform"),
        ({"num_prefix_tokens": 1.0}, "num_prefix_tokens"),
        ({"depth_num_prefix_tokens": "1"}, "depth_num_prefix_tokens"),
        # non-finite numbers: every output would be NaN (issue 11 item 3)
        ({"depth_image_mean": [0.5, float("nan"), 0.5]}, "depth_image_mean"),
        ({"depth_image_mean": [0.5, float("inf"), 0.5]}, "depth_image_mean"),
        ({"depth_image_std": [0.2, float("nan"), 0.2]}, "depth_image_std"),
        ({"depth_image_std": [0.2, float("inf"), 0.2]}, "depth_image_std"),
        ({"depth_image_std": [0.2, -0.1, 0.2]}, "depth_image_std"),
        ({"depth_input_rescale": float("nan")}, "depth_input_rescale"),
        ({"depth_input_rescale": float("inf")}, "depth_input_rescale"),
        ({"depth_input_rescale": [1e-4, float("nan"), 1e-4]}, "depth_input_rescale"),
        ({"depth_input_rescale": 0.0}, "depth_input_rescale"),
        ({"depth_input_offset": float("-inf")}, "depth_input_offset"),
        ({"depth_input_offset": [0.0, 0.0, float("nan")]}, "depth_input_offset"),
        ({"band_wavelengths_nm": [490, 560, float("inf")]}, "band_wavelengths_nm"),
        ({"balance_loss_weight": float("inf")}, "balance_loss_weight"),
        ({"scale_init": float("inf")}, "scale_init"),
        # W_delta starts at zero with init_weights=True: s = 0 would never train (issue 11 item 2)
        ({"scale_init": 0}, "scale_init"),
        ({"scale_init": 0.0, "init_weights": True}, "scale_init"),
        # wavelengths would pick other bands than the indices given with them: one would silently win (item 15)
        ({"rgb_band_indices": [0, 1, 2], "band_wavelengths_nm": [490, 560, 665, 842]}, "band_wavelengths_nm"),
        ({"rgb_band_indices": [4, 1, 0], "band_wavelengths_nm": [490, 560, 665, 842]}, "rgb_band_indices"),
        # the recorded bands (issue 12 item 3): counts, names and R, G, B must agree
        ({"num_input_bands": 0}, "num_input_bands"),
        ({"num_input_bands": 6.0}, "num_input_bands"),
        ({"num_input_bands": "6"}, "num_input_bands"),
        ({"num_input_bands": 4, "band_wavelengths_nm": [490, 560, 665]}, "band_wavelengths_nm"),
        ({"num_input_bands": 4, "rgb_band_indices": [4, 1, 0]}, "rgb_band_indices"),
        ({"band_names": "B02"}, "band_names"),
        ({"band_names": ["B02", "B02", "B03"]}, "band_names"),
        ({"band_names": ["B02", ""]}, "band_names"),
        ({"band_names": ["B02", 3]}, "band_names"),
        ({"band_names": ["a", "b", "c"], "num_input_bands": 4}, "band_names"),
        ({"band_names": ["a", "b", "c"], "band_wavelengths_nm": [490, 560, 665, 842]}, "band_names"),
        ({"widened_patch_embedding": ""}, "widened_patch_embedding"),
        ({"widened_patch_embedding": ["embeddings"]}, "widened_patch_embedding"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SpectralMoEConfig\.{field}"):
        SpectralMoEConfig(**kwargs)


def test_defaults_follow_the_paper():
    config = SpectralMoEConfig()
    assert (config.num_experts, config.top_k, config.expert_rank, config.num_tokens) == (6, 1, 16, 100)
    assert config.gating == "laplace" and config.noisy_gating and config.scale_init == 1e-3
    assert config.peft_type == PeftType.SPECTRALMOE and config.task_type is None


def test_config_round_trips_through_json(tmp_path):
    config = SpectralMoEConfig(num_experts=3, top_k=2, gating="gaussian", rgb_band_indices=[2, 1, 0],
                               layers_to_transform=[0, 2], modules_to_save=["classifier"])
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SpectralMoEConfig)
    assert loaded.to_dict() == config.to_dict()


def test_every_message_has_the_same_format():
    """'SpectralMoEConfig.<field>: <what is wrong> (got <value>).', for a type error as for a range error."""
    with pytest.raises(ValueError) as error:
        SpectralMoEConfig(depth_image_mean=["a", "b", "c"])
    assert str(error.value) == (
        "SpectralMoEConfig.depth_image_mean: must be 3 finite numbers (R, G, B) (got ['a', 'b', 'c'])."
    )
    with pytest.raises(ValueError, match=r"must be a list of module names, e\.g\. \['decode_head'\]"):
        SpectralMoEConfig(modules_to_save="decode_head")


def test_scale_init_zero_is_refused_only_where_it_could_not_train():
    """init_weights='paper' or False: W_delta is not zero, so s gets a gradient and trains from 0."""
    for init in ("paper", False):
        assert SpectralMoEConfig(scale_init=0.0, init_weights=init).scale_init == 0.0


def test_scale_init_zero_with_identity_init_really_never_trains():
    """Why the refusal: with W_delta = 0 and s = 0 every adapter tensor gets an exactly zero gradient."""
    import torch
    from peft import get_peft_model
    from tiny_models import make_model

    # only the routers' balance loss would train (not the refinement): leave it out to see the task path alone
    config = SpectralMoEConfig(use_depth=False, num_tokens=4, aux_loss_in_graph=False)
    config.scale_init = 0.0  # past validation, as a config edited after construction would be
    model = get_peft_model(make_model(), config).train()
    model(pixel_values=torch.randn(2, 3, 32, 32)).last_hidden_state.square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is None or not g.any() for g in grads.values())

    config = SpectralMoEConfig(use_depth=False, num_tokens=4, scale_init=0.0, init_weights="paper")
    model = get_peft_model(make_model(), config).train()
    model(pixel_values=torch.randn(2, 3, 32, 32)).last_hidden_state.square().mean().backward()
    (scale,) = [p for name, p in model.named_parameters() if "spectralmoe_scale" in name]
    assert scale.grad is not None and scale.grad.abs() > 0


def test_wavelengths_that_agree_with_the_indices_are_accepted():
    """Both recorded (e.g. for the card) and picking the same bands: nothing silently wins."""
    config = SpectralMoEConfig(rgb_band_indices=[2, 1, 0], band_wavelengths_nm=[490, 560, 665, 842])
    assert config.resolved_rgb_band_indices() == [2, 1, 0]


def test_equivalent_types_are_accepted_and_normalized_to_what_json_gives_back():
    """Tuples, numpy numbers and sets (as users and peft pass them) become lists and plain numbers."""
    np = pytest.importorskip("numpy")
    config = SpectralMoEConfig(
        num_experts=np.int64(4), top_k=np.int32(2), scale_init=np.float32(0.5), rgb_band_indices=(np.int64(2), 1, 0),
        depth_image_mean=(0.5, 0.5, np.float64(0.5)), depth_image_std=(1, 1, 1), depth_input_rescale=(1e-4,) * 3,
        nodata_value=np.float32("nan"), target_modules={"encoder.layer.1", "encoder.layer.0"},
        layers_to_transform=(0, np.int64(1)), modules_to_save=("decode_head",), depth_hidden_size=np.int64(48),
    )
    assert config.num_experts == 4 and type(config.num_experts) is int and type(config.top_k) is int
    assert config.rgb_band_indices == [2, 1, 0] and all(type(b) is int for b in config.rgb_band_indices)
    assert config.depth_image_std == [1.0, 1.0, 1.0] and config.depth_input_rescale == [1e-4] * 3
    assert config.target_modules == ["encoder.layer.0", "encoder.layer.1"] and config.layers_to_transform == [0, 1]
    assert config.modules_to_save == ["decode_head"] and type(config.depth_hidden_size) is int
    assert type(config.nodata_value) is float and config.nodata_value != config.nodata_value  # NaN: a nodata marker
    assert type(config.scale_init) is float


def test_every_field_round_trips_through_json(tmp_path):
    """Non-default values in every field: peft rebuilds the config from JSON through the same validation."""
    config = SpectralMoEConfig(
        num_experts=3, top_k=2, expert_rank=4, num_tokens=8, gating="gaussian", noisy_gating=False, share_gates=True,
        use_depth=True, fusion="add", depth_source="model", depth_model_name_or_path="org/depth",
        rgb_band_indices=[2, 1, 0], band_wavelengths_nm=[490, 560, 665, 842], nodata_value=[0, 0, 0, -1],
        num_input_bands=4, band_names=["B02", "B03", "B04", "B08"],
        widened_patch_embedding="embeddings.patch_embeddings.projection",
        depth_input_rescale=[1e-4, 1e-4, 2e-4], depth_input_offset=0.1, depth_image_mean=[0.5, 0.5, 0.5],
        depth_image_std=[0.2, 0.2, 0.2], depth_hidden_size=48, depth_num_prefix_tokens=1, scale_init=0.5,
        init_weights="paper", balance_loss_weight=0.0, switch_loss_weight=0.1, router_z_loss_weight=1e-3,
        target_modules=r".*layer\.[01]", exclude_modules=["encoder.layer.1"], layers_to_transform=[0],
        num_prefix_tokens=1, modules_to_save=["decode_head"],
    )
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SpectralMoEConfig)
    assert loaded.to_dict() == config.to_dict()


def test_a_config_saved_by_release_0_1_0_still_loads(tmp_path):
    """adapter_config.json exactly as spectralmoe-peft 0.1.0 (peft 0.21.2) wrote it for the defaults."""
    import json

    saved = {
        "auto_mapping": None, "balance_loss_weight": 0.01, "band_wavelengths_nm": None,
        "base_model_name_or_path": None, "depth_hidden_size": None, "depth_image_mean": [0.485, 0.456, 0.406],
        "depth_image_std": [0.229, 0.224, 0.225], "depth_input_offset": 0.0, "depth_input_rescale": 1.0,
        "depth_model_name_or_path": None, "depth_num_prefix_tokens": None, "depth_source": "model",
        "exclude_modules": None, "expert_rank": 16, "fusion": "cross_attention", "gating": "laplace",
        "inference_mode": False, "init_weights": True, "layers_to_transform": None, "modules_to_save": None,
        "nodata_value": None, "noisy_gating": True, "num_experts": 6, "num_prefix_tokens": None, "num_tokens": 100,
        "peft_type": "SPECTRALMOE", "peft_version": "0.21.2", "revision": None, "rgb_band_indices": None,
        "router_z_loss_weight": 0.0, "scale_init": 0.001, "share_gates": False, "switch_loss_weight": 0.0,
        "target_modules": None, "task_type": None, "top_k": 1, "use_depth": True,
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SpectralMoEConfig)
    assert {k: v for k, v in loaded.to_dict().items() if k != "peft_version"} == {
        k: v for k, v in SpectralMoEConfig().to_dict().items() if k != "peft_version"
    }


def test_docs_api_lists_every_field():
    """docs/api.md says it documents every field: each of SpectralMoEConfig's own fields has a row in its table."""
    import dataclasses
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    section = text[text.index("## `SpectralMoEConfig`"):]
    section = section[: section.index("\n## ", 1)]
    documented = {name for row in section.splitlines() if row.startswith("| `")
                  for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    own = {f.name for f in dataclasses.fields(SpectralMoEConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    assert own - documented == set(), f"fields missing from docs/api.md: {sorted(own - documented)}"
    assert documented - own == set(), f"docs/api.md documents fields that do not exist: {sorted(documented - own)}"


def test_a_path_object_names_the_depth_model_as_text():
    from pathlib import Path

    assert SpectralMoEConfig(depth_model_name_or_path=Path("models") / "depth").depth_model_name_or_path == str(
        Path("models") / "depth")


def test_a_shared_config_names_no_local_path(tmp_path):
    """adapter_config.json is meant to be shared: a local base or depth model folder is written as None (a Hub cache
    folder as its repo id); the config in memory keeps its values."""
    import json

    local = tmp_path / "models" / "depth"
    local.mkdir(parents=True)
    cached = "/root/.cache/huggingface/hub/models--org--vit/snapshots/" + "0" * 40
    config = SpectralMoEConfig(depth_model_name_or_path=str(local), base_model_name_or_path=cached)
    config.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["depth_model_name_or_path"] is None and saved["base_model_name_or_path"] == "org/vit"
    assert config.depth_model_name_or_path == str(local) and config.base_model_name_or_path == cached
    SpectralMoEConfig(depth_model_name_or_path="org/depth").save_pretrained(tmp_path / "hub")
    assert PeftConfig.from_pretrained(tmp_path / "hub").depth_model_name_or_path == "org/depth"
