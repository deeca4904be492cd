"""``spectralmoe-peft`` command line: ``spectralmoe-peft demo --out DIR`` runs the cross-sensor comparison."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence


def _demo_parser(subparsers) -> None:
    from .dgss.demo import METHODS

    demo = subparsers.add_parser(
        "demo", help="train on Landsat-7 (NC), test on Sentinel-2 (Brandenburg): frozen, LoRA, SpectralMoE",
        description="Cross-sensor domain-generalized segmentation on real data, four methods on one budget.",
    )
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder")
    demo.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    demo.add_argument("--steps", type=int, default=500, help="training steps per method")
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--crop", type=int, default=64, help="training crop / sliding window size in pixels")
    demo.add_argument("--lr", type=float, default=5e-3,
                      help="learning rate (the paper uses 1e-4 over 40k steps on a pretrained backbone; this short "
                      "schedule on a random one needs more)")
    demo.add_argument("--backbone", default="tiny", help="'tiny' (random, built in) or a Hub id / path of a ViT")
    demo.add_argument("--depth-model", default="tiny", help="'tiny' (random) or a Hub id / path of a depth model")
    demo.add_argument("--num-experts", type=int, default=6)
    demo.add_argument("--top-k", type=int, default=1)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--eval-crop", type=int, default=None, help="evaluate on a centred window of this size only")
    demo.add_argument("--device", default=None,
                      help="where to train and evaluate, e.g. cuda, cuda:1, cpu (default: cuda when available, else "
                      "cpu); bf16 autocast on a CUDA device that supports it")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="spectralmoe-peft", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _demo_parser(subparsers)
    args = parser.parse_args(argv)
    if args.command == "demo":
        import warnings

        from .dgss.demo import DemoConfig, run_demo

        # peft calls a transformers API that transformers 5 deprecated: not the user's concern
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

        try:
            config = DemoConfig(
                out=args.out, methods=tuple(args.methods), steps=args.steps, batch_size=args.batch_size, crop=args.crop,
                learning_rate=args.lr, backbone=args.backbone, depth_model=args.depth_model,
                num_experts=args.num_experts, top_k=args.top_k, seed=args.seed, eval_crop=args.eval_crop,
                progress=not args.no_progress, device=args.device,
            )
        except ValueError as error:  # a bad option: say which, without a traceback
            print(f"error: {error}", file=sys.stderr)
            return 2
        try:
            run_demo(config)
        except ImportError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
