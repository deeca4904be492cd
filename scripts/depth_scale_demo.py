"""The cheaper depth stream on the demo (issue 14): SpectralMoE with depth at depth_input_scale 1.0 and 0.5.

Each arm trains the demo's ``spectralmoe_depth`` method (same data, budget and seed; only ``depth_input_scale``
differs) and reports the source/target mIoU and the routing health at the end of training (per stream: normalized
load entropy, max/min expert load, dead expert-block pairs, gate entropy), plus the depth model's input size and
token count per crop. Writes benchmarks/results/depth_scale_demo_<device>.json and prints a table. Seconds are
wall-clock on whatever else the machine runs: not a timing benchmark (benchmarks/ measures step time).

    python scripts/depth_scale_demo.py                 # both arms, the demo's budget (500 steps)
    python scripts/depth_scale_demo.py --steps 100     # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SCALES = (1.0, 0.5)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500, help="training steps per arm (the demo's: 500)")
    parser.add_argument("--scales", default=",".join(map(str, SCALES)), help="comma-separated depth_input_scale values")
    parser.add_argument("--eval-crop", type=int, default=None, help="evaluate on a centred window (quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from spectralmoe_peft.depth import resize_for_depth
    from spectralmoe_peft.dgss.demo import DemoConfig, run_demo
    from spectralmoe_peft.dgss.models import build_depth_model
    from spectralmoe_peft.dgss.train import routing_summary

    torch.set_num_threads(2)
    rows = []
    for scale in (float(s) for s in args.scales.split(",")):
        config = DemoConfig(methods=("spectralmoe_depth",), steps=args.steps, seed=args.seed, eval_crop=args.eval_crop,
                            progress=False, adapter_overrides={"depth_input_scale": scale})
        depth_model, _ = build_depth_model(config.depth_model, seed=config.seed + 1)
        patch = depth_model.config.patch_size
        size = tuple(resize_for_depth(torch.zeros(1, 3, config.crop, config.crop), (patch, patch), scale).shape[-2:])
        with tempfile.TemporaryDirectory() as out:
            config.out = out
            start = time.perf_counter()
            summary = run_demo(config)
        result = summary["methods"]["spectralmoe_depth"]
        rows.append({
            "depth_input_scale": scale,
            "depth_input_px_per_crop": list(size),
            "depth_tokens_per_crop": (size[0] // patch) * (size[1] // patch),
            "source_miou": result["source"]["miou"],
            "target_miou": result["target"]["miou"],
            "final_task_loss": result["final_task_loss"],
            "routing": routing_summary(result["routing_health"]),
            "routing_health": result["routing_health"],
            "train_seconds": result["train_seconds"],
            "seconds": round(time.perf_counter() - start, 1),
        })
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "routing_health"}), flush=True)
    header = (f"{'scale':>6}{'depth px':>10}{'tokens':>7}{'src mIoU':>9}{'tgt mIoU':>9}{'H_load v':>9}{'max v':>7}"
              f"{'min v':>7}{'dead v':>7}{'H_gate v':>9}{'H_load d':>9}{'max d':>7}{'min d':>7}{'dead d':>7}{'H_gate d':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        r = row["routing"]
        cells = "".join(f"{r[f'{s}/load_entropy']:>9.3f}{r[f'{s}/max_load']:>7.2f}{r[f'{s}/min_load']:>7.2f}"
                        f"{r[f'{s}/dead_experts']:>7d}{r[f'{s}/gate_entropy']:>9.3f}" for s in ("visual", "depth"))
        px = "x".join(map(str, row["depth_input_px_per_crop"]))
        print(f"{row['depth_input_scale']:>6}{px:>10}{row['depth_tokens_per_crop']:>7}{row['source_miou']:>9.3f}"
              f"{row['target_miou']:>9.3f}{cells}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = os.path.join(ROOT, "benchmarks", "results", f"depth_scale_demo_{device}.json")
    with open(path, "w") as file:
        json.dump({"steps": args.steps, "seed": args.seed, "eval_crop": args.eval_crop, "method": "spectralmoe_depth",
                   "note": "the demo's tiny random backbone and depth model (see its results.json note); seconds are "
                           "wall-clock on a shared machine, not a timing benchmark",
                   "arms": rows}, file, indent=2)
    print(f"\nwrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
