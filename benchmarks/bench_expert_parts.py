"""Where the full step's cost grows with the number of experts E: its E-dependent parts, timed alone.

    python benchmarks/bench_expert_parts.py            # E = 6, 12, 24 at the target size (N = 1024, batch 2, D = 384)
    python benchmarks/bench_expert_parts.py --quick    # a smoke run

Per block and training step (forward + backward), at bench_step's target configuration:
  fusion       the depth-visual cross-attention in coefficient space: scaled_dot_product_attention with head width
               E*r + 1 (one call; the adapter makes one per block)
  projection   x B_e^T for all experts, one stream: a dense (B*N x D) @ (D x E*r) matmul (the adapter makes two per
               block, one per stream)
  grouped      the same projection for each token's chosen expert only, through torch's grouped matmul
               (``torch.nn.functional.grouped_mm``, tokens sorted by expert, E-independent work): what a grouped path
               would cost. Not used by the package: it has no float64 kernel and its CUDA kernel takes bf16 on
               recent GPUs only (see docs/performance.md)
Median of ``--repeats`` timed calls after one untimed call; a table and JSON in benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_step import write_results  # noqa: E402  (imports no torch at module level)


def _median_ms(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def measure(experts: int, *, batch: int, tokens: int, width: int, rank: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(experts)
    rows = batch * tokens
    k = experts * rank + 1
    query = torch.randn(batch, 1, tokens, k, generator=generator, requires_grad=True)
    key_value = torch.randn(batch, 1, tokens, k, generator=generator, requires_grad=True)
    upstream_fusion = torch.randn(batch, 1, tokens, k, generator=generator)

    def fusion():
        out = F.scaled_dot_product_attention(query, key_value, key_value)
        out.backward(upstream_fusion)

    x = torch.randn(rows, width, generator=generator, requires_grad=True)
    b = torch.randn(width, experts * rank, generator=generator, requires_grad=True)
    upstream_dense = torch.randn(rows, experts * rank, generator=generator)

    def projection():
        (x @ b).backward(upstream_dense)

    result = {"experts": experts, "fusion_width": k, "fusion_ms": _median_ms(fusion, repeats),
              "projection_ms": _median_ms(projection, repeats)}
    grouped_mm = getattr(F, "grouped_mm", None)
    if grouped_mm is not None:
        b_grouped = torch.randn(experts, width, rank, generator=generator, requires_grad=True)
        chosen = torch.randint(experts, (rows,), generator=generator)
        order = chosen.argsort(stable=True)
        offsets = torch.bincount(chosen, minlength=experts).cumsum(0).to(torch.int32)
        upstream_grouped = torch.randn(rows, rank, generator=generator)

        def grouped():
            grouped_mm(x[order], b_grouped, offs=offsets).backward(upstream_grouped)

        try:
            result["grouped_ms"] = _median_ms(grouped, repeats)
        except RuntimeError as error:  # no kernel for this device/dtype
            result["grouped_error"] = str(error)[:200]
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", default="6,12,24", help="comma-separated expert counts")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per part (default 9; quick 2)")
    parser.add_argument("--name", default=None, help="results file name (default: expert_parts_cpu / _quick)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    size = dict(batch=1, tokens=64, width=64, rank=4) if args.quick else dict(batch=2, tokens=1024, width=384, rank=16)
    repeats = args.repeats or (2 if args.quick else 9)
    print(f"CPU, {args.threads} threads, fp32; batch {size['batch']}, N={size['tokens']}, D={size['width']}, "
          f"r={size['rank']}; per block, forward + backward; load average {os.getloadavg()[0]:.2f}")
    results = [measure(int(e), repeats=repeats, **size) for e in args.experts.split(",")]
    base = results[0]
    print(f"{'E':>4} {'width':>6} {'fusion ms':>10} {'x':>6} {'proj ms':>8} {'x':>6} {'grouped ms':>11}")
    for row in results:
        grouped = f"{row['grouped_ms']:>11.2f}" if "grouped_ms" in row else f"{'n/a':>11}"
        print(f"{row['experts']:>4} {row['fusion_width']:>6} {row['fusion_ms']:>10.2f} "
              f"{row['fusion_ms'] / base['fusion_ms']:>6.2f} {row['projection_ms']:>8.2f} "
              f"{row['projection_ms'] / base['projection_ms']:>6.2f} {grouped}")
    out = {"threads": args.threads, "size": size, "repeats": repeats, "torch": torch.__version__,
           "load_average": os.getloadavg()[0], "results": results}
    name = args.name or ("expert_parts_quick" if args.quick else "expert_parts_cpu")
    write_results(out, name)


if __name__ == "__main__":
    main()
