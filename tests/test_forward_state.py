"""One forward, one state (issue 10): threads, checkpoint recomputation, direct submodule calls, memory after the
forward, per-adapter band choices, set_depth_model(None), and the balance loss in the autograd graph."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
import transformers as tf
from peft import get_peft_model
from tiny_models import HIDDEN, make_depth_model, make_model
from torch.utils.checkpoint import checkpoint

from spectralmoe_peft import SpectralMoEConfig, SpectralMoELayer
from spectralmoe_peft.depth import normalize_for_depth, select_rgb


def config(**overrides) -> SpectralMoEConfig:
    return SpectralMoEConfig(**{"num_experts": 3, "num_tokens": 4, "expert_rank": 2, "init_weights": False,
                                "scale_init": 0.5, **overrides})


def with_depth(family: str = "dinov2", **overrides):
    model = get_peft_model(make_model(family), config(**overrides))
    model.set_depth_model(make_depth_model())
    return model


def layers(model) -> list[SpectralMoELayer]:
    return [m for m in model.modules() if isinstance(m, SpectralMoELayer)]


def adapter_grads(model) -> dict[str, torch.Tensor]:
    """Gradients by parameter name, without the names checkpoint wrappers add."""
    def plain(name: str) -> str:
        return name.replace("._checkpoint_wrapped_module", "").replace(".inner.", ".")

    return {plain(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


# --- 1. threads --------------------------------------------------------------------------------------------------


def test_concurrent_forwards_in_threads_equal_sequential_ones():
    model = with_depth().eval()
    images = [torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    with torch.no_grad():
        expected = [model(pixel_values=x).last_hidden_state for x in images]
    # both threads sit between "depth model ran" and "blocks ran" at the same time: the old shared state failed here
    barrier = threading.Barrier(2, timeout=30)
    handle = model.base_model.depth_model.register_forward_hook(lambda *args: (barrier.wait(), None)[1])
    results: dict[int, torch.Tensor] = {}

    def work(indices):
        for i in indices:
            with torch.no_grad():
                results[i] = model(pixel_values=images[i]).last_hidden_state

    threads = [threading.Thread(target=work, args=(range(start, 6, 2),)) for start in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    handle.remove()
    assert sorted(results) == list(range(6))
    for i, out in results.items():
        torch.testing.assert_close(out, expected[i], rtol=0, atol=0)


# --- 2, 3. checkpoint recomputation with several forwards before one backward ---------------------------------------


class Checkpointed(torch.nn.Module):
    """A user's activation checkpointing around a block call (torch.utils.checkpoint)."""

    def __init__(self, inner: torch.nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.inner, self.reentrant = inner, reentrant

    def forward(self, *args, **kwargs):
        return checkpoint(self.inner, *args, use_reentrant=self.reentrant, **kwargs)


def two_forwards_grads(model) -> dict[str, torch.Tensor]:
    """Two forwards (different images and batch sizes) before one backward, as with two views or source+target."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the routers' noise: checkpointing restores the RNG, so both runs draw the same
    first = model(pixel_values=torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    second = model(pixel_values=torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    loss = first.last_hidden_state.pow(2).mean() + second.last_hidden_state.sin().mean()
    loss.backward()
    return adapter_grads(model)


def checkpoint_blocks_by_hand(model, reentrant: bool) -> None:
    if reentrant:  # reentrant checkpointing needs an input that requires grad (torch's rule, as for peft's LoRA)
        model.base_model.model.enable_input_require_grads()
    encoder = model.base_model.model.encoder
    for index, layer in enumerate(encoder.layer):
        encoder.layer[index] = Checkpointed(layer, reentrant)


def checkpoint_blocks_with_wrapper(model, reentrant: bool) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    impl = CheckpointImpl.REENTRANT if reentrant else CheckpointImpl.NO_REENTRANT
    if reentrant:
        model.base_model.model.enable_input_require_grads()
    apply_activation_checkpointing(  # the FSDP recipe: wrap every ViT block class instance
        model,
        checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=impl),
        check_fn=lambda m: isinstance(m, tf.models.dinov2.modeling_dinov2.Dinov2Layer),
    )


def transformers_gradient_checkpointing(model, reentrant: bool) -> None:
    model.base_model.model.gradient_checkpointing_enable({"use_reentrant": reentrant})


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize(
    "apply", [checkpoint_blocks_by_hand, checkpoint_blocks_with_wrapper, transformers_gradient_checkpointing],
    ids=["torch.utils.checkpoint", "checkpoint_wrapper", "transformers"],
)
def test_checkpoint_recomputation_sees_its_own_forward(apply, reentrant):
    expected = two_forwards_grads(with_depth())
    model = with_depth()
    apply(model, reentrant)
    got = two_forwards_grads(model)
    assert set(got) == set(expected) and len(got) > 10
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_transformers_gradient_checkpointing_recomputes_the_refinement():
    model = with_depth()
    calls = []
    for layer in layers(model):
        original = layer.refine
        layer.refine = lambda *a, _original=original, **k: calls.append(1) or _original(*a, **k)
    model.train()
    model(pixel_values=torch.rand(2, 3, 32, 32)).last_hidden_state.sum().backward()
    assert len(calls) == 2  # no checkpointing: once per block
    calls.clear()
    model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
    model(pixel_values=torch.rand(2, 3, 32, 32)).last_hidden_state.sum().backward()
    assert len(calls) == 4  # forward, then recomputed in backward: its activations were not kept


# --- 4. direct calls of inner modules ----------------------------------------------------------------------------


def test_direct_call_of_an_inner_module_computes_its_own_depth_stream():
    model = with_depth("upernet_dinov2", depth_hidden_size=48).eval()
    backbone = model.base_model.model.backbone
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        model(pixel_values=a)
        fresh = backbone(pixel_values=b).feature_maps
        model(pixel_values=a)  # the last forward saw other images
        again = backbone(pixel_values=b).feature_maps
    for x, y in zip(fresh, again):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_a_block_called_on_its_own_says_what_to_call():
    model = with_depth().eval()
    block = model.base_model.model.encoder.layer[0]
    with pytest.raises(ValueError, match="outside a forward of its model"):
        block(torch.randn(1, 17, HIDDEN))
    visual_only = get_peft_model(make_model(), config(use_depth=False)).eval()
    out = visual_only.base_model.model.encoder.layer[0](torch.randn(1, 17, HIDDEN))  # needs nothing from a forward
    assert torch.isfinite(out if isinstance(out, torch.Tensor) else out[0]).all()


# --- 5. nothing of a forward is kept by the model ------------------------------------------------------------------


def test_depth_hidden_states_are_released_when_the_forward_returns():
    model = with_depth(keep_routing_stats=True)
    refs = []
    model.base_model.depth_model.register_forward_hook(
        lambda module, args, output: refs.extend(weakref.ref(h) for h in output.hidden_states))
    with torch.no_grad():
        model.eval()(pixel_values=torch.rand(2, 3, 32, 32))
    gc.collect()
    assert refs and all(ref() is None for ref in refs)
    refs.clear()
    out = model.train()(pixel_values=torch.rand(2, 3, 32, 32))
    gc.collect()
    # layers the blocks read stay alive through the graph until backward; the others are gone already
    assert refs[0]() is None and refs[1]() is None
    out.last_hidden_state.sum().backward()
    del out
    gc.collect()
    assert all(ref() is None for ref in refs)
    stats = model.get_routing_stats()
    assert all(s.expert_load.grad_fn is None and s.topk_indices.grad_fn is None
               for streams in stats.values() for s in streams.values())
    assert not model.get_aux_loss().requires_grad  # in the graph already: the logged value is detached


def test_routing_statistics_can_be_switched_off():
    model = get_peft_model(make_model(), config(use_depth=False, keep_routing_stats=False))
    model(pixel_values=torch.rand(1, 3, 32, 32))
    assert model.get_routing_stats() == {}
    assert model.get_aux_loss() > 0  # the loss is still reported


# --- 6. the depth model and the band choice of each adapter ---------------------------------------------------------


def test_detached_depth_model_is_not_loaded_again(tmp_path):
    make_depth_model().save_pretrained(tmp_path / "depth")
    model = get_peft_model(make_model(), config(depth_hidden_size=48))
    model.set_depth_model(str(tmp_path / "depth"))
    assert model.peft_config["default"].depth_model_name_or_path == str(tmp_path / "depth")
    model(pixel_values=torch.rand(1, 3, 32, 32))
    model.set_depth_model(None)
    with pytest.raises(ValueError, match="no depth source"):
        model(pixel_values=torch.rand(1, 3, 32, 32))
    assert model.base_model.depth_model is None


def test_each_active_adapter_uses_its_own_bands():
    base = make_model(num_channels=6)
    model = get_peft_model(base, config(rgb_band_indices=[0, 1, 2], depth_hidden_size=48), adapter_name="a")
    model.add_adapter("b", config(rgb_band_indices=[5, 4, 3], depth_input_rescale=0.5, depth_hidden_size=48))
    model.set_depth_model(make_depth_model())
    model.base_model.set_adapter(["a", "b"])
    seen = []
    model.base_model.depth_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"]), with_kwargs=True)
    x = torch.rand(2, 6, 32, 32)
    model.eval()(pixel_values=x)
    assert len(seen) == 2
    for indices, rescale, got in (([0, 1, 2], 1.0, seen[0]), ([5, 4, 3], 0.5, seen[1])):
        cfg = model.peft_config["a"]
        want = normalize_for_depth(select_rgb(x, indices), rescale, 0.0, cfg.depth_image_mean, cfg.depth_image_std)
        want = torch.nn.functional.interpolate(want, size=(35, 35), mode="bilinear", align_corners=False)
        torch.testing.assert_close(got, want)


def test_depth_model_of_another_width_gets_a_projection_recorded_in_the_config(tmp_path):
    from peft import PeftModel

    model = get_peft_model(make_model(), config())  # depth_hidden_size not declared
    model.set_depth_model(make_depth_model(hidden_size=40))
    assert model.peft_config["default"].depth_hidden_size == 40
    projection = model.base_model.spectralmoe_depth_projection["default"]
    assert projection.in_features == 40 and projection.weight.requires_grad
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(pixel_values=x).last_hidden_state
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(), tmp_path)
    loaded.set_depth_model(make_depth_model(hidden_size=40))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(pixel_values=x).last_hidden_state, expected, rtol=0, atol=0)


def test_cached_depth_features_equal_the_on_the_fly_stream():
    model = with_depth().eval()
    x = torch.rand(2, 3, 40, 24)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
        cached = model.base_model.compute_depth_hidden_states(x)
        model.set_depth_model(None)  # the cache alone is enough
        got = model(pixel_values=x, depth_hidden_states=cached).last_hidden_state
    assert all(h.ndim == 4 for h in cached)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# --- 7. the balance loss reaches the routers through any backward ---------------------------------------------------


def gate_grads(model) -> list[torch.Tensor]:
    return [p.grad for n, p in model.named_parameters() if "gate" in n and "noise" not in n and p.requires_grad]


def test_zero_task_loss_still_trains_the_routers_in_a_plain_loop():
    model = with_depth().train()
    out = model(pixel_values=torch.rand(2, 3, 32, 32))
    (out.last_hidden_state * 0).sum().backward()  # a task loss of exactly zero
    grads = gate_grads(model)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_in_graph_aux_loss_equals_adding_it_by_hand_and_is_never_counted_twice():
    def grads(aux_loss_in_graph: bool, add_by_hand: bool):
        torch.manual_seed(3)
        model = with_depth(aux_loss_in_graph=aux_loss_in_graph).train()
        torch.manual_seed(4)
        out = model(pixel_values=torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)))
        loss = out.last_hidden_state.pow(2).mean()
        if add_by_hand:
            loss = loss + model.get_aux_loss()
        loss.backward()
        return adapter_grads(model)

    by_hand = grads(aux_loss_in_graph=False, add_by_hand=True)
    without = grads(aux_loss_in_graph=False, add_by_hand=False)
    in_graph = grads(aux_loss_in_graph=True, add_by_hand=False)
    in_graph_and_by_hand = grads(aux_loss_in_graph=True, add_by_hand=True)  # old code: still counted once
    assert any(not torch.allclose(by_hand[n], without[n]) for n in by_hand)  # the aux loss matters
    for name in by_hand:
        torch.testing.assert_close(in_graph[name], by_hand[name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(in_graph_and_by_hand[name], by_hand[name], rtol=1e-5, atol=1e-7, msg=name)


def test_zero_task_loss_still_trains_the_routers_under_a_plain_trainer(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Images(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return {"pixel_values": torch.rand(3, 32, 32), "labels": torch.tensor(index % 3)}

    class GradSpy(TrainerCallback):
        grads: list = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            GradSpy.grads = [g.clone() for g in gate_grads(model)]

    model = get_peft_model(make_model("vit_classifier"), config(use_depth=False))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
                             save_strategy="no", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=Images(), callbacks=[GradSpy()],
                      compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum() * 0)
    trainer.train()
    assert GradSpy.grads and all(g.abs().sum() > 0 for g in GradSpy.grads)


def test_a_deep_copy_runs_its_own_forwards():
    import copy

    model = with_depth().eval()
    teacher = copy.deepcopy(model)  # an EMA teacher, as in mean-teacher domain adaptation
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(pixel_values=x).last_hidden_state,
                                   model(pixel_values=x).last_hidden_state, rtol=0, atol=0)
        teacher(pixel_values=torch.rand(3, 3, 32, 32))
    assert model.get_routing_stats()[0]["visual"].topk_indices.shape[0] == 2  # the copy's forward is not ours
    assert teacher.get_routing_stats()[0]["visual"].topk_indices.shape[0] == 3
