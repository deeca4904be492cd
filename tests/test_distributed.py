"""DDP on CPU (gloo, 2 processes) for every config family: trains without find_unused_parameters and keeps the
replicas identical; FSDP with activation checkpointing (one process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch


def test_two_process_ddp_keeps_replicas_identical(tmp_path):
    worker = Path(__file__).resolve().parent / "ddp_worker.py"
    result = subprocess.run([sys.executable, str(worker), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    for family in ("depth_noisy", "no_noise", "shared_gates", "visual_only", "aux_free"):  # ddp_worker FAMILIES
        ranks = [torch.load(tmp_path / f"rank{r}_{family}.pt") for r in range(2)]
        assert ranks[0]["changed"] == ranks[0]["total"], family  # every adapter tensor trained (none unused)
        for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
            assert torch.equal(a, b), family  # gradients averaged: the replicas never drift apart
        for a, b in zip(ranks[0]["buffers"], ranks[1]["buffers"]):
            assert torch.equal(a, b), family
    biases = torch.load(tmp_path / "rank0_aux_free.pt")["buffers"]
    assert biases and all(b.abs().sum() > 0 for b in biases)  # the aux-free biases moved (3 steps, rate 0.05)


def test_fsdp_with_activation_checkpointing_matches_the_unwrapped_model_and_saves_the_adapter(tmp_path):
    """FSDP1 and FSDP2 (gloo, CPU, one process), one unit per adapted block, checkpointing around the ViT blocks, two
    forwards before one backward: the adapter's gradients equal the unwrapped model's; the adapter saved from FSDP1's
    full state dict reloads to the same outputs."""
    worker = Path(__file__).resolve().parent / "fsdp_worker.py"
    result = subprocess.run([sys.executable, str(worker), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    for run in ("grads.pt", "grads_fsdp2.pt"):  # FSDP1, then FSDP2's fully_shard
        grads = torch.load(tmp_path / run)
        assert set(grads["got"]) == set(grads["expected"]) and len(grads["got"]) >= 15
        for name, expected in grads["expected"].items():
            torch.testing.assert_close(grads["got"][name], expected, rtol=1e-5, atol=1e-7, msg=f"{run}: {name}")
    reload = torch.load(tmp_path / "reload.pt")
    torch.testing.assert_close(reload["reloaded"], reload["original"], rtol=0, atol=0)
