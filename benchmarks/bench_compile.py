"""torch.compile of a wrapped model: training-step time compiled / eager, for LoRA and SpectralMoE.

    python benchmarks/bench_compile.py            # bench_step's target configuration, lora / smoe_visual / smoe_full
    python benchmarks/bench_compile.py --quick    # a tiny configuration (still compiles: about a minute a method)
    python benchmarks/bench_compile.py --quick --backend eager   # the harness alone (Dynamo tracing, no inductor)

The step is bench_step.py's (``build()``: forward, loss, backward, AdamW step; bf16 autocast on CUDA), once on an
eager model and once on the same model built again and compiled in place with ``model.compile()`` (default inductor
backend; on CPU inductor needs a C++ compiler). Each method runs in a fresh process (a compile crash or hang stays
with its method; its error is recorded in the JSON and the table), and in it:
* ``compile s``: the first compiled step's wall time (tracing, compiling forward and backward, and one step) minus
  the median eager step;
* after ``--warmup`` more untimed steps of each model (a second step may recompile, e.g. once the optimizer state
  exists), ``--steps`` rounds of one eager and one compiled step, interleaved; the medians and their ratio;
* Dynamo's counters after the run: graphs compiled and graph breaks (``graphs`` > 1 means a break or a
  recompile; the JSON keeps the graph-break reasons).
On CPU the inductor compile workers are limited to ``--threads`` (TORCHINDUCTOR_COMPILE_THREADS) unless set.

Results: a table on stdout and JSON in benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]
from bench_step import QUICK, TARGET, BenchConfig, _setup, _subprocess, build, write_results

METHODS = ("lora", "smoe_visual", "smoe_full", "smoe_cached", "naive_full")
DEFAULT_METHODS = ("lora", "smoe_visual", "smoe_full")


def _error(error: BaseException) -> dict:
    frames = traceback.extract_tb(error.__traceback__)
    where = [f"{os.path.relpath(f.filename, ROOT) if f.filename.startswith(ROOT) else f.filename}:{f.lineno} "
             f"in {f.name}" for f in frames[-4:]]
    first = str(error).strip().splitlines()
    return {"error": f"{type(error).__name__}: {first[0] if first else ''}", "error_where": where,
            "error_text": str(error)[:4000]}


def worker(spec: dict) -> dict:
    """One method: eager and compiled side by side in this process, steps interleaved."""
    torch, device = _setup(spec)
    config = BenchConfig(**spec["config"])
    method = spec["method"]
    eager = build(config, method, device)[0]
    eager_first = []
    for _ in range(max(1, spec["warmup"])):
        start = time.perf_counter()
        eager()
        eager_first.append(time.perf_counter() - start)
    result = {"method": method, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.machine()}
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # this method's graphs and counters only (matters when called in-process, as the tests do)
    counters.clear()
    options = {"backend": spec["backend"], **({"mode": spec["mode"]} if spec.get("mode") else {})}
    try:
        compiled = build(config, method, device, compile_options=options)[0]
    except Exception as error:  # noqa: BLE001
        return {**result, **_error(error), "failed_at": "model.compile()"}
    start = time.perf_counter()
    try:
        compiled()
    except Exception as error:  # noqa: BLE001 -- the report says what failed, the other methods still run
        return {**result, **_error(error), "failed_at": "first compiled step"}
    first = time.perf_counter() - start
    result["compile_s"] = first - statistics.median(eager_first)
    result["first_compiled_step_s"] = first
    try:
        for _ in range(spec["warmup"]):
            compiled()
        times = {"eager": [], "compiled": []}
        for _ in range(spec["steps"]):
            for kind, step in (("eager", eager), ("compiled", compiled)):
                start = time.perf_counter()
                step()
                times[kind].append(1e3 * (time.perf_counter() - start))
    except Exception as error:  # noqa: BLE001
        return {**result, **_error(error), "failed_at": "a later compiled step"}

    breaks = {reason: count for reason, count in counters["graph_break"].items()}
    result.update({
        "eager_ms": statistics.median(times["eager"]), "compiled_ms": statistics.median(times["compiled"]),
        "eager_ms_all": times["eager"], "compiled_ms_all": times["compiled"],
        "graphs": int(counters["stats"].get("unique_graphs", 0)), "graph_breaks": sum(breaks.values()),
        "graph_break_reasons": {str(k)[:300]: v for k, v in breaks.items()},
    })
    result["compiled_vs_eager"] = result["compiled_ms"] / result["eager_ms"]
    return result


def report(config: BenchConfig, results: list[dict], backend: str) -> None:
    print(f"\n== {config.name}: image {config.image} (N={config.num_patches}), width {config.width}, {config.blocks} "
          f"blocks, batch {config.batch}, E={config.experts}, k={config.top_k}; backend {backend}")
    header = (f"{'method':<12} {'eager ms':>9} {'compiled ms':>11} {'compiled/eager':>14} {'compile s':>9} "
              f"{'graphs':>6} {'breaks':>6}")
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['method']:<12} ERROR ({r.get('failed_at', 'process')}) {r['error']}")
            for line in r.get("error_where", []):
                print(f"{'':<14}at {line}")
            continue
        print(f"{r['method']:<12} {r['eager_ms']:>9.0f} {r['compiled_ms']:>11.0f} {r['compiled_vs_eager']:>14.2f} "
              f"{r['compile_s']:>9.1f} {r['graphs']:>6} {r['graph_breaks']:>6}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="bench_step's tiny configuration")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated subset of {','.join(METHODS)} (default {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune (default: none)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds, median (default 5; quick 2)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per method")
    parser.add_argument("--name", default=None, help="results file name (default compile_<target|quick>_<device>)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    import torch

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(DEFAULT_METHODS)
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    warmup = args.warmup if args.warmup is not None else 2
    steps = args.steps if args.steps is not None else (2 if args.quick else 5)
    config = QUICK if args.quick else TARGET
    name = args.name or (f"compile_{config.name}_{args.device}" + ("" if args.backend == "inductor" else f"_{args.backend}"))
    if args.device == "cpu":
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(args.threads))
    print(f"device {args.device}, threads {args.threads if args.device == 'cpu' else '-'}, warmup {warmup}, timed "
          f"rounds {steps} (median), backend {args.backend}{f' mode {args.mode}' if args.mode else ''}, "
          f"{'bf16 autocast' if args.device == 'cuda' else 'fp32'}; load average {os.getloadavg()[0]:.2f}")
    base = {"config": asdict(config), "device": args.device, "threads": args.threads, "warmup": warmup,
            "steps": steps, "backend": args.backend, "mode": args.mode}
    results = []
    for method in methods:
        try:
            result = _subprocess({**base, "kind": "compile", "method": method}, args, os.path.abspath(__file__))
        except subprocess.TimeoutExpired:
            result = {"error": f"no result within --timeout {args.timeout:.0f} s"}
        result = {"method": method, **result}
        if "error" in result and "failed_at" not in result:
            result["failed_at"] = "process (crash or timeout; the last lines of its output)"
        result["load_average_end"] = os.getloadavg()[0]
        results.append(result)
    report(config, results, args.backend)
    out = {"device": args.device, "threads": args.threads, "warmup": warmup, "steps": steps, "backend": args.backend,
           "mode": args.mode, "torch": torch.__version__,
           "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "config": asdict(config), "results": results}
    write_results(out, name)


if __name__ == "__main__":
    main()
