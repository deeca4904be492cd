"""The workflow's device path without a GPU: a fake CUDA that records every move (model, depth model, batches),
pinned loaders and autocast, and runs the computation on the CPU; and the CPU results unchanged against a plain
reference loop."""

from __future__ import annotations

import contextlib
import json
import sys

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import spectralmoe_peft.dgss.train as train_module
from spectralmoe_peft import SpectralMoEConfig
from spectralmoe_peft.dgss.evaluate import sliding_window_logits
from spectralmoe_peft.dgss.models import build_depth_model, build_upernet
from spectralmoe_peft.dgss.scenes import Scene
from spectralmoe_peft.dgss.train import (
    TrainConfig,
    autocast_dtype,
    poly_lr_lambda,
    resolve_device,
    train_segmentation,
)

SIZE = 32


def dataset(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        x = torch.randn(6, SIZE, SIZE, generator=g)
        nodata = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        nodata[:4] = True
        labels = (x[0] > 0).long()
        labels[nodata] = 255
        items.append({"pixel_values": x, "labels": labels, "nodata_mask": nodata})
    return items


def is_cuda(value) -> bool:
    return isinstance(value, (str, torch.device)) and torch.device(value).type == "cuda"


class FakeCuda:
    """Pretends CUDA (with bf16) is there: records what is sent to it, and computes on the CPU instead."""

    def __init__(self, monkeypatch):
        self.tensor_moves, self.module_moves, self.pinned, self.loaders, self.autocasts = [], [], [], [], []
        self.autocast_depth = 0
        real_tensor_to, real_module_to, real_loader = torch.Tensor.to, nn.Module.to, train_module.DataLoader
        fake = self

        def cpu_instead(args, kwargs):
            targeted = any(is_cuda(a) for a in args) or is_cuda(kwargs.get("device"))
            args = tuple("cpu" if is_cuda(a) else a for a in args)
            if is_cuda(kwargs.get("device")):
                kwargs = {**kwargs, "device": "cpu"}
            return targeted, args, kwargs

        def tensor_to(self, *args, **kwargs):
            targeted, args, kwargs = cpu_instead(args, kwargs)
            if targeted:
                fake.tensor_moves.append((tuple(self.shape), self.dtype, kwargs.get("non_blocking", False)))
            return real_tensor_to(self, *args, **kwargs)

        def module_to(self, *args, **kwargs):
            targeted, args, kwargs = cpu_instead(args, kwargs)
            if targeted:
                fake.module_moves.append(self)
            return real_module_to(self, *args, **kwargs)

        def pin_memory(self, *args, **kwargs):
            fake.pinned.append(tuple(self.shape))
            return self

        def loader(*args, pin_memory=False, **kwargs):
            fake.loaders.append(pin_memory)
            return real_loader(*args, pin_memory=False, **kwargs)

        @contextlib.contextmanager
        def autocast(device_type, dtype=None, **kwargs):
            fake.autocasts.append((device_type, dtype))
            fake.autocast_depth += 1
            try:
                yield
            finally:
                fake.autocast_depth -= 1

        def ours(*args, **kwargs):  # only this package sees CUDA: peft, safetensors, ... stay on their CPU paths
            return sys._getframe(1).f_globals.get("__name__", "").startswith("spectralmoe_peft")

        monkeypatch.setattr(torch.cuda, "is_available", ours)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", ours)
        monkeypatch.setattr(torch.Tensor, "to", tensor_to)
        monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
        monkeypatch.setattr(nn.Module, "to", module_to)
        monkeypatch.setattr(torch, "autocast", autocast)
        monkeypatch.setattr(train_module, "DataLoader", loader)


@pytest.fixture
def fake_cuda(monkeypatch):
    return FakeCuda(monkeypatch)


def spectralmoe_with_depth():
    base, to_save = build_upernet(6, 2, image_size=SIZE, head_hidden_size=16)
    depth_model, _ = build_depth_model()
    config = SpectralMoEConfig(num_experts=3, expert_rank=4, num_tokens=8, modules_to_save=to_save,
                               depth_hidden_size=64, rgb_band_indices=[2, 1, 0])
    model = get_peft_model(base, config)
    model.set_depth_model(depth_model)
    return model, depth_model


def test_device_defaults_to_cuda_when_available(monkeypatch):
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert autocast_dtype(torch.device("cpu")) is None  # CPU: fp32, results as before
    assert autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="half")
    with pytest.raises(ValueError, match="device: 'gpu0' is not a torch device"):
        TrainConfig(device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            TrainConfig(device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_device(None) == torch.device("cuda")
    assert autocast_dtype(torch.device("cuda")) is torch.bfloat16  # the paper's bf16, where supported
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype(torch.device("cuda")) is None


def test_plain_loop_sends_model_depth_model_and_every_batch_to_the_device(fake_cuda):
    model, depth_model = spectralmoe_with_depth()
    forwards_under_autocast = []
    model.register_forward_pre_hook(lambda *_: forwards_under_autocast.append(fake_cuda.autocast_depth > 0))
    steps = 3
    history = train_segmentation(model, dataset(), TrainConfig(steps=steps, batch_size=4, learning_rate=1e-3,
                                                               log_every=1), progress=False)
    assert fake_cuda.module_moves == [model]  # once, the whole model: its depth model moves with it
    assert model.base_model.depth_model is depth_model
    assert fake_cuda.loaders == [True]  # pinned host memory for asynchronous copies
    batch_shapes = sorted([(4, 6, SIZE, SIZE), (4, SIZE, SIZE), (4, SIZE, SIZE)])
    moved = [shape for shape, _, non_blocking in fake_cuda.tensor_moves if non_blocking]
    assert sorted(moved) == sorted(batch_shapes * steps)  # every tensor of every batch, and nothing else
    assert fake_cuda.autocasts == [("cuda", torch.bfloat16)] * steps
    assert forwards_under_autocast == [True] * steps
    assert (history.device, history.autocast) == ("cuda", "bfloat16")
    assert all(type(v) is float for v in history.loss + history.task_loss + history.aux_loss)  # host numbers
    assert history.routing and all(type(e["entropy"]) is float for e in history.routing[-1].values())


def test_sliding_window_sends_batches_to_the_device_and_keeps_logits_on_the_host(fake_cuda):
    def predict(batch):
        return batch["pixel_values"][:, :2]

    image = np.random.default_rng(0).standard_normal((3, 20, 30)).astype(np.float32)
    logits = sliding_window_logits(predict, image, 2, window=16, stride=16, batch_size=2, device="cuda")
    windows = 2 * 2  # rows start at 0, 4; columns at 0, 14
    assert len(fake_cuda.pinned) == 2 * (windows // 2)  # both tensors of each batch
    assert sorted(s for s, _, nb in fake_cuda.tensor_moves if nb) == sorted([(2, 3, 16, 16), (2, 16, 16)] * 2)
    assert logits.device.type == "cpu" and logits.dtype == torch.float32
    torch.testing.assert_close(logits, torch.from_numpy(image[:2]))


def synthetic_scene(name, seed):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((6, 48, 64)).astype(np.float32)
    labels = (image[3] > 0).astype(np.uint8) + 2 * (image[0] > 0).astype(np.uint8)
    valid = np.ones((48, 64), bool)
    valid[:3, :5] = False
    labels[~valid] = 255
    return Scene(name, image, labels, valid, tuple("abcdef"), (490.0, 560.0, 665.0, 842.0, 1610.0, 2190.0), 30.0)


def test_demo_runs_on_the_device_it_names(fake_cuda, tmp_path, capsys):
    from spectralmoe_peft.dgss.demo import DemoConfig, run_demo

    config = DemoConfig(out=tmp_path, methods=("spectralmoe_depth",), steps=2, batch_size=2, crop=32, progress=False,
                        scenes=(synthetic_scene("source", 0), synthetic_scene("target", 1)))
    summary = run_demo(config)
    assert "device: cuda (bf16 autocast)" in capsys.readouterr().out
    assert (summary["device"], summary["precision"]) == ("cuda", "bf16 autocast")
    assert json.loads((tmp_path / "results.json").read_text())["device"] == "cuda"
    # the trained model and the reloaded one; nothing else is sent as a whole
    assert len(fake_cuda.module_moves) == 2
    assert fake_cuda.autocasts and all(entry == ("cuda", torch.bfloat16) for entry in fake_cuda.autocasts)
    assert summary["reload_check"]["identical"]


def test_cpu_results_equal_a_plain_reference_loop():
    """Device handling changed nothing on the CPU: the same weights as a loop written out by hand."""
    data = dataset(8)

    def lora(seed=0):
        base, to_save = build_upernet(6, 2, image_size=SIZE, head_hidden_size=16, seed=seed)
        torch.manual_seed(seed)
        return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=to_save))

    steps, lr = 5, 1e-3
    model = lora()
    train_segmentation(model, data, TrainConfig(steps=steps, batch_size=4, learning_rate=lr), progress=False)

    reference = lora()
    parameters = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lr_lambda(steps, 0.9))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    reference.train()
    batches = iter(loader)
    for _ in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        logits = reference(pixel_values=batch["pixel_values"]).logits
        logits = nn.functional.interpolate(logits, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        labels = batch["labels"]
        loss = nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="sum")
        loss = loss / (labels != 255).sum().clamp_min(1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    trained, expected = dict(model.named_parameters()), dict(reference.named_parameters())
    assert trained.keys() == expected.keys()
    changed = 0
    for name, parameter in trained.items():
        assert torch.equal(parameter, expected[name]), name
        changed += parameter.requires_grad
    assert changed > 0
