"""Training the segmentation models: the plain loop and the Trainer path add the aux loss, log routing health,
respect ignore_index and nodata, and follow the paper's recipe."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from spectralmoe_peft import SpectralMoEConfig
from spectralmoe_peft.dgss.models import build_upernet, segmentation_logits
from spectralmoe_peft.dgss.train import (
    TrainConfig,
    poly_lr_lambda,
    routing_health,
    segmentation_loss,
    train_segmentation,
)
from spectralmoe_peft.dgss.trainer import SpectralMoETrainer, collate_segmentation, paper_training_arguments

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


def test_paper_recipe_defaults():
    config = TrainConfig()
    assert (config.learning_rate, config.weight_decay, config.poly_power) == (1e-4, 0.05, 0.9)
    schedule = poly_lr_lambda(100, 0.9)
    assert schedule(0) == 1.0 and schedule(100) == 0.0 and schedule(50) == pytest.approx(0.5 ** 0.9)
    args = paper_training_arguments("unused")
    assert (args.learning_rate, args.weight_decay, args.lr_scheduler_kwargs["power"]) == (1e-4, 0.05, 0.9)
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
    original = model.base_model._new_state

    def spy(*args, **kwargs):
        state = original(*args, **kwargs)
        masks.append(state.token_mask)
        return state

    model.base_model._new_state = spy
    train_segmentation(model, dataset(nodata_rows=16), TrainConfig(steps=2, batch_size=4), progress=False)
    grid = SIZE // 8
    assert masks and all(m is not None and m.shape == (4, grid * grid) for m in masks)
    assert not masks[0][:, : grid * grid // 2].any() and masks[0][:, grid * grid // 2 :].all()


def test_plain_loop_refuses_non_finite_loss():
    bad = dataset(4)
    bad[0]["pixel_values"][0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="Non-finite loss at step 0"):
        train_segmentation(upernet(), bad, TrainConfig(steps=1, batch_size=4), progress=False)


@pytest.mark.parametrize("method", ["spectralmoe", "lora", "frozen"])
def test_trainer_path(tmp_path, method):
    model = upernet(method)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = paper_training_arguments(str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=2,
                                    learning_rate=1e-3, use_cpu=True, disable_tqdm=True)
    trainer = SpectralMoETrainer(model=model, args=args, train_dataset=dataset(8), data_collator=collate_segmentation)
    trainer.train()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every trainable tensor (adapter, head) moved
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs
    routing_keys = [k for k in logs[0] if k.startswith("routing/")]
    if method == "spectralmoe":
        assert "aux_loss" in logs[0] and logs[0]["aux_loss"] > 0
        assert "routing/block3/visual/entropy" in routing_keys and "routing/block0/visual/load_e2" in routing_keys
    else:
        assert not routing_keys


def test_routing_health_reads_the_last_forward():
    model = upernet().eval()
    with pytest.raises(RuntimeError, match="run a forward pass first"):
        routing_health(model)
    batch = collate_segmentation(dataset(2))
    with torch.no_grad():
        segmentation_logits(model, batch)
    assert len(routing_health(model)) == 4
