"""Which adapters and blocks a config selects: adapter names that look like key parts, out-of-range block indices,
module names with regex characters (issue 11 items 7, 12, 13)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from spectralmoe_peft import SpectralMoEConfig
from tiny_models import make_depth_model, make_model

SETTINGS = dict(num_experts=3, expert_rank=4, num_tokens=5, init_weights=False, scale_init=0.5)


def features(model, x):
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


# names that are also parts of the tensors' keys (block index, module names), or a parameter's own name
@pytest.mark.parametrize("name", ["1", "0", "model", "encoder", "layer", "weight", "bias", "spectralmoe_A",
                                  "spectralmoe_scale", "base_model", "spectralmoe", "e"])
def test_adapter_names_that_occur_in_the_keys_load_next_to_another_adapter(tmp_path, name):
    x = torch.randn(2, 3, 32, 32)
    base = make_model()  # seeds itself: the adapters' seeds follow
    torch.manual_seed(1)
    trained = get_peft_model(base, SpectralMoEConfig(**SETTINGS, depth_hidden_size=48)).eval()
    trained.set_depth_model(make_depth_model())
    expected = features(trained, x)
    trained.save_pretrained(tmp_path)

    base = make_model()
    torch.manual_seed(2)  # another adapter, other weights, already present under "default"
    model = get_peft_model(base, SpectralMoEConfig(**SETTINGS, depth_hidden_size=48)).eval()
    model.set_depth_model(make_depth_model())
    other = features(model, x)
    model.load_adapter(tmp_path, adapter_name=name)
    model.set_adapter(name)
    torch.testing.assert_close(features(model, x), expected, rtol=0, atol=0)
    model.set_adapter("default")
    torch.testing.assert_close(features(model, x), other, rtol=0, atol=0)
    assert not torch.equal(expected, other)


@pytest.mark.parametrize("name", ["training", "keys", "update", "to", "a.b", ""])
def test_adapter_names_torch_cannot_hold_are_refused_up_front_and_nothing_changes(tmp_path, name):
    x = torch.randn(2, 3, 32, 32)
    model = get_peft_model(make_model(), SpectralMoEConfig(**SETTINGS, use_depth=False)).eval()
    before = features(model, x)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Adapter name .* cannot be used.*Pick another name"):
        model.load_adapter(tmp_path, adapter_name=name)
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(features(model, x), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="Adapter name .* cannot be used"):
        model.add_adapter(name, SpectralMoEConfig(**SETTINGS, use_depth=False))
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(features(model, x), before, rtol=0, atol=0)


@pytest.mark.parametrize("layers", [[0, 2], 2, [5]])
def test_out_of_range_layers_to_transform_name_the_valid_range(layers):
    base = make_model()  # 2 blocks
    x = torch.randn(1, 3, 32, 32)
    before = features(base, x)
    with pytest.raises(ValueError, match=r"layers_to_transform: \[\d\] out of range; this ViT has 2 blocks, so "
                                         r"valid indices are 0 \.\. 1"):
        get_peft_model(base, SpectralMoEConfig(**SETTINGS, use_depth=False, layers_to_transform=layers))
    torch.testing.assert_close(features(base, x), before, rtol=0, atol=0)


def test_in_range_layers_to_transform_adapt_exactly_those_blocks():
    model = get_peft_model(make_model(), SpectralMoEConfig(**SETTINGS, use_depth=False, layers_to_transform=1))
    adapted = {name for name, _ in model.named_parameters() if "spectralmoe_A" in name}
    assert adapted == {"base_model.model.encoder.layer.1.spectralmoe_A.default"}


class WithOddHead(nn.Module):
    """A ViT with a head whose name holds regex characters (torch allows any name without a dot)."""

    def __init__(self):
        super().__init__()
        self.vit = make_model()
        self.add_module("head(", nn.Linear(32, 3))

    def forward(self, pixel_values):
        return self.get_submodule("head(")(self.vit(pixel_values=pixel_values).last_hidden_state)


def test_modules_to_save_names_are_matched_literally(tmp_path):
    model = get_peft_model(WithOddHead(), SpectralMoEConfig(**SETTINGS, use_depth=False, modules_to_save=["head("]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.head(.modules_to_save.default.weight" in trainable
    assert sum("spectralmoe_A" in name for name in trainable) == 2  # both blocks still adapted

    # a dotted name is a path of whole components: "layer.1" saves block 1 in full and leaves block 0 adapted
    model = get_peft_model(make_model(), SpectralMoEConfig(**SETTINGS, use_depth=False, modules_to_save=["layer.1"]))
    adapted = {name for name, _ in model.named_parameters() if "spectralmoe_A" in name}
    assert adapted == {"base_model.model.encoder.layer.0.spectralmoe_A.default"}
