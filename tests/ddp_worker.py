"""Two-process DDP (gloo, CPU) training of a SpectralMoE-wrapped ViT; run by tests/test_distributed.py.

Usage: python tests/ddp_worker.py OUT_DIR. Each rank trains on its own data shard without
find_unused_parameters and writes its final trainable parameters to OUT_DIR/rank<r>.pt.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout, as for the tests run from its root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# every config family: parameters a config does not use must not exist (plain DDP stops on an unused one)
FAMILIES = {
    "depth_noisy": dict(init_weights="paper"),
    "no_noise": dict(noisy_gating=False),
    "shared_gates": dict(share_gates=True, init_weights="paper"),
    "visual_only": dict(use_depth=False, init_weights="paper"),
    # aux-free balancing: its routing biases are buffers, not broadcast here, and still equal on both ranks (the
    # update reads the load averaged over ranks)
    "aux_free": dict(balancing="both", bias_update_rate=0.05),
}


def train(family: str, overrides: dict, rank: int, out: str) -> None:
    from peft import get_peft_model
    from tiny_models import make_depth_model, make_model

    from spectralmoe_peft import SpectralMoEConfig

    torch.manual_seed(0)  # identical initial replicas
    config = SpectralMoEConfig(**{"num_experts": 4, "top_k": 1, "num_tokens": 6, "expert_rank": 4,
                                  "depth_hidden_size": 48, **overrides})
    model = get_peft_model(make_model("dinov2"), config)
    if config.use_depth:
        model.set_depth_model(make_depth_model())
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False,
                                                    broadcast_buffers=family != "aux_free")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    start = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own shard (and its own gate noise)
    for _ in range(3):
        x = torch.rand(2, 3, 32, 32, generator=generator)
        hidden = ddp(pixel_values=x).last_hidden_state
        loss = hidden.pow(2).mean()  # the balance loss rides along in the graph
        optimizer.zero_grad()
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"{family}: no gradient for {missing}"
        optimizer.step()
    changed = sum(not torch.equal(p, s) for p, s in zip(params, start))
    buffers = [b.detach() for n, b in model.named_buffers() if "spectralmoe_" in n]
    torch.save({"params": [p.detach() for p in params], "changed": changed, "total": len(params), "buffers": buffers},
               Path(out) / f"rank{rank}_{family}.pt")


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for family, overrides in FAMILIES.items():
        train(family, overrides, rank, out)
    dist.barrier()  # neither rank tears gloo down while the other still talks to it (a teardown race aborts)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2, free_port(), sys.argv[1]), nprocs=2, join=True)
