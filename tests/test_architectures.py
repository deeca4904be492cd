"""Blocks are found by structure and prefix tokens read from the config; anything else gets a clear error."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from peft import PeftModel, get_peft_model
from tiny_models import COMMON, make_model

from spectralmoe_peft import SpectralMoEConfig
from spectralmoe_peft.architectures import find_block_stack


def test_clip_model_adapts_the_vision_tower_not_the_text_tower():
    config = tf.CLIPConfig(
        vision_config={**COMMON, "image_size": 32, "patch_size": 8},
        text_config={**COMMON, "vocab_size": 100, "max_position_embeddings": 16},
        projection_dim=16,
    )
    stack = find_block_stack(tf.CLIPModel(config))
    assert stack.path == "vision_model.encoder.layers" and stack.num_prefix_tokens == 1


def test_upernet_adapts_its_backbone():
    stack = find_block_stack(make_model("upernet_dinov3"))
    assert stack.path == "backbone.layer" or stack.path.startswith("backbone.")
    assert stack.num_prefix_tokens == 2 and stack.num_blocks == 2


def test_a_model_without_vit_blocks_is_refused():
    with pytest.raises(ValueError, match="found no ViT blocks"):
        get_peft_model(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()), SpectralMoEConfig())


def test_unknown_family_needs_num_prefix_tokens():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = torch.nn.Linear(8, 8)

        def forward(self, x):
            return x + self.attention(x)

    class TinyViT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tf.PretrainedConfig(hidden_size=8, patch_size=4)
            self.patch = torch.nn.Conv2d(3, 8, 4, stride=4)
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, pixel_values):
            x = self.patch(pixel_values).flatten(2).transpose(1, 2)
            for block in self.blocks:
                x = block(x)
            return x

    with pytest.raises(ValueError, match=r"If it is a plain \(isotropic\) ViT, set SpectralMoEConfig\.num_prefix_tokens"):
        get_peft_model(TinyViT(), SpectralMoEConfig(use_depth=False))
    model = get_peft_model(TinyViT(), SpectralMoEConfig(use_depth=False, num_prefix_tokens=0, init_weights=False))
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 16, 8)


def test_target_modules_must_name_blocks():
    with pytest.raises(ValueError, match="not one of the blocks"):
        get_peft_model(make_model("vit"), SpectralMoEConfig(target_modules=["attention"]))
    model = get_peft_model(make_model("vit"), SpectralMoEConfig(target_modules=r".*layers?\.1", use_depth=False))
    assert len(model.targeted_module_names) == 1 and model.targeted_module_names[0].endswith(".1")


@pytest.mark.parametrize("family, head", [("vit_classifier", "classifier"), ("upernet_dinov2", "decode_head")])
def test_modules_to_save_trains_and_saves_the_head(family, head, tmp_path):
    config = SpectralMoEConfig(use_depth=False, num_tokens=4, init_weights=False, modules_to_save=[head])
    model = get_peft_model(make_model(family), config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(head in n for n in trainable) and all("spectralmoe_" in n or head in n for n in trainable)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if head in name and parameter.requires_grad:
                parameter.add_(0.1)  # as if trained
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(family), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, expected)


def _swin(**kw):
    return tf.SwinModel(tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                      window_size=4, **kw))


HIERARCHICAL = {
    "swin": _swin,
    "swinv2": lambda: tf.Swinv2Model(tf.Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                     num_heads=[1, 2], window_size=4)),
    "segformer": lambda: tf.SegformerModel(tf.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 1],
        patch_sizes=[7, 3], strides=[4, 2])),
    "upernet_swin": lambda: tf.UperNetForSemanticSegmentation(tf.UperNetConfig(
        backbone_config=tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                      window_size=4, out_features=["stage1", "stage2"]),
        hidden_size=16, pool_scales=[1, 2], num_labels=3, use_auxiliary_head=False)),
}


@pytest.mark.parametrize("name", sorted(HIERARCHICAL))
@pytest.mark.parametrize("num_prefix_tokens", [None, 0])
def test_hierarchical_backbones_are_refused_plainly(name, num_prefix_tokens):
    """Swin & co.: no num_prefix_tokens can make them work, so the error must not suggest it; it names what does."""
    base = HIERARCHICAL[name]().eval()
    config = SpectralMoEConfig(use_depth=False, num_tokens=4, num_prefix_tokens=num_prefix_tokens)
    with pytest.raises(ValueError) as error:
        get_peft_model(base, config)
    message = str(error.value)
    assert "does not support hierarchical backbones" in message and "depths=[1, 1]" in message
    assert "set SpectralMoEConfig.num_prefix_tokens" not in message
    assert "Supported: plain (isotropic) ViTs" in message and "'dinov2'" in message
    assert not any(type(m).__name__ == "SpectralMoELayer" for m in base.modules())


def test_a_refused_backbone_stays_usable():
    base = HIERARCHICAL["swin"]().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = base(pixel_values=x)[0]
    with pytest.raises(ValueError, match="hierarchical"):
        get_peft_model(base, SpectralMoEConfig(use_depth=False, num_tokens=4))
    with torch.no_grad():
        assert torch.equal(base(pixel_values=x)[0], before)

