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
