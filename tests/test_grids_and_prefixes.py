"""Patch grids and prefix tokens on non-square images and models with registers, checked through the routing.

The routing of each stream is a function of the tokens it sees, so ``get_routing_stats()`` shows, position by
position, which tokens reached the gates. Each test computes those tokens independently (a ViT block's output
without the adapter, the depth features arranged row-major and resampled with plain ``F.interpolate``) and compares
the chosen experts patch by patch. Every image here is non-square, every model has registers (3 prefix tokens), so
a height/width swap anywhere on the way, or a prefix count hard-coded to CLS only, moves or mixes the tokens and
changes the choices.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from peft import get_peft_model
from tiny_models import FAMILIES, HIDDEN, make_model

from spectralmoe_peft import SpectralMoEConfig, SpectralMoELayer

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]

# family -> a non-square input size (height, width): wide on one, tall on the other, patch 8
SIZES = {"dinov2_registers": (24, 40), "dinov3": (40, 24)}
NUM_EXPERTS = 4


def build(family: str, **overrides):
    settings = dict(num_experts=NUM_EXPERTS, top_k=1, expert_rank=4, num_tokens=5, init_weights=False,
                    scale_init=0.5, gating="laplace")
    model = get_peft_model(make_model(family), SpectralMoEConfig(**{**settings, **overrides})).double().eval()
    assert FAMILIES[family].num_prefix_tokens == 3  # CLS + 2 registers
    return model


def layers(model) -> dict[int, SpectralMoELayer]:
    return {m.block_index: m for m in model.modules() if isinstance(m, SpectralMoELayer)}


def gate(layer: SpectralMoELayer, stream: str) -> torch.Tensor:
    """The (E, D) gate weight of a stream (the one place that knows the parameter names)."""
    return getattr(layer, f"spectralmoe_gate_{stream}")["default"]


def expected_experts(tokens: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """Top-1 expert of each token under the Laplace gate -||x - w_e||, (B, N, 1); asserts no near-ties."""
    logits = -torch.cdist(tokens, gate_weight.detach().unsqueeze(0).expand(tokens.shape[0], -1, -1))
    top2 = logits.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-9, "a near-tie would make the comparison fragile"
    return logits.argmax(-1, keepdim=True)


def images(size: tuple[int, int], batch: int = 2, seed: int = 7) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_routing(stats, stream: str, expected: torch.Tensor, grid: tuple[int, int]) -> None:
    assert stats.grid == grid, (stream, stats.grid, grid)
    assert stats.topk_indices.shape == expected.shape, (stream, stats.topk_indices.shape, expected.shape)
    assert torch.equal(stats.topk_indices, expected), f"{stream}: other experts chosen at some patches"


@pytest.mark.parametrize("family", sorted(SIZES))
def test_visual_gate_sees_the_patch_tokens_of_its_block(family):
    """Block 0's visual gate routes exactly the block's patch tokens (prefix dropped, row-major (H, W))."""
    model = build(family, use_depth=False)
    size = SIZES[family]
    grid = (size[0] // 8, size[1] // 8)
    x = images(size)
    with torch.no_grad():
        with model.disable_adapter():  # block 0's output without refinement: what the adapter of block 0 gets
            block0 = model(pixel_values=x, output_hidden_states=True).hidden_states[1]
        model(pixel_values=x)
    assert block0.shape[1] == 3 + grid[0] * grid[1]
    expected = expected_experts(block0[:, 3:], gate(layers(model)[0], "visual"))
    assert_routing(model.get_routing_stats()[0]["visual"], "visual", expected, grid)


def depth_grids(batch: int, grid: tuple[int, int], num: int = 3, seed: int = 11) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HIDDEN, *grid, generator=generator, dtype=torch.float64) for _ in range(num)]


def resampled(grid: torch.Tensor, target: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, H*W, C): bilinear, half-pixel centres (align_corners=False), row-major."""
    if tuple(grid.shape[-2:]) != target:
        grid = F.interpolate(grid, size=target, mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("family", sorted(SIZES))
@pytest.mark.parametrize("form", ["grid", "tokens_with_registers"])
@pytest.mark.parametrize("same_grid", [True, False], ids=["same-grid", "resampled"])
def test_depth_gate_sees_the_depth_features_at_the_same_place(family, form, same_grid):
    """depth_hidden_states as (B, C, h, w) grids or as (B, 3 + h*w, C) tokens behind 3 register tokens, on the
    visual grid itself or on a smaller one of the same orientation (resampled): each visual patch's depth token is
    the depth feature at its place."""
    size = SIZES[family]
    visual_grid = (size[0] // 8, size[1] // 8)
    depth_grid = visual_grid if same_grid else (visual_grid[0] - 1, visual_grid[1] - 1)
    model = build(family, use_depth=True, depth_num_prefix_tokens=3)
    x = images(size)
    grids = depth_grids(2, depth_grid)
    if form == "grid":
        given = grids
    else:  # registers with large values: any of them counted as a patch would stand out
        given = [torch.cat([torch.full((2, 3, HIDDEN), 50.0, dtype=torch.float64), g.flatten(2).transpose(1, 2)], 1)
                 for g in grids]
    with torch.no_grad():
        model(pixel_values=x, depth_hidden_states=given)
    stats = model.get_routing_stats()
    for block, layer in layers(model).items():
        depth_tokens = resampled(grids[block + 1], visual_grid)  # 2 blocks, 2 depth layers: block i reads i + 1
        expected = expected_experts(depth_tokens, gate(layer, "depth"))
        assert_routing(stats[block]["depth"], "depth", expected, visual_grid)


def registers_depth_model(seed: int = 1) -> torch.nn.Module:
    """A depth model with registers (CLS + 2 prefix tokens), the ViT's width, patch 7, 3 layers."""
    torch.manual_seed(seed)
    config = tf.Dinov2WithRegistersConfig(hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=2,
                                          intermediate_size=64, image_size=28, patch_size=7, num_register_tokens=2)
    return tf.Dinov2WithRegistersModel(config).double().eval()


@pytest.mark.parametrize("family", sorted(SIZES))
def test_attached_depth_model_with_registers_on_a_non_square_image(family):
    """The attached depth model's features, prefix (3 tokens) dropped, arranged on its own non-square patch grid
    and resampled onto the visual grid, reach the depth gate at the matching patches."""
    size = SIZES[family]
    visual_grid = (size[0] // 8, size[1] // 8)
    model = build(family, use_depth=True)
    depth_model = registers_depth_model()
    model.set_depth_model(depth_model)
    x = images(size)
    with torch.no_grad():
        model(pixel_values=x)
        # the documented depth input: R, G, B = bands 0, 1, 2, ImageNet normalization, resized to the nearest
        # multiple of the depth model's patch size (bilinear)
        mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
        rgb = (x[:, :3] - mean) / std
        depth_size = (round(size[0] / 7) * 7, round(size[1] / 7) * 7)
        rgb = F.interpolate(rgb, size=depth_size, mode="bilinear", align_corners=False)
        hidden_states = depth_model(pixel_values=rgb, output_hidden_states=True).hidden_states
    depth_grid = (depth_size[0] // 7, depth_size[1] // 7)
    assert depth_grid[0] != depth_grid[1] and hidden_states[-1].shape[1] == 3 + depth_grid[0] * depth_grid[1]
    stats = model.get_routing_stats()
    for block, layer in layers(model).items():
        index = int((block + 1) * 3 / 2 + 0.5)  # round half up of l * L_d / L: blocks 0, 1 read layers 2, 3
        patches = hidden_states[index][:, 3:].transpose(1, 2).reshape(2, HIDDEN, *depth_grid)  # row-major
        expected = expected_experts(resampled(patches, visual_grid), gate(layer, "depth"))
        assert_routing(stats[block]["depth"], "depth", expected, visual_grid)
