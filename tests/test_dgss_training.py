"""Training the segmentation models: the plain loop and the Trainer path add the aux loss, log routing health,
respect ignore_index and nodata, stop on a non-finite loss, and follow the paper's recipe."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import EvalPrediction

import spectralmoe_peft.dgss.trainer as trainer_module
from spectralmoe_peft import SpectralMoEConfig
from spectralmoe_peft.dgss.evaluate import confusion_matrix, segmentation_metrics
from spectralmoe_peft.dgss.models import (
    build_upernet,
    enable_gradient_checkpointing,
    find_backbone,
    segmentation_logits,
)
from spectralmoe_peft.dgss.train import (
    TrainConfig,
    poly_lr_lambda,
    routing_health,
    routing_summary,
    segmentation_loss,
    train_segmentation,
)
from spectralmoe_peft.dgss.trainer import (
    SpectralMoETrainer,
    argmax_logits,
    collate_segmentation,
    paper_training_arguments,
    segmentation_compute_metrics,
)

SIZE = 32


def dataset(n=16, seed=0, nodata_rows=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        x = torch.randn(6, SIZE, SIZE, generator=g)
        labels = (x[0] > 0).long() + 2 * (x[3] > 0).long()  # learnable from the pixels
        nodata = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        nodata[:nodata_rows] = True
        labels[nodata] = 255
        items.append({"pixel_values": x, "labels": labels, "nodata_mask": nodata})
    return items


def upernet(method="spectralmoe", seed=0):
    base, to_save = build_upernet(6, 4, image_size=SIZE, head_hidden_size=32, seed=seed)
    if method == "frozen":
        base.decode_head.requires_grad_(True)
        return base
    if method == "lora":
        return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=to_save))
    config = SpectralMoEConfig(num_experts=3, expert_rank=4, num_tokens=8, use_depth=False, modules_to_save=to_save)
    return get_peft_model(base, config)


def test_paper_recipe_defaults(monkeypatch):
    """docs/full_scale.md: "Both training paths default to it" (AdamW, lr 1e-4, wd 0.05, poly 0.9, batch 8, 40k
    iterations, bf16 autocast where the device supports it)."""
    config = TrainConfig()
    assert (config.learning_rate, config.weight_decay, config.poly_power) == (1e-4, 0.05, 0.9)
    assert (config.steps, config.batch_size, config.precision) == (40_000, 8, "auto")
    schedule = poly_lr_lambda(100, 0.9)
    assert schedule(0) == 1.0 and schedule(100) == 0.0 and schedule(50) == pytest.approx(0.5 ** 0.9)
    args = paper_training_arguments("unused")
    assert (args.learning_rate, args.weight_decay, args.lr_scheduler_kwargs["power"]) == (1e-4, 0.05, 0.9)
    assert (args.max_steps, args.per_device_train_batch_size, args.optim) == (40_000, 8, "adamw_torch")
    assert args.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    monkeypatch.setattr(trainer_module, "_bf16_supported", lambda: True)  # as on a bf16 GPU
    monkeypatch.setattr(trainer_module, "TrainingArguments", lambda **settings: settings)
    assert paper_training_arguments("unused")["bf16"] is True
    assert paper_training_arguments("unused", use_cpu=True)["bf16"] is False  # CPU bf16 would be slower
    assert paper_training_arguments("unused", bf16=False)["bf16"] is False  # overrides win
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


def test_loss_ignores_ignore_index_and_never_goes_nan():
    logits = torch.randn(2, 4, 5, 5, requires_grad=True)
    labels = torch.full((2, 5, 5), 255)
    loss = segmentation_loss(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
    labels[0, 0, 0] = 1
    expected = torch.nn.functional.cross_entropy(logits[:1, :, 0, 0], torch.tensor([1]))
    assert segmentation_loss(logits, labels).item() == pytest.approx(expected.item())


def test_plain_loop_trains_with_aux_loss_and_routing_health():
    model = upernet()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    history = train_segmentation(model, dataset(), TrainConfig(steps=30, batch_size=4, learning_rate=5e-3,
                                                               log_every=5), progress=False)
    assert history.task_loss[-1] < history.task_loss[0]
    assert all(a > 0 for a in history.aux_loss)  # the balance loss is part of what is optimized
    for total, task, aux in zip(history.loss, history.task_loss, history.aux_loss):
        assert total == pytest.approx(task + aux, rel=1e-6)  # fp32 sum
    assert history.learning_rate[0] > history.learning_rate[-1]
    health = history.routing[-1]
    assert set(health) == {f"block{i}/visual" for i in range(4)}
    for entry in health.values():
        assert sum(entry["load"]) == pytest.approx(1.0, abs=1e-3)
        assert 0 < entry["entropy"] <= torch.log(torch.tensor(3.0))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert not model.training  # left in eval mode for evaluation


def test_plain_loop_passes_nodata_to_the_adapter():
    model = upernet()
    masks = []
    holder = model.base_model.model.spectralmoe  # the per-forward machinery lives in the model
    original = holder._new_state

    def spy(*args, **kwargs):
        state = original(*args, **kwargs)
        masks.append(state.token_mask)
        return state

    holder._new_state = spy
    train_segmentation(model, dataset(nodata_rows=16), TrainConfig(steps=2, batch_size=4), progress=False)
    grid = SIZE // 8
    assert masks and all(m is not None and m.shape == (4, grid * grid) for m in masks)
    assert not masks[0][:, : grid * grid // 2].any() and masks[0][:, grid * grid // 2 :].all()


def test_plain_loop_refuses_non_finite_loss():
    bad = dataset(4)
    bad[0]["pixel_values"][0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="Non-finite loss at step 0"):
        train_segmentation(upernet(), bad, TrainConfig(steps=1, batch_size=4), progress=False)


def trainer_arguments(tmp_path, **overrides):
    settings = dict(max_steps=4, per_device_train_batch_size=4, logging_steps=2, learning_rate=1e-3, use_cpu=True,
                    disable_tqdm=True)
    return paper_training_arguments(str(tmp_path), **{**settings, **overrides})


COMPACT = {f"routing/visual/{name}"
           for name in ("load_entropy", "max_load", "min_load", "dead_experts", "gate_entropy")}


@pytest.mark.parametrize("method", ["spectralmoe", "lora", "frozen"])
def test_trainer_path(tmp_path, method):
    model = upernet(method)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = SpectralMoETrainer(model=model, args=trainer_arguments(tmp_path), train_dataset=dataset(8),
                                 data_collator=collate_segmentation)
    trainer.train()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every trainable tensor (adapter, head) moved
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs
    routing_keys = {k for k in logs[0] if k.startswith("routing/")}
    if method == "spectralmoe":
        assert "aux_loss" in logs[0] and logs[0]["aux_loss"] > 0
        assert routing_keys == COMPACT  # compact by default: 5 numbers per stream, whatever the depth
        assert 0 < logs[0]["routing/visual/load_entropy"] <= 1 and logs[0]["routing/visual/dead_experts"] >= 0
    else:
        assert not routing_keys


def test_trainer_full_routing_log_and_nodata_mask_with_default_arguments(tmp_path):
    """remove_unused_columns=True (the TrainingArguments default) would drop nodata_mask: the trainer keeps it."""
    model = upernet()
    received = []
    forward = model.forward

    def spy(*args, **kwargs):
        received.append(kwargs.get("nodata_mask"))
        return forward(*args, **kwargs)

    model.forward = spy
    args = trainer_arguments(tmp_path, remove_unused_columns=True, max_steps=2, logging_steps=1)
    trainer = SpectralMoETrainer(model=model, args=args, train_dataset=dataset(8, nodata_rows=8),
                                 data_collator=collate_segmentation, routing_log="full")
    trainer.train()
    assert len(received) == 2 and all(mask is not None and mask.shape == (4, SIZE, SIZE) for mask in received)
    assert all(mask[:, :8].all() and not mask[:, 8:].any() for mask in received)
    keys = {k for k in trainer.state.log_history[0] if k.startswith("routing/")}
    per_block = {f"routing/block{b}/visual/{name}" for b in range(4)
                 for name in ("entropy", "max_share", "load_e0", "load_e1", "load_e2")}
    assert keys == COMPACT | per_block
    with pytest.raises(ValueError, match="routing_log must be one of"):
        SpectralMoETrainer(model=model, args=args, routing_log="verbose")


@pytest.mark.parametrize("method", ["spectralmoe", "lora"])
def test_trainer_refuses_non_finite_loss(tmp_path, method):
    """docs/segmentation.md: a non-finite loss stops training with the step number, on both paths."""
    model = upernet(method)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bad = dataset(4)
    for item in bad:
        item["pixel_values"][0, 0, 0] = float("nan")
    trainer = SpectralMoETrainer(model=model, args=trainer_arguments(tmp_path), train_dataset=bad,
                                 data_collator=collate_segmentation)
    with pytest.raises(FloatingPointError, match="Non-finite loss at step 0"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # no NaN reached the weights


def test_routing_summary_against_a_hand_computation():
    health = {
        "block0/visual": {"load": [0.5, 0.5, 0.0], "entropy": 0.6, "max_share": 0.5},
        "block1/visual": {"load": [0.2, 0.3, 0.5], "entropy": 1.0, "max_share": 0.5},
        "block0/depth": {"load": [1.0, 0.0, 0.0], "entropy": 0.0, "max_share": 1.0},
    }
    summary = routing_summary(health)
    entropy1 = -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5)) / math.log(3)
    assert summary["visual/load_entropy"] == pytest.approx((math.log(2) / math.log(3) + entropy1) / 2)
    assert (summary["visual/max_load"], summary["visual/min_load"], summary["visual/dead_experts"]) == (0.5, 0.0, 1)
    assert summary["visual/gate_entropy"] == pytest.approx(0.8)
    assert summary["depth/load_entropy"] == 0.0 and summary["depth/dead_experts"] == 2
    assert len(summary) == 10


def test_compute_metrics_matches_the_metrics_code(tmp_path):
    names = ["a", "b", "c", "d"]
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 9, 7, generator=g)
    labels = torch.randint(0, 3, (3, 9, 7), generator=g)  # class d never labelled
    labels[0, :2] = 255
    labels[2, -1] = -100  # padding the Trainer adds between batches of different sizes
    expected = segmentation_metrics(confusion_matrix(logits.argmax(1), torch.where(labels == -100, 255, labels), 4),
                                    names)
    compute = segmentation_compute_metrics(names)
    for predictions in (logits.numpy(), argmax_logits(logits).numpy()):  # logits or class ids
        result = compute(EvalPrediction(predictions=predictions, label_ids=labels.numpy()))
        assert result["miou"] == pytest.approx(expected["miou"]) and not math.isnan(result["miou"])
        assert result["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"])
        assert {k: result[f"iou_{k}"] for k in names} == pytest.approx(expected["per_class_iou"])

    model = upernet()  # and through Trainer.evaluate, against the logits computed by hand
    data = dataset(6, seed=3)
    trainer = SpectralMoETrainer(model=model, args=trainer_arguments(tmp_path, per_device_eval_batch_size=4),
                                 eval_dataset=data, data_collator=collate_segmentation,
                                 compute_metrics=segmentation_compute_metrics(names),
                                 preprocess_logits_for_metrics=argmax_logits)
    result = trainer.evaluate()
    batch = collate_segmentation(data)
    with torch.no_grad():
        prediction = segmentation_logits(model.eval(), batch, {"nodata_mask": batch["nodata_mask"]}).argmax(1)
    reference = segmentation_metrics(confusion_matrix(prediction, batch["labels"], 4), names)
    assert result["eval_miou"] == pytest.approx(reference["miou"])
    assert result["eval_pixel_accuracy"] == pytest.approx(reference["pixel_accuracy"])


@pytest.mark.parametrize("family", ["upernet", "mask2former"])
def test_gradient_checkpointing_helper_finds_the_vit(family):
    """docs/reliability.md: gradient checkpointing goes on the ViT; UperNet and Mask2Former do not support it
    themselves, and Mask2Former has no `.backbone`: enable_gradient_checkpointing finds it."""
    import transformers as tf

    if family == "upernet":
        base, to_save = build_upernet(6, 4, image_size=SIZE, head_hidden_size=32)
        vit = base.backbone
    else:
        from spectralmoe_peft.dgss.mask2former import build_mask2former

        base, to_save = build_mask2former(6, 4, num_queries=8, image_size=SIZE, hidden_dim=32)
        vit = base.model.pixel_level_module.encoder
        assert not hasattr(base, "backbone")
    assert not base.supports_gradient_checkpointing
    torch.manual_seed(0)
    config = SpectralMoEConfig(num_experts=3, expert_rank=4, num_tokens=8, use_depth=False, modules_to_save=to_save)
    model = get_peft_model(base, config)
    assert find_backbone(model) is vit and isinstance(vit, tf.Dinov2Backbone)
    x = torch.randn(2, 6, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    calls = []
    # block 1: the gradient of block 0's adapter flows through it (nothing trainable is below block 0)
    vit.encoder.layer[1].get_base_layer().attention.register_forward_hook(lambda *_: calls.append(1))

    def gradients():
        model.train()
        model.zero_grad()
        torch.manual_seed(1)  # the routers' noise (the balance loss in the graph depends on it): the same both times
        outputs = model(pixel_values=x)
        if family == "upernet":
            outputs.logits.square().mean().backward()
        else:
            (outputs.masks_queries_logits.square().mean() + outputs.class_queries_logits.square().mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    plain = gradients()
    assert len(calls) == 1
    assert enable_gradient_checkpointing(model) is vit and vit.is_gradient_checkpointing
    checkpointed = gradients()
    assert len(calls) == 3  # the block's attention ran again in the backward: checkpointing is on
    adapter = [n for n in plain if "spectralmoe" in n]
    assert adapter and plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_routing_health_reads_the_last_forward():
    model = upernet().eval()
    with pytest.raises(RuntimeError, match="run a forward pass first"):
        routing_health(model)
    batch = collate_segmentation(dataset(2))
    with torch.no_grad():
        segmentation_logits(model, batch)
    assert len(routing_health(model)) == 4


def test_cached_depth_features_reach_the_adapter_on_both_paths(tmp_path):
    """Samples may carry cached depth_hidden_states (per-layer (C, h, w) grids): both loops hand them to the model
    (no depth model is attached, so the forward would fail without them), also with remove_unused_columns=True."""
    base, to_save = build_upernet(6, 4, image_size=SIZE, head_hidden_size=32)
    config = SpectralMoEConfig(num_experts=3, expert_rank=4, num_tokens=8, depth_hidden_size=16,
                               modules_to_save=to_save)
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(0)
    samples = dataset(8)
    for sample in samples:
        sample["depth_hidden_states"] = [torch.randn(16, 3, 5, generator=g) for _ in range(5)]
    received = []
    forward = model.forward

    def spy(*args, **kwargs):
        received.append([tuple(h.shape) for h in kwargs["depth_hidden_states"]])
        return forward(*args, **kwargs)

    model.forward = spy
    train_segmentation(model, samples, TrainConfig(steps=2, batch_size=4), progress=False)
    trainer = SpectralMoETrainer(model=model, args=trainer_arguments(tmp_path, remove_unused_columns=True, max_steps=2),
                                 train_dataset=samples, data_collator=collate_segmentation)
    trainer.train()
    assert received == [[(4, 16, 3, 5)] * 5] * 4


def test_trainer_with_gradient_checkpointing_through_the_helper(tmp_path):
    """docs/segmentation.md: with the Trainer, enable_gradient_checkpointing before train(); TrainingArguments'
    gradient_checkpointing would ask UperNet itself, which refuses."""
    model = upernet()
    with pytest.raises(ValueError, match="does not support"):
        SpectralMoETrainer(model=model, args=trainer_arguments(tmp_path, gradient_checkpointing=True, max_steps=1),
                           train_dataset=dataset(4), data_collator=collate_segmentation).train()
    vit = enable_gradient_checkpointing(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    SpectralMoETrainer(model=model, args=trainer_arguments(tmp_path, max_steps=1), train_dataset=dataset(4),
                       data_collator=collate_segmentation).train()
    assert vit.is_gradient_checkpointing
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("spectralmoe" in n for n in changed) and any("decode_head" in n for n in changed)
