"""Property tests (hypothesis) over random shapes and configurations.

(a) the batched refinement equals the per-token reference (float64); (b) in eval mode a sample's output does not
depend on the other samples of its batch; (c) prefix tokens (CLS, registers) are never modified; (d) any band count
with any R, G, B choice runs through a depth model to finite outputs of the right shape.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from reference import reference_refine
from test_layer import params_of
from tiny_models import DEPTH_FAMILIES, FAMILIES, main_output, make_depth_family, make_depth_model, make_model

from spectralmoe_peft import SpectralMoEConfig, SpectralMoELayer

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]

SETTINGS = {
    "deadline": None,
    "database": None,  # nothing written into the repository
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}


@st.composite
def adapter_configs(draw, *, with_depth=None):
    num_experts = draw(st.integers(1, 4))
    use_depth = draw(st.booleans()) if with_depth is None else with_depth
    return {
        "num_experts": num_experts,
        "top_k": draw(st.integers(1, num_experts)),
        "num_tokens": draw(st.integers(2, 6)),
        "expert_rank": draw(st.integers(1, 4)),
        "gating": draw(st.sampled_from(["softmax", "laplace", "gaussian"])),
        "use_depth": use_depth,
        "fusion": draw(st.sampled_from(["cross_attention", "add"])),
        "share_gates": draw(st.booleans()) if use_depth else False,
        "init_weights": False,
        "scale_init": draw(st.floats(0.1, 1.0)),
    }


def adapted_layers(model) -> list[SpectralMoELayer]:
    return [m for m in model.modules() if isinstance(m, SpectralMoELayer)]


# --- (a) the batched layer equals the per-token reference -----------------------------------------------------------


@settings(max_examples=30, **SETTINGS)
@given(
    cfg=adapter_configs(),
    batch=st.integers(1, 3),
    grid=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    hidden=st.sampled_from([8, 16, 24]),
    noisy=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_refinement_equals_the_per_token_reference(cfg, batch, grid, hidden, noisy, seed):
    model = get_peft_model(make_model("dinov2", seed=seed, hidden_size=hidden), SpectralMoEConfig(**cfg)).double()
    layer = adapted_layers(model)[seed % 2]
    model.train(noisy)
    num = grid[0] * grid[1]
    generator = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, num, hidden, dtype=torch.float64, generator=generator)
    depth = torch.randn(batch, num, hidden, dtype=torch.float64, generator=generator) if cfg["use_depth"] else None

    with torch.no_grad():
        torch.manual_seed(seed)
        refined = layer.refine(feats, depth, "default")
        fast = refined.tokens
        torch.manual_seed(seed)  # the layer draws the visual stream's noise first, then the depth stream's
        num_experts = cfg["num_experts"]
        eps_v = torch.randn(batch, num, num_experts, dtype=torch.float64) if noisy else None
        eps_d = torch.randn(batch, num, num_experts, dtype=torch.float64) if noisy and depth is not None else None
        slow = reference_refine(
            feats, depth, params_of(model, layer), top_k=cfg["top_k"], gating=cfg["gating"], fusion=cfg["fusion"],
            eps_visual=eps_v, eps_depth=eps_d,
        )
    assert fast.shape == (batch, num, hidden)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9)
    assert refined.routing["visual"].topk_indices.shape == (batch, num, cfg["top_k"])
    assert ("depth" in refined.routing) == (depth is not None)


# --- (b) batch independence in eval mode ----------------------------------------------------------------------------


@settings(max_examples=20, **SETTINGS)
@given(
    cfg=adapter_configs(),
    batch=st.integers(2, 4),
    grid=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    depth_grid=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    seed=st.integers(0, 2**16),
)
def test_eval_output_of_a_sample_does_not_depend_on_its_batch(cfg, batch, grid, depth_grid, seed):
    cfg["noisy_gating"] = True  # must be off in eval mode regardless
    model = get_peft_model(make_model("dinov2", seed=seed), SpectralMoEConfig(**cfg)).eval()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, grid[0] * 8, grid[1] * 8, generator=generator)
    depth = None
    if cfg["use_depth"]:
        depth = tuple(torch.randn(batch, 32, *depth_grid, generator=generator) for _ in range(3))

    def forward(index):
        kwargs = {"pixel_values": x if index is None else x[index : index + 1]}
        if depth is not None:
            kwargs["depth_hidden_states"] = tuple(d if index is None else d[index : index + 1] for d in depth)
        with torch.no_grad():
            return main_output(model(**kwargs))

    together = forward(None)
    assert together.shape == (batch, 1 + grid[0] * grid[1], 32) and torch.isfinite(together).all()
    for index in range(batch):
        torch.testing.assert_close(forward(index)[0], together[index], rtol=1e-5, atol=1e-5)


# --- (c) prefix tokens are never modified ---------------------------------------------------------------------------


@settings(max_examples=20, **SETTINGS)
@given(
    cfg=adapter_configs(with_depth=False),
    batch=st.integers(1, 3),
    grid=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    training=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_prefix_tokens_are_never_modified(cfg, batch, grid, training, seed):
    model = get_peft_model(make_model("dinov2_registers", seed=seed), SpectralMoEConfig(**cfg)).train(training)
    num_prefix = FAMILIES["dinov2_registers"].num_prefix_tokens
    layers = adapted_layers(model)
    assert len(layers) == 2 and {layer.num_prefix_tokens for layer in layers} == {num_prefix}
    captured: dict = {}

    def capture(key):
        def hook(module, args, output):
            captured[key] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        return hook

    handles = []
    for layer in layers:
        # prepended after the refinement hook: runs before it, so it sees what the base block returned
        handles.append(layer.base_layer.register_forward_hook(capture(("block", layer.block_index)), prepend=True))
        handles.append(layer.register_forward_hook(capture(("adapted", layer.block_index))))
    x = torch.randn(batch, 3, grid[0] * 8, grid[1] * 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model(pixel_values=x)
    for handle in handles:
        handle.remove()
    for layer in layers:
        block, adapted = captured[("block", layer.block_index)], captured[("adapted", layer.block_index)]
        assert block.shape == adapted.shape == (batch, num_prefix + grid[0] * grid[1], 32)
        assert torch.equal(adapted[:, :num_prefix], block[:, :num_prefix])
        assert not torch.equal(adapted[:, num_prefix:], block[:, num_prefix:])  # the patches were refined


# --- (d) any band count, any R, G, B choice, through a depth model ---------------------------------------------------


@st.composite
def bands_and_rgb(draw):
    num_bands = draw(st.integers(3, 12))
    rgb = draw(st.lists(st.integers(0, num_bands - 1), min_size=3, max_size=3, unique=True))
    return num_bands, rgb


@settings(max_examples=20, **SETTINGS)
@given(
    bands=bands_and_rgb(),
    cfg=adapter_configs(with_depth=True),
    batch=st.integers(1, 2),
    size=st.tuples(st.integers(8, 40), st.integers(8, 40)),
    training=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_band_count_and_rgb_choice_runs_through_the_depth_model(bands, cfg, batch, size, training, seed):
    num_bands, rgb = bands
    model = get_peft_model(
        make_model("dinov2", seed=seed, num_channels=num_bands),
        SpectralMoEConfig(**cfg, rgb_band_indices=rgb, depth_hidden_size=48),
    ).train(training)
    model.set_depth_model(make_depth_model())
    x = torch.rand(batch, num_bands, *size, generator=torch.Generator().manual_seed(seed))
    out = main_output(model(pixel_values=x))
    grid = (size[0] // 8, size[1] // 8)
    assert out.shape == (batch, 1 + grid[0] * grid[1], 32)
    assert torch.isfinite(out).all()
    aux = model.get_aux_loss()
    assert torch.isfinite(aux)
    stats = model.get_routing_stats()
    assert set(stats) == {0, 1} and stats[1]["depth"].topk_indices.shape == (batch, grid[0] * grid[1], cfg["top_k"])
    if training:
        (out.pow(2).mean() + aux).backward()
        projection = model.base_model.spectralmoe_depth_projection["default"].weight
        assert projection.grad is not None and torch.isfinite(projection.grad).all()


# --- (e) integer rasters, non-square sizes and depth models of other families ---------------------------------------


@settings(max_examples=25, **SETTINGS)
@given(
    dtype=st.sampled_from([torch.uint8, torch.int16, torch.int32, torch.float32]),
    family=st.sampled_from(sorted(DEPTH_FAMILIES)),
    size=st.tuples(st.integers(1, 5), st.integers(1, 5)).map(lambda g: (8 * g[0], 8 * g[1])),
    batch=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_integer_rasters_of_any_size_through_any_depth_family_equal_their_float_values(dtype, family, size, batch,
                                                                                     seed):
    torch.manual_seed(seed)
    depth_model = make_depth_family(family, seed)
    model = get_peft_model(make_model("dinov2", seed=seed), SpectralMoEConfig(
        num_experts=2, num_tokens=3, expert_rank=2, init_weights=False, scale_init=0.5,
        depth_input_rescale=1 / 255)).eval()
    model.set_depth_model(depth_model)
    top = {torch.uint8: 255, torch.int16: 10000, torch.int32: 10000, torch.float32: 255}[dtype]
    values = torch.randint(0, top + 1, (batch, 3, *size), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(pixel_values=values.to(dtype)).last_hidden_state
        reference = model(pixel_values=values.float()).last_hidden_state
    assert out.shape == (batch, 1 + size[0] * size[1] // 64, 32) and torch.isfinite(out).all()
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
