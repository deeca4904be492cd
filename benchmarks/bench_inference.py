"""Inference benchmark at scene scale: sliding-window segmentation of a large multi-band scene.

    python benchmarks/bench_inference.py              # 2048 x 2048 x 6-band scene, 512 px tiles, stride 384, 4 a batch
    python benchmarks/bench_inference.py --scene 1024 # a smaller scene
    python benchmarks/bench_inference.py --quick      # a tiny smoke run (seconds), to check the script works

What a segmentation user runs: the scene (random data, nothing downloaded; bands 2, 1, 0 are R, G, B for the depth
model) is cut into overlapping tiles (``spectralmoe_peft.dgss.sliding_window_logits``), each batch of tiles goes
through the adapted ViT in eval mode under ``torch.inference_mode`` (bf16 autocast on CUDA), a linear head on the
patch tokens gives per-patch class logits, which are upsampled (bilinear) to the tile and averaged where tiles overlap.
The backbone is the one of bench_step.py's target (DINOv2-S-like: width 384, 6 heads, 4 blocks, patch 16; E = 6,
k = 1, M = 100, r = 16), with a 6-band patch embedding; the depth model is another such ViT on the R, G, B bands.

Methods (random init):
  lora            LoRA r=16 on the attention query/value projections, not merged (merged, it costs the backbone alone)
  smoe_visual     SpectralMoE, use_depth=False
  smoe_full       SpectralMoE with the depth model run on every tile (the paper's setting)
  smoe_full_half  the same with SpectralMoEConfig(depth_input_scale=0.5): the depth model on tiles at half size
                  (reported as an error where this spectralmoe_peft has no such field)
  naive_full      benchmarks/naive.py (expert loop, nonzero dispatch, N x N fusion matrix), depth model on every tile

How it measures:
* time: all methods are built side by side in one process and run round-robin (one scene per method per round, so a
  load change on a shared machine hits every method alike), after one untimed tile batch each; medians over
  ``--rounds``. ``scene s`` is the wall time of the whole sliding window (tiling, forward, head, upsampling,
  blending); ``tiles/s`` = tiles / scene s.
* where the time goes, per scene: ``forward`` is the model call alone (perf_counter around it); ``depth`` is the depth
  model's share of it (forward pre/post hooks on the depth encoder); ``backbone`` is the model call of the same scene
  run again with the adapter disabled (``with model.disable_adapter():`` -- no refinement and no depth model; naive.py
  has the same switch), timed right after it in the same round; ``adapter`` = forward - depth - backbone (the
  refinement, the depth features' resampling and projection, LoRA's matmuls); ``other`` = scene s - forward (tiling,
  the head, upsampling, blending: alike for all methods). On CUDA the clock reads synchronize first.
* memory: each method again in a fresh subprocess (bench_step's memory_start / memory_peak: CUDA
  max_memory_allocated, CPU peak resident set), after the build, the scene allocation and one untimed tile batch:
  ``batch MB`` is the peak of one tile batch's forward + head above that, ``scene MB`` the peak of the whole scene
  run (which adds the scene-sized logit accumulators, alike for all methods).

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
from dataclasses import asdict, dataclass, replace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]
from bench_step import QUICK as QUICK_BACKBONE
from bench_step import (
    TARGET, BenchConfig, _setup, _subprocess, backbone_flops, memory_peak, memory_start, write_results,
)

METHODS = ("lora", "smoe_visual", "smoe_full", "smoe_full_half", "naive_full")
RGB = [2, 1, 0]  # R, G, B among the scene's bands (Sentinel-2 order B02, B03, B04, ...)


@dataclass(frozen=True)
class InferenceConfig:
    name: str = "target"
    scene: int = 2048  # square scene, pixels
    bands: int = 6
    tile: int = 512
    stride: int = 384
    tile_batch: int = 4
    classes: int = 8
    backbone: BenchConfig = TARGET  # width, heads, blocks, experts, ...; its image/batch are the tile/tile_batch

    @property
    def model(self) -> BenchConfig:
        return replace(self.backbone, image=self.tile, batch=self.tile_batch)

    @property
    def num_tiles(self) -> int:
        from spectralmoe_peft.dgss.evaluate import _window_starts

        return len(_window_starts(max(self.scene, self.tile), self.tile, self.stride)) ** 2


TARGET_SCENE = InferenceConfig()
QUICK = InferenceConfig(name="quick", scene=160, tile=64, stride=48, backbone=QUICK_BACKBONE)


class Clock:
    """Seconds accumulated in the model call and in the depth encoder (synchronized on CUDA)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.forward, self.depth, self._depth_start = cuda, 0.0, 0.0, 0.0

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def reset(self) -> None:
        self.forward = self.depth = 0.0

    def watch_depth(self, encoder) -> None:
        def pre(module, args, kwargs):
            self._depth_start = self.now()

        def post(module, args, kwargs, output):
            self.depth += self.now() - self._depth_start

        encoder.register_forward_pre_hook(pre, with_kwargs=True)
        encoder.register_forward_hook(post, with_kwargs=True)


def has_depth_input_scale() -> bool:
    import spectralmoe_peft as smoe

    return "depth_input_scale" in getattr(smoe.SpectralMoEConfig, "__dataclass_fields__", {})


def build(config: InferenceConfig, method: str, device):
    """One method's model, head and clock; returns (predict(batch) -> logits, disable() context, clock)."""
    import torch
    import transformers as tf
    from einops import rearrange
    from naive import NaiveSpectralMoE
    from peft import LoraConfig, get_peft_model

    import spectralmoe_peft as smoe
    from spectralmoe_peft.depth_stream import depth_encoder

    cfg = config.model
    cuda = device.type == "cuda"
    if method == "smoe_full_half" and not has_depth_input_scale():
        raise RuntimeError("smoe_full_half needs SpectralMoEConfig(depth_input_scale=...), which the spectralmoe_peft "
                           f"at {smoe.__file__} does not have")

    def vit(seed: int, channels: int):
        torch.manual_seed(seed)
        return tf.Dinov2Model(tf.Dinov2Config(
            hidden_size=cfg.width, num_hidden_layers=cfg.blocks, num_attention_heads=cfg.heads,
            intermediate_size=cfg.mlp, patch_size=cfg.patch, image_size=cfg.image, num_channels=channels,
        ))

    def smoe_config(**kw):
        return smoe.SpectralMoEConfig(
            num_experts=cfg.experts, top_k=cfg.top_k, expert_rank=cfg.expert_rank, num_tokens=cfg.num_tokens,
            init_weights="paper", rgb_band_indices=RGB, **kw,
        )

    depth_model = None
    if method == "lora":
        model = get_peft_model(vit(0, config.bands), LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank,
                                                                target_modules=["q_proj", "v_proj"]))
    elif method == "smoe_visual":
        model = get_peft_model(vit(0, config.bands), smoe_config(use_depth=False))
    elif method in ("smoe_full", "smoe_full_half"):
        extra = {"depth_input_scale": 0.5} if method == "smoe_full_half" else {}
        model = get_peft_model(vit(0, config.bands), smoe_config(**extra))
        depth_model = vit(1, 3)
        model.set_depth_model(depth_model)
    elif method == "naive_full":
        model = NaiveSpectralMoE(vit(0, config.bands), num_experts=cfg.experts, top_k=cfg.top_k,
                                 expert_rank=cfg.expert_rank, num_tokens=cfg.num_tokens, rgb_band_indices=RGB)
        depth_model = vit(1, 3)
        model.set_depth_model(depth_model)
        depth_model.to(device)  # not a submodule of the naive model
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    model.to(device).eval()
    torch.manual_seed(2)
    head = torch.nn.Linear(cfg.width, config.classes).to(device).eval()
    clock = Clock(cuda)
    if depth_model is not None:
        clock.watch_depth(depth_encoder(depth_model))
    grid = cfg.image // cfg.patch

    def predict(batch: dict) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            start = clock.now()
            hidden = model(pixel_values=batch["pixel_values"]).last_hidden_state  # B, P + N, D
            clock.forward += clock.now() - start
            logits = head(hidden[:, hidden.shape[1] - grid * grid :])  # B, N, classes
            return rearrange(logits, "b (h w) c -> b c h w", h=grid)  # upsampled to the tile by the caller

    return predict, model.disable_adapter, clock


def make_scene(config: InferenceConfig):
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randn(config.bands, config.scene, config.scene, generator=generator)


def run_scene(config: InferenceConfig, predict, scene, device) -> None:
    from spectralmoe_peft.dgss.evaluate import sliding_window_logits

    sliding_window_logits(predict, scene, config.classes, window=config.tile, stride=config.stride,
                          batch_size=config.tile_batch, device=device if device.type == "cuda" else None)


def one_batch(config: InferenceConfig, predict, scene, device) -> None:
    import torch

    tiles = scene[:, : config.tile, : config.tile].unsqueeze(0).expand(config.tile_batch, -1, -1, -1)
    predict({"pixel_values": tiles.contiguous().to(device)})
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- workers (fresh processes) -------------------------------------------------------------------------------------


def _config_from(spec: dict) -> InferenceConfig:
    fields = dict(spec["config"])
    fields["backbone"] = BenchConfig(**fields["backbone"])
    return InferenceConfig(**fields)


def timing_worker(spec: dict) -> dict:
    """All methods side by side, one scene each per round, round-robin; each scene timed with the adapter and again
    with it disabled (the backbone alone)."""
    torch, device = _setup(spec)
    config = _config_from(spec)
    scene = make_scene(config)
    runners, errors = {}, {}
    for method in spec["methods"]:
        try:
            runners[method] = build(config, method, device)
        except Exception as error:  # noqa: BLE001 -- reported per method, the others still run
            errors[method] = f"{type(error).__name__}: {error}"
    for predict, disable, _ in runners.values():
        one_batch(config, predict, scene, device)
        with disable():
            one_batch(config, predict, scene, device)
    rows = {method: [] for method in runners}
    for _ in range(spec["rounds"]):
        for method, (predict, disable, clock) in runners.items():
            clock.reset()
            start = clock.now()
            run_scene(config, predict, scene, device)
            scene_s = clock.now() - start
            forward, depth = clock.forward, clock.depth
            clock.reset()
            with disable():
                run_scene(config, predict, scene, device)
            backbone = clock.forward - clock.depth  # the disabled adapter runs no depth model (0 here)
            rows[method].append({"scene_s": scene_s, "forward_s": forward, "depth_s": depth, "backbone_s": backbone,
                                 "adapter_s": forward - depth - backbone, "other_s": scene_s - forward})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    out = {method: {"error": error} for method, error in errors.items()}
    for method, runs in rows.items():
        medians = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        out[method] = {**medians, "scene_s_min": min(r["scene_s"] for r in runs), "rounds": runs,
                       "tiles_per_s": config.num_tiles / medians["scene_s"], "device": name}
    return out


def memory_worker(spec: dict) -> dict:
    """One method in a fresh process: peak of one tile batch, then of the whole scene, above the memory after the
    build, the scene allocation and one untimed tile batch."""
    torch, device = _setup(spec)
    config = _config_from(spec)
    scene = make_scene(config)
    predict, _, _ = build(config, spec["method"], device)
    one_batch(config, predict, scene, device)  # one-time initialization out of the measurement
    start = memory_start(torch, device)
    one_batch(config, predict, scene, device)
    batch_peak = memory_peak(torch, device, start)
    start = memory_start(torch, device)
    run_scene(config, predict, scene, device)
    scene_peak = memory_peak(torch, device, start)
    return {"batch_mem_mb": batch_peak / 2**20, "scene_mem_mb": scene_peak / 2**20, "mem_method": start["method"]}


# --- the driver ----------------------------------------------------------------------------------------------------


def _fmt(result: dict, key: str, spec: str) -> str:
    return "-" if result.get(key) is None else format(result[key], spec)


def report(config: InferenceConfig, results: dict[str, dict]) -> dict:
    cfg = config.model
    print(f"\n== scene {config.scene} x {config.scene} x {config.bands} bands, tiles {config.tile} stride "
          f"{config.stride} ({config.num_tiles} tiles, {config.tile_batch} a batch); backbone width {cfg.width}, "
          f"{cfg.blocks} blocks, E={cfg.experts}, k={cfg.top_k}, M={cfg.num_tokens}, r={cfg.expert_rank}; backbone "
          f"fwd {backbone_flops(cfg) / 1e9 / cfg.batch:.1f} GFLOP a tile (depth model the same at full size)")
    header = (f"{'method':<15} {'tiles/s':>8} {'scene s':>8} {'x LoRA':>7} {'batch MB':>9} {'x LoRA':>7} "
              f"{'scene MB':>9} {'backbone':>9} {'depth':>7} {'adapter':>8} {'other':>7}")
    print(header)
    print("-" * len(header))
    lora = results.get("lora", {})
    rows = []
    for method in METHODS:
        result = results.get(method)
        if result is None:
            continue
        result["method"] = method
        rows.append(result)
        if "error" in result or "scene_s" not in result:
            print(f"{method:<15} ERROR {result.get('error', 'no timing')}")
            continue
        if "scene_s" in lora:
            result["time_vs_lora"] = result["scene_s"] / lora["scene_s"]
            if lora.get("batch_mem_mb", 0) > 0 and "batch_mem_mb" in result:
                result["mem_vs_lora"] = result["batch_mem_mb"] / lora["batch_mem_mb"]
        print(f"{method:<15} {result['tiles_per_s']:>8.2f} {result['scene_s']:>8.2f} "
              f"{_fmt(result, 'time_vs_lora', '>7.2f')} {_fmt(result, 'batch_mem_mb', '>9.0f')} "
              f"{_fmt(result, 'mem_vs_lora', '>7.2f')} {_fmt(result, 'scene_mem_mb', '>9.0f')} "
              f"{result['backbone_s']:>9.2f} {result['depth_s']:>7.2f} {result['adapter_s']:>8.2f} "
              f"{result['other_s']:>7.2f}")
    print("backbone / depth / adapter / other: seconds per scene (see the docstring for how they are split)")
    return {"config": asdict(config), "num_tiles": config.num_tiles, "results": rows}


def _run(args, script: str, spec: dict) -> dict:
    try:
        return _subprocess(spec, args, script)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within --timeout {args.timeout:.0f} s"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--scene", type=int, default=None, help="scene side in pixels (default 2048; quick 160)")
    parser.add_argument("--tile", type=int, default=None, help="tile side in pixels (default 512; quick 64)")
    parser.add_argument("--stride", type=int, default=None, help="tile stride in pixels (default 384; quick 48)")
    parser.add_argument("--tile-batch", type=int, default=None, help="tiles per forward (default 4)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=None, help="timed scenes per method, median (default 3; quick 1)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess")
    parser.add_argument("--name", default=None, help="results file name (default: inference_<scene>_<device>)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        spec = json.loads(args.worker)
        result = timing_worker(spec) if spec["kind"] == "timing" else memory_worker(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    config = QUICK if args.quick else TARGET_SCENE
    overrides = {key: value for key, value in (("scene", args.scene), ("tile", args.tile), ("stride", args.stride),
                                               ("tile_batch", args.tile_batch)) if value is not None}
    for key, value in overrides.items():
        if value < 1:
            parser.error(f"--{key.replace('_', '-')} must be a positive integer, got {value}")
    config = replace(config, **overrides)
    if config.tile % config.backbone.patch:
        parser.error(f"--tile must be a multiple of the patch size {config.backbone.patch}, got {config.tile}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(METHODS)
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    name = args.name or f"inference_{'quick' if args.quick else config.scene}_{args.device}"
    print(f"device {args.device}, threads {args.threads if args.device == 'cpu' else '-'}, rounds {rounds} (median), "
          f"{'bf16 autocast' if args.device == 'cuda' else 'fp32'}; load average {os.getloadavg()[0]:.2f}")
    if "smoe_full_half" in methods and not has_depth_input_scale():
        print("note: smoe_full_half needs SpectralMoEConfig(depth_input_scale=...), which this spectralmoe_peft lacks")
    base = {"config": asdict(config), "device": args.device, "threads": args.threads, "rounds": rounds}
    load_before = os.getloadavg()[0]
    script = os.path.abspath(__file__)
    timing = _run(args, script, {**base, "kind": "timing", "methods": methods})
    results = {}
    for method in methods:
        result = dict(timing.get(method, {"error": "timing: " + timing.get("error", "no result")}))
        if "error" not in result:
            memory = _run(args, script, {**base, "kind": "memory", "method": method})
            result.update({"memory_error": memory["error"]} if "error" in memory else memory)
        result["load_average"] = [load_before, os.getloadavg()[0]]
        results[method] = result
    out = {"device": args.device, "threads": args.threads, "rounds": rounds, "torch": torch.__version__,
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), **report(config, results),
           "load_average_end": os.getloadavg()[0]}
    write_results(out, name)


if __name__ == "__main__":
    main()
