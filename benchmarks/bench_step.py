"""Training-step benchmark: SpectralMoE vs LoRA vs the naive (released-code-style) implementation.

    python benchmarks/bench_step.py            # the target configuration (DINOv2-S-like, 512x512, E=6, k=1)
    python benchmarks/bench_step.py --sweep    # vary N, width, experts, top-k one at a time around the target
    python benchmarks/bench_step.py --quick    # a tiny smoke run (seconds), for humans checking the script works

For every configuration:
* time: all methods are built side by side in one process and stepped round-robin (one full training step --
  forward + backward + AdamW step -- of each method per round), so a load change on a shared machine hits every
  method alike; ``--warmup`` untimed steps each, then the median of ``--steps`` rounds;
* memory: each method again in a fresh subprocess (so the peak is its own), over warmup + 1 steps, relative to the
  memory right after the build: on CUDA ``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``), on
  CPU the process's peak resident set (VmHWM, reset through /proc/self/clear_refs; ``ru_maxrss`` where that reset is
  not allowed).
On CUDA the steps run under bf16 autocast (adapters and optimizer state in fp32); on CPU in fp32 with ``--threads``.

Methods (all on a frozen backbone, random init, nothing downloaded):
  lora          LoRA r=16 (alpha 16) on the attention query/value projections (peft LoraConfig)
  smoe_visual   SpectralMoE, use_depth=False
  smoe_full     SpectralMoE with the depth model run on the fly (model.set_depth_model)
  smoe_cached   SpectralMoE with depth hidden states precomputed once and passed as depth_hidden_states=
  naive_full    benchmarks/naive.py (expert loop, nonzero dispatch, N x N fusion matrix), depth model on the fly

Results: a table on stdout and JSON in benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the checkout's package, also when run from elsewhere
METHODS = ("lora", "smoe_visual", "smoe_full", "smoe_cached", "naive_full")
# --checkpointing: the same step with transformers' gradient checkpointing on the ViT (blocks and, for SpectralMoE, the
# refinement recomputed in backward)
CHECKPOINT_METHODS = ("lora", "lora_ckpt", "smoe_visual", "smoe_visual_ckpt", "smoe_full", "smoe_full_ckpt")
# --experts: the full step with more experts, side by side with E = 6 in one run (a method name may end in _e<E>)
EXPERT_METHODS = ("lora", "smoe_full", "smoe_full_e12", "smoe_full_e24", "naive_full", "naive_full_e12",
                  "naive_full_e24")
# the depth model at half the input size (SpectralMoEConfig.depth_input_scale=0.5)
EXTRA_METHODS = ("smoe_full_half",)


def split_method(method: str, config: "BenchConfig") -> tuple[str, "BenchConfig"]:
    """'smoe_full_e12' -> ('smoe_full', config with 12 experts); other names unchanged."""
    match = re.fullmatch(r"(.+)_e(\d+)", method)
    if match is None:
        return method, config
    return match.group(1), replace(config, experts=int(match.group(2)))


def known_method(method: str) -> bool:
    base = split_method(method, TARGET)[0].removesuffix("_ckpt").removesuffix("_recompute")
    return base in METHODS or base in EXTRA_METHODS


@dataclass(frozen=True)
class BenchConfig:
    name: str = "target"
    image: int = 512  # square input; N = (image / patch)^2
    patch: int = 16
    width: int = 384
    heads: int = 6
    mlp: int = 1536
    blocks: int = 4
    batch: int = 2
    experts: int = 6
    top_k: int = 1
    num_tokens: int = 100
    expert_rank: int = 16
    lora_rank: int = 16

    @property
    def num_patches(self) -> int:
        return (self.image // self.patch) ** 2


TARGET = BenchConfig()
QUICK = BenchConfig(name="quick", image=64, width=64, heads=2, mlp=256, blocks=2, experts=4, num_tokens=10)


def _wide(config: BenchConfig, width: int) -> BenchConfig:
    return replace(config, name=f"width={width}", width=width, heads=width // 64, mlp=4 * width)


def sweep_configs() -> list[BenchConfig]:
    """One axis at a time around the target: N, width, experts, top-k."""
    configs = [TARGET]
    configs += [replace(TARGET, name=f"N={(i // 16) ** 2}", image=i) for i in (256, 1024)]
    configs += [_wide(TARGET, 768)]
    configs += [replace(TARGET, name=f"experts={e}", experts=e) for e in (3, 12, 24)]
    configs += [replace(TARGET, name="top_k=2", top_k=2)]
    return configs


# --- analytic FLOPs (forward, multiply-add = 2 FLOPs) ------------------------------------------------------------


def adapter_flops(config: BenchConfig, method: str, noisy: bool = True) -> int:
    """Forward FLOPs of the adapter for one step's batch, as each implementation computes it.

    Package (factored path, taken when r(D + M) < M D): per block the basis C_e = B_e W_t2f^T (once, shared by both
    streams); per stream the gate logits (x.w_e, and the noise projection in training), x B_e^T and its scores
    against A_e for all E experts (unchosen ones zeroed by the gate weights), the mixing w A_e; then the fusion in
    coefficient space (head width K = E r + 1: K K^T, U K K^T, Q K^T and A V over N x N) and one projection U K;
    then W_delta. Naive: expert tables A B and W_t2f, scores and mixing in D dimensions for the k chosen experts,
    fusion over N x N in D dimensions. Elementwise work (softmax, norms) is left out.
    """
    method, config = split_method(method, config)
    method = method.removesuffix("_recompute")
    b, n, d, e, k, m, r = (config.batch, config.num_patches, config.width, config.experts, config.top_k,
                           config.num_tokens, config.expert_rank)
    if method == "lora":
        tokens = b * (n + 1)
        return config.blocks * 2 * (2 * tokens * d * config.lora_rank * 2)  # q and v: x A then (x A) B
    t = b * n
    streams = 1 if method == "smoe_visual" else 2
    if method == "smoe_full_half":  # the adapter's work is the same; the depth model's is a quarter
        method = "smoe_full"
    gates = 2 * t * e * d * (2 if noisy else 1)
    update = 2 * t * d * d
    if method.startswith("naive"):
        tables = 2 * e * m * r * d + 2 * e * m * d * d
        experts = 2 * t * k * m * d + 2 * t * k * (m - 1) * d
        fusion = 4 * b * n * n * d if streams == 2 else 0
        return config.blocks * (tables + streams * (gates + experts) + fusion + update)
    width = e * r + 1
    tables = 2 * e * r * d * d + (2 * width * width * d if streams == 2 else 0)
    # x B^T for all experts; then scores and mixing, for all E experts or (one-hot masks in the E r rank space) once
    # per chosen slot: the same matmul FLOPs when k = 1 (the chosen path saves elementwise work and memory)
    from spectralmoe_peft.experts import use_chosen_experts  # ROOT is on sys.path (top of this file)

    chosen_only = use_chosen_experts(e, k, m, r)
    experts = 2 * t * e * r * d + (k if chosen_only else 1) * (2 * t * e * m * r + 2 * t * e * m * r)
    fusion = (2 * t * width * width + 4 * b * n * n * width) if streams == 2 else 0
    projection = 2 * t * width * d
    return config.blocks * (tables + streams * (gates + experts) + fusion + projection + update)


def backbone_flops(config: BenchConfig) -> int:
    """Forward FLOPs of one ViT of this config (the depth model is another one, forward only)."""
    b, n, d = config.batch, config.num_patches + 1, config.width
    per_block = 2 * b * n * (4 * d * d + 2 * d * config.mlp) + 4 * b * n * n * d
    return config.blocks * per_block


# --- the worker: one method, one config, a fresh process ---------------------------------------------------------


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


def build(config: BenchConfig, method: str, device, compile_options: Optional[dict] = None):
    """Build one method's model and optimizer; returns (step function, trainable parameter count).

    ``compile_options``: compile the model in place with ``model.compile(**compile_options)`` (bench_compile.py);
    the first step then compiles."""
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    import spectralmoe_peft as smoe
    from naive import NaiveSpectralMoE

    cuda = device.type == "cuda"
    method, config = split_method(method, config)
    checkpointing = method.endswith("_ckpt")
    method = method.removesuffix("_ckpt")
    recompute = method.endswith("_recompute")  # recompute_expert_attention=True (default: kept for backward)
    method = method.removesuffix("_recompute")

    def vit(seed: int):
        torch.manual_seed(seed)
        return tf.Dinov2Model(tf.Dinov2Config(
            hidden_size=config.width, num_hidden_layers=config.blocks, num_attention_heads=config.heads,
            intermediate_size=config.mlp, patch_size=config.patch, image_size=config.image,
        ))

    def smoe_config(**kw):
        return smoe.SpectralMoEConfig(
            num_experts=config.experts, top_k=config.top_k, expert_rank=config.expert_rank,
            num_tokens=config.num_tokens, init_weights="paper", recompute_expert_attention=recompute, **kw,
        )

    torch.manual_seed(0)
    x = torch.randn(config.batch, 3, config.image, config.image, device=device)
    kwargs, aux = {}, None
    if method == "lora":
        model = get_peft_model(vit(0), LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank,
                                                  target_modules=["q_proj", "v_proj"]))
    elif method == "smoe_visual":  # the balance loss rides along in the graph (aux_loss_in_graph)
        model = get_peft_model(vit(0), smoe_config(use_depth=False))
    elif method == "smoe_full":
        model = get_peft_model(vit(0), smoe_config())
        model.set_depth_model(vit(1))
    elif method == "smoe_full_half":  # the depth model on the RGB bands at half the size: a quarter of its tokens
        model = get_peft_model(vit(0), smoe_config(depth_input_scale=0.5))
        model.set_depth_model(vit(1))
    elif method == "smoe_cached":
        model = get_peft_model(vit(0), smoe_config(depth_num_prefix_tokens=1))
        depth_model = vit(1).to(device).eval()
        mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            states = depth_model(pixel_values=(x - mean) / std, output_hidden_states=True).hidden_states
        kwargs["depth_hidden_states"] = tuple(s.detach() for s in states)  # the cache, as a dataloader would give it
        del depth_model
    elif method == "naive_full":
        model = NaiveSpectralMoE(
            vit(0), num_experts=config.experts, top_k=config.top_k, expert_rank=config.expert_rank,
            num_tokens=config.num_tokens,
        )
        model.set_depth_model(vit(1))
        model._depth_model.to(device)
        aux = lambda: model.aux_loss  # noqa: E731
    else:
        raise ValueError(method)
    if checkpointing:
        model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
    model.to(device).train()
    if compile_options is not None:
        model.compile(**compile_options)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = model(pixel_values=x, **kwargs).last_hidden_state
            loss = out.float().pow(2).mean()
            if aux is not None:
                loss = loss + aux()
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()

    step.model = model  # for bench_compile.py (reach the depth model before the first, compiling, call)
    return step, sum(p.numel() for p in params)


def _setup(spec: dict):
    import torch

    device = torch.device(spec["device"])
    if device.type != "cuda":
        torch.set_num_threads(spec["threads"])
    return torch, device


def memory_start(torch, device) -> dict:
    """Start a peak-memory measurement here (also used by bench_inference.py): the current memory as the baseline,
    the peak reset. On CUDA ``max_memory_allocated`` after ``reset_peak_memory_stats``; on CPU the resident set after
    ``malloc_trim``, its peak (VmHWM) reset through /proc/self/clear_refs (``ru_maxrss`` where that is not allowed)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return {"base": torch.cuda.memory_allocated(), "method": "cuda.max_memory_allocated"}
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _rss_kb("VmRSS") * 1024
    hwm_reset = _reset_peak_rss()
    return {"base": base, "method": "VmHWM (clear_refs reset)" if hwm_reset else "ru_maxrss"}


def memory_peak(torch, device, start: dict) -> float:
    """Peak memory in bytes since ``memory_start`` returned ``start``, above its baseline."""
    import resource

    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start["base"]
    if start["method"] == "ru_maxrss":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start["base"]
    return _rss_kb("VmHWM") * 1024 - start["base"]


def memory_worker(spec: dict) -> dict:
    """One method in a fresh process: peak memory over warmup + 1 steps, relative to right after the build."""
    torch, device = _setup(spec)
    config = BenchConfig(**spec["config"])
    # one-time library initialization (kernels, thread pools, autograd engine) out of the measurement, alike for
    # every method: a throwaway training step of a tiny version of the same method
    tiny = replace(QUICK, image=32, blocks=1)
    build(tiny, spec["method"], device)[0]()
    step, trainable = build(config, spec["method"], device)
    start = memory_start(torch, device)
    for _ in range(max(1, spec["warmup"]) + 1):  # the step after the first has the optimizer state too
        step()
    peak = memory_peak(torch, device, start)
    return {"method": spec["method"], "peak_mem_mb": peak / 2**20, "mem_method": start["method"],
            "trainable_params": trainable}


def timing_worker(spec: dict) -> dict:
    """All methods side by side in one process, steps interleaved round-robin (so a load change on a shared machine
    hits every method alike): warmup steps each, then ``steps`` rounds of one timed step per method; medians."""
    torch, device = _setup(spec)
    config = BenchConfig(**spec["config"])
    steps = {method: build(config, method, device)[0] for method in spec["methods"]}
    for step in steps.values():
        for _ in range(spec["warmup"]):
            step()
    times = {method: [] for method in steps}
    for _ in range(spec["steps"]):
        for method, step in steps.items():
            start = time.perf_counter()
            step()
            times[method].append(1e3 * (time.perf_counter() - start))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return {method: {"step_ms": statistics.median(t), "step_ms_min": min(t), "step_ms_all": t, "device": name}
            for method, t in times.items()}


def _subprocess(spec: dict, args, script: str = __file__) -> dict:
    """Run ``script --worker <spec>`` in a fresh process; its last ``RESULT {json}`` line, or {"error": ...}."""
    env = dict(os.environ)
    if spec["kind"] == "memory":
        # a fixed mmap threshold: large tensors are mmapped and go back to the OS when freed, so resident memory
        # follows live tensors (glibc's dynamic threshold would keep freed build-time buffers and hide them)
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=args.timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(lines[-1][len("RESULT "):])


def run_config(config: BenchConfig, methods: list[str], args) -> dict[str, dict]:
    base = {"config": asdict(config), "device": args.device, "threads": args.threads, "warmup": args.warmup,
            "steps": args.steps}
    load_before = os.getloadavg()[0]
    timing = _subprocess({**base, "kind": "timing", "methods": methods}, args)
    results = {}
    for method in methods:
        memory = _subprocess({**base, "kind": "memory", "method": method}, args)
        result = {"method": method, **memory}
        if "error" in timing:
            result["error"] = "timing: " + timing["error"]
        else:
            result.update(timing[method])
        result["load_average"] = [load_before, os.getloadavg()[0]]
        results[method] = result
    return results


# --- the driver ----------------------------------------------------------------------------------------------------


def write_results(out: dict, name: str) -> str:
    """Write a run's record to benchmarks/results/<name>.json and say where (every benchmark script ends with it)."""
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"{name}.json")
    with open(path, "w") as file:
        json.dump(out, file, indent=2)
    print(f"\nwrote {os.path.relpath(path, ROOT)}")
    return path


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(config: BenchConfig, results: dict[str, dict]) -> dict:
    lora = results.get("lora", {})
    rows = []
    header = (f"{'method':<22} {'step ms':>9} {'min ms':>8} {'x LoRA':>7} {'peak MB':>9} {'x LoRA':>7} "
              f"{'adapter GF':>10} {'trainable':>10}")
    print(f"\n== {config.name}: image {config.image} (N={config.num_patches}), width {config.width}, "
          f"{config.blocks} blocks, batch {config.batch}, E={config.experts}, k={config.top_k}, "
          f"M={config.num_tokens}, r={config.expert_rank}; backbone fwd {backbone_flops(config) / 1e9:.1f} GFLOP "
          f"(depth model the same)")
    print(header)
    print("-" * len(header))
    for method, result in results.items():
        if "error" in result:
            print(f"{method:<22} ERROR {result['error']}")
            continue
        result["adapter_gflop_fwd"] = adapter_flops(config, method.removesuffix("_ckpt")) / 1e9
        if "step_ms" in lora:
            result["time_vs_lora"] = result["step_ms"] / lora["step_ms"]
            result["mem_vs_lora"] = result["peak_mem_mb"] / lora["peak_mem_mb"] if lora["peak_mem_mb"] > 0 else None
        print(f"{method:<22} {result['step_ms']:>9.0f} {result['step_ms_min']:>8.0f} "
              f"{_fmt(result.get('time_vs_lora'), '>7.2f')} "
              f"{result['peak_mem_mb']:>9.0f} {_fmt(result.get('mem_vs_lora'), '>7.2f')} "
              f"{result['adapter_gflop_fwd']:>10.2f} {result['trainable_params']:>10,}")
        rows.append(result)
    summary = {}
    full, naive = results.get("smoe_full", {}), results.get("naive_full", {})
    if "step_ms" in full and "step_ms" in naive:
        summary = {"naive_vs_ours_time": naive["step_ms"] / full["step_ms"],
                   "naive_vs_ours_mem": naive["peak_mem_mb"] / full["peak_mem_mb"] if full["peak_mem_mb"] > 0 else None}
        print(f"naive_full / smoe_full: time x{summary['naive_vs_ours_time']:.2f}, "
              f"peak memory x{_fmt(summary['naive_vs_ours_mem'], '.2f')}")
    for many in ("smoe_full", "naive_full"):
        base = results.get(many, {})
        for experts in (12, 24):
            other = results.get(f"{many}_e{experts}", {})
            if "step_ms" in base and "step_ms" in other:
                summary[f"{many}_e{experts}_vs_e{config.experts}"] = {
                    "time": other["step_ms"] / base["step_ms"], "mem": other["peak_mem_mb"] / base["peak_mem_mb"]}
                print(f"{many} E={experts} / E={config.experts}: step time x{other['step_ms'] / base['step_ms']:.3f}, "
                      f"peak memory x{other['peak_mem_mb'] / base['peak_mem_mb']:.2f}")
    for method in ("lora", "smoe_visual", "smoe_full"):
        plain, ckpt = results.get(method, {}), results.get(f"{method}_ckpt", {})
        if plain.get("peak_mem_mb") and "peak_mem_mb" in ckpt and "step_ms" in plain and "step_ms" in ckpt:
            summary[f"{method}_ckpt_vs_plain"] = {"mem": ckpt["peak_mem_mb"] / plain["peak_mem_mb"],
                                                  "time": ckpt["step_ms"] / plain["step_ms"]}
            print(f"{method}: with / without gradient checkpointing: peak memory "
                  f"x{summary[f'{method}_ckpt_vs_plain']['mem']:.2f}, step time "
                  f"x{summary[f'{method}_ckpt_vs_plain']['time']:.2f}")
    return {"config": asdict(config), "num_patches": config.num_patches,
            "backbone_gflop_fwd": backbone_flops(config) / 1e9, "results": rows, "summary": summary}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="vary N, width, experts, top-k around the target")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--only", default=None,
                        help="with --sweep: comma-separated config names to run, e.g. 'N=256,experts=12'")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of " + ",".join(METHODS + CHECKPOINT_METHODS[1::2]))
    parser.add_argument("--checkpointing", action="store_true",
                        help="LoRA and SpectralMoE with and without gradient checkpointing (peak memory, time)")
    parser.add_argument("--experts", action="store_true",
                        help="the full step at E = 6, 12, 24 side by side (ours and naive), with LoRA")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 1; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps, median reported (default 5; quick 2)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per method and config")
    parser.add_argument("--name", default=None, help="results file name (default: target / sweep / quick + device)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        spec = json.loads(args.worker)
        result = timing_worker(spec) if spec["kind"] == "timing" else memory_worker(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.warmup = args.warmup if args.warmup is not None else 1
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 5)
    configs = [QUICK] if args.quick else sweep_configs() if args.sweep else [TARGET]
    if args.only:
        wanted = {c.strip() for c in args.only.split(",") if c.strip()}
        known = {c.name for c in sweep_configs()}
        if wanted - known:
            parser.error(f"unknown configs {sorted(wanted - known)}; choose from {sorted(known)}")
        configs = [c for c in sweep_configs() if c.name in wanted]
    default = CHECKPOINT_METHODS if args.checkpointing else EXPERT_METHODS if args.experts else METHODS
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(default)
    unknown = [m for m in methods if not known_method(m)]
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS + CHECKPOINT_METHODS[1::2] + EXTRA_METHODS}"
                     " (a name may end in _e<experts>, e.g. smoe_full_e12)")
    kind = "quick" if args.quick else "sweep" if args.sweep or args.only else "target"
    kind = f"{kind}_checkpointing" if args.checkpointing else f"{kind}_experts" if args.experts else kind
    name = args.name or f"{kind}_{args.device}"
    print(f"device {args.device}, threads {args.threads if args.device == 'cpu' else '-'}, "
          f"warmup {args.warmup}, timed steps {args.steps} (median), "
          f"{'bf16 autocast' if args.device == 'cuda' else 'fp32'}; load average {os.getloadavg()[0]:.2f}")
    out = {"device": args.device, "threads": args.threads, "warmup": args.warmup, "steps": args.steps,
           "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "configs": []}
    for config in configs:
        results = run_config(config, methods, args)
        out["configs"].append(report(config, results))
    out["load_average_end"] = os.getloadavg()[0]
    write_results(out, name)


if __name__ == "__main__":
    main()
