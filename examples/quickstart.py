"""Quickstart: SpectralMoE on a tiny DINOv2 with a 6-band input and a depth model; train, save, reload.

The models are randomly initialized (nothing is downloaded here): this shows the workflow, not accuracy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers as tf
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm

import spectralmoe_peft


def make_vit(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tf.Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                             image_size=64, patch_size=8, num_channels=6)
    return tf.Dinov2Model(config).eval()


def make_depth_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed + 1)  # other width, depth and patch size than the ViT, as Depth Anything vs DINOv3
    config = tf.Dinov2Config(hidden_size=48, num_hidden_layers=3, num_attention_heads=2, intermediate_size=96,
                             image_size=63, patch_size=7)
    return tf.Dinov2Model(config).eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="outputs/quickstart")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    print("Note: tiny randomly initialized models (offline); pass real ones for real results.")

    config = spectralmoe_peft.SpectralMoEConfig(num_experts=6, top_k=1, expert_rank=8, num_tokens=20,
                                                rgb_band_indices=[2, 1, 0], depth_hidden_size=48)
    model = get_peft_model(make_vit(args.seed), config)
    depth = make_depth_model(args.seed)
    model.set_depth_model(depth)
    model.print_trainable_parameters()
    head = torch.nn.Linear(64, 4)  # per-patch classes, a stand-in for a segmentation head
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    generator = torch.Generator().manual_seed(args.seed)
    images = torch.rand(8, 6, 64, 64, generator=generator)
    labels = torch.randint(0, 4, (8, 64), generator=generator)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in (bar := tqdm(range(args.steps), desc="training")):
        batch = torch.arange(step * 2, step * 2 + 2) % 8
        tokens = model(pixel_values=images[batch]).last_hidden_state[:, 1:]  # drop CLS
        task = torch.nn.functional.cross_entropy(head(tokens).flatten(0, 1), labels[batch].flatten())
        loss = task  # the load-balancing loss is already in the graph (aux_loss_in_graph=True): don't add it
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", aux=f"{model.get_aux_loss().item():.4f}")  # aux: for logging

    loads = {block: stats["visual"].expert_load.tolist() for block, stats in model.get_routing_stats().items()}
    for block, load in loads.items():
        print(f"block {block} expert load (visual): " + " ".join(f"{v:.2f}" for v in load))

    model.eval()
    x = images[:2]
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
    model.save_pretrained(out / "adapter")
    reloaded = PeftModel.from_pretrained(make_vit(args.seed), out / "adapter").eval()
    reloaded.set_depth_model(depth)
    with torch.no_grad():
        reload_equal = torch.equal(reloaded(pixel_values=x).last_hidden_state, expected)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"final loss {loss.item():.4f} | trainable params {trainable} | adapter in {out / 'adapter'} | "
          f"reload identical: {reload_equal}")
    if not reload_equal:
        sys.exit("reloaded adapter gives different outputs")
    return {"loss": float(loss.item()), "trainable_params": trainable, "reload_equal": reload_equal}


if __name__ == "__main__":
    main()
