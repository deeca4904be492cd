"""Balance-loss sweep on the demo's real scenes (issue 13): reduction over blocks, weight, and aux-free balancing.

Each arm trains SpectralMoE with depth (the demo's `spectralmoe_depth`, same data, budget and seed) and reports the
routing health at the end of training (per stream: normalized load entropy, max/min expert load, dead expert-block
pairs) and the source/target mIoU. Writes benchmarks/results/balance_sweep_<device>.json and prints a table.

    python scripts/balance_sweep.py                  # all arms, the demo's budget (500 steps)
    python scripts/balance_sweep.py --steps 100      # quicker
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

ARMS = {
    "sum 1e-2 (0.1.0 default)": dict(balance_loss_reduction="sum", balance_loss_weight=1e-2),
    "mean 1e-2": dict(balance_loss_reduction="mean", balance_loss_weight=1e-2),
    "mean 1e-1": dict(balance_loss_reduction="mean", balance_loss_weight=1e-1),
    "mean 1": dict(balance_loss_reduction="mean", balance_loss_weight=1.0),
    "mean 1e3 (released code)": dict(balance_loss_reduction="mean", balance_loss_weight=1e3),
    "no balancing": dict(balance_loss_weight=0.0),
    "aux-free": dict(balancing="aux_free"),
    "aux-free + sum 1e-2": dict(balancing="both", balance_loss_weight=1e-2),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500, help="training steps per arm (the demo's: 500)")
    parser.add_argument("--arms", default=None, help="comma-separated subset of: " + "; ".join(ARMS))
    parser.add_argument("--eval-crop", type=int, default=None, help="evaluate on a centred window (quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from spectralmoe_peft.dgss.demo import DemoConfig, run_demo
    from spectralmoe_peft.dgss.train import routing_summary

    torch.set_num_threads(2)
    arms = {k: v for k, v in ARMS.items() if args.arms is None or k in args.arms.split(",")}
    rows = []
    for name, overrides in arms.items():
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            summary = run_demo(DemoConfig(out=out, methods=("spectralmoe_depth",), steps=args.steps, seed=args.seed,
                                          eval_crop=args.eval_crop, progress=False, adapter_overrides=overrides))
        result = summary["methods"]["spectralmoe_depth"]
        health = routing_summary(result["routing_health"])
        rows.append({"arm": name, "overrides": overrides, "source_miou": result["source"]["miou"],
                     "target_miou": result["target"]["miou"], "routing": health,
                     "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    header = (f"{'arm':<28}{'src mIoU':>9}{'tgt mIoU':>9}{'H_load v':>9}{'max v':>7}{'min v':>7}{'dead v':>7}"
              f"{'H_load d':>9}{'max d':>7}{'min d':>7}{'dead d':>7}")
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        r = row["routing"]
        cells = "".join(f"{r.get(f'{s}/load_entropy', float('nan')):>9.3f}{r.get(f'{s}/max_load', float('nan')):>7.2f}"
                        f"{r.get(f'{s}/min_load', float('nan')):>7.2f}{r.get(f'{s}/dead_experts', -1):>7d}"
                        for s in ("visual", "depth"))
        print(f"{row['arm']:<28}{row['source_miou']:>9.3f}{row['target_miou']:>9.3f}{cells}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = os.path.join(ROOT, "benchmarks", "results", f"balance_sweep_{device}.json")
    with open(path, "w") as file:
        json.dump({"steps": args.steps, "seed": args.seed, "eval_crop": args.eval_crop, "arms": rows}, file, indent=2)
    print(f"\nwrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
