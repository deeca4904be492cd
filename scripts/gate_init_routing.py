"""Routing after a short training run from zero gates (init_weights="paper", the released code's) vs N(0, 1/D) gates.

    python scripts/gate_init_routing.py            # 3 seeds x {noise on, off} x {zero, random gates}, ~1 min on CPU

A toy: the tiny random DINOv2 of the tests (2 blocks, width 32) with the depth stream, 6 experts, 100 AdamW steps
(lr 1e-3) on a random regression target. Both arms start from init_weights="paper"; the second redraws the gates
N(0, 1/D) as init_weights=True does. Prints, in eval mode after training, the normalized entropy of each stream's
expert load (1 = uniform) and how many of the 6 experts get tokens, averaged over blocks, streams and seeds.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from peft import get_peft_model

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from tiny_models import make_depth_model, make_model  # noqa: E402

from spectralmoe_peft import SpectralMoEConfig  # noqa: E402

NUM_EXPERTS = 6


def run(seed: int, random_gates: bool, noisy_gating: bool, steps: int = 100) -> tuple[float, float, int]:
    torch.manual_seed(seed)
    config = SpectralMoEConfig(num_experts=NUM_EXPERTS, num_tokens=6, expert_rank=4, depth_hidden_size=48,
                               init_weights="paper", noisy_gating=noisy_gating)
    model = get_peft_model(make_model("dinov2"), config)
    model.set_depth_model(make_depth_model())
    blocks = model.base_model.model.encoder.layer
    if random_gates:
        with torch.no_grad():
            for block in blocks:
                for gate in (block.spectralmoe_gate_visual, block.spectralmoe_gate_depth):
                    gate["default"].normal_(std=1 / math.sqrt(gate["default"].shape[-1]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(seed + 10)
    images = torch.rand(8, 3, 32, 32, generator=generator)
    targets = torch.randn(8, 17, 32, generator=generator)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, 8, (2,), generator=generator)
        loss = (model(pixel_values=images[pick]).last_hidden_state - targets[pick]).pow(2).mean()
        loss = loss + model.base_model.get_aux_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        model(pixel_values=images)
    entropies, used = [], []
    for streams in model.base_model.get_routing_stats().values():
        for stats in streams.values():
            load = stats.expert_load.clamp_min(1e-12)
            entropies.append(float(-(load * load.log()).sum()) / math.log(NUM_EXPERTS))
            used.append(int((stats.expert_load > 0).sum()))
    return sum(entropies) / len(entropies), sum(used) / len(used), min(used)


def main() -> None:
    torch.set_num_threads(1)
    print("noise  gates            load entropy  experts used (of 6)  fewest in a stream")
    for noisy_gating in (True, False):
        for random_gates in (False, True):
            runs = [run(seed, random_gates, noisy_gating) for seed in range(3)]
            label = "N(0, 1/D)" if random_gates else "zero (paper)"
            print(f"{'on' if noisy_gating else 'off':5}  {label:15}  {sum(r[0] for r in runs) / 3:12.3f}  "
                  f"{sum(r[1] for r in runs) / 3:19.2f}  {min(r[2] for r in runs):18d}")


if __name__ == "__main__":
    main()
