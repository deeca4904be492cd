"""DDP on CPU (gloo, 2 processes): trains without find_unused_parameters and keeps the replicas identical."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch


def test_two_process_ddp_keeps_replicas_identical(tmp_path):
    worker = Path(__file__).resolve().parent / "ddp_worker.py"
    result = subprocess.run([sys.executable, str(worker), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["changed"] == ranks[0]["total"]  # every adapter tensor trained (no unused experts)
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)  # gradients averaged: the replicas never drift apart
