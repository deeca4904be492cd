"""The main job: train on Landsat-7 (North Carolina), test on Sentinel-2 (Brandenburg), four ways, same budget.

Methods, all on the same frozen backbone and decode head, the same crops and the same number of steps:
``frozen`` (only the head trains), ``lora`` (r=16 on q/v), ``spectralmoe_visual`` (use_depth=False) and
``spectralmoe_depth`` (the full method, with a frozen depth model on R, G, B). Writes ``results.json``, a table,
figures, the adapters, a GeoTIFF of a target prediction, then reloads an adapter and checks it predicts the same.
Runs on ``DemoConfig.device`` (CUDA when available, else the CPU), in bf16 autocast on a CUDA device that supports it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from torch import nn

from ..config import SpectralMoEConfig
from .evaluate import confusion_matrix, segmentation_metrics, sliding_window_logits
from ..depth import depth_hidden_size
from .models import TINY, build_depth_model, build_upernet, segmentation_logits
from .scenes import CLASSES, IGNORE_INDEX, RGB_BAND_INDICES, Scene, load_landsat7_nc, load_sentinel2_brandenburg
from .tiles import BandStats, RandomCrops, normalize
from .train import (
    TrainConfig,
    TrainHistory,
    autocast,
    autocast_dtype,
    is_spectralmoe,
    resolve_device,
    spectralmoe_inputs,
    to_device,
    train_segmentation,
    trainable_parameters,
)

METHODS = ("frozen", "lora", "spectralmoe_visual", "spectralmoe_depth")
RANDOM_INIT_NOTE = (
    "The backbone and depth model are small and randomly initialized (no pretrained weights can be fetched "
    "offline). The numbers show the workflow runs end to end on real cross-sensor data; they say nothing about "
    "SpectralMoE's accuracy on a foundation model. Pass --backbone and --depth-model (Hub ids or local paths, e.g. "
    "a DINOv3 and Depth Anything V2) for real results."
)


@dataclass
class DemoConfig:
    out: Path = Path("outputs/demo")
    methods: tuple[str, ...] = METHODS
    steps: int = 500
    batch_size: int = 8
    crop: int = 64
    learning_rate: float = 5e-3
    backbone: str = TINY
    depth_model: str = TINY
    num_experts: int = 6
    top_k: int = 1
    seed: int = 0
    source_holdout: float = 0.25  # right-hand share of the source scene kept out of training
    eval_crop: Optional[int] = None  # evaluate on a centred window of this size only (quick runs)
    progress: bool = True
    device: Optional[str] = None  # None: CUDA when available, else the CPU
    adapter_overrides: dict = field(default_factory=dict)  # extra SpectralMoEConfig fields (sweeps, ablations)
    scenes: Optional[tuple[Scene, Scene]] = field(default=None, repr=False)  # (source, target); default: the pair

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"Unknown methods {unknown}; choose from {list(METHODS)}.")
        if not 0 < self.source_holdout < 1:
            raise ValueError(f"source_holdout must be in (0, 1); got {self.source_holdout}.")
        resolve_device(self.device)


def _centre(scene: Scene, size: Optional[int]) -> Scene:
    if size is None:
        return scene
    height, width = scene.labels.shape
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    return scene.crop(slice(top, top + size), slice(left, left + size))


def _wrap(method: str, base: nn.Module, to_save: list[str], config: DemoConfig, depth_features: int,
          normalization: Optional[tuple[list, list]] = None) -> nn.Module:
    """The same base model, made trainable the way ``method`` says."""
    if method == "frozen":
        for path in to_save:
            base.get_submodule(path).requires_grad_(True)
        return base
    if method == "lora":
        lora = LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=list(to_save))
        return get_peft_model(base, lora)
    use_depth = method == "spectralmoe_depth"
    moe = SpectralMoEConfig(
        num_experts=config.num_experts, top_k=config.top_k, use_depth=use_depth, modules_to_save=list(to_save),
        rgb_band_indices=list(RGB_BAND_INDICES), depth_hidden_size=depth_features if use_depth else None,
        # inputs are z-scores per band: map roughly [-2, 2] to the depth model's [0, 1] RGB
        depth_input_rescale=0.25, depth_input_offset=0.5,
        depth_model_name_or_path=None if config.depth_model == TINY else config.depth_model,
        **({"depth_image_mean": normalization[0], "depth_image_std": normalization[1]} if normalization else {}),
        **config.adapter_overrides,
    )
    return get_peft_model(base, moe)


def _predictor(model: nn.Module, device: torch.device, dtype: Optional[torch.dtype]) -> Callable[[dict], torch.Tensor]:
    """Logits of a batch already on ``device``, under the training precision's autocast."""
    moe = is_spectralmoe(model)

    def predict(batch: dict) -> torch.Tensor:
        extra = spectralmoe_inputs(batch) if moe else None
        with autocast(device, dtype):
            return segmentation_logits(model, batch, extra)

    return predict


def _evaluate(model: nn.Module, scene: Scene, stats: BandStats, config: DemoConfig, device: torch.device,
              dtype: Optional[torch.dtype]) -> tuple[dict, np.ndarray]:
    image = torch.from_numpy(normalize(scene, stats))
    logits = sliding_window_logits(_predictor(model, device, dtype), image, len(CLASSES), window=config.crop,
                                   stride=config.crop, nodata_mask=torch.from_numpy(~scene.valid),
                                   progress=config.progress, device=device)
    prediction = logits.argmax(0)
    confusion = confusion_matrix(prediction, torch.from_numpy(scene.labels.astype(np.int64)), len(CLASSES))
    metrics = segmentation_metrics(confusion, CLASSES)
    metrics["confusion_matrix"] = confusion.tolist()
    return metrics, prediction.numpy().astype(np.uint8)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))


def _routing_maps(model: nn.Module, batch: dict, device: torch.device,
                  dtype: Optional[torch.dtype]) -> dict[str, np.ndarray]:
    """Top-1 expert of each patch token of the first image, per block (visual stream), as (H, W) maps."""
    with torch.no_grad():
        _predictor(model, device, dtype)(to_device(batch, device))
    maps = {}
    for block, streams in model.base_model.get_routing_stats().items():
        stats = streams["visual"]
        height, width = stats.grid
        maps[f"block {block}"] = stats.topk_indices[0, :, 0].reshape(height, width).cpu().numpy()
    return maps


def _table(results: dict) -> str:
    head = f"{'method':<20}{'trainable':>11}{'train s':>9}{'source mIoU':>13}{'target mIoU':>13}"
    rows = [head, "-" * len(head)]
    for name, r in results.items():
        rows.append(f"{name:<20}{r['trainable_parameters']:>11,}{r['train_seconds']:>9.1f}"
                    f"{r['source']['miou']:>13.3f}{r['target']['miou']:>13.3f}")
    return "\n".join(rows)


def run_demo(config: DemoConfig) -> dict:
    """Run the whole comparison; returns what it writes to ``out/results.json``."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device = resolve_device(config.device)
    dtype = autocast_dtype(device)
    precision = "fp32" if dtype is None else "bf16 autocast"
    print(f"Note: {RANDOM_INIT_NOTE}\n")
    print(f"device: {device} ({precision})\n")
    source, target = config.scenes or (load_landsat7_nc(), load_sentinel2_brandenburg())
    if source.num_bands != target.num_bands:
        raise ValueError(f"Source has {source.num_bands} bands, target {target.num_bands}: they must match.")
    width = source.labels.shape[1]
    split = int(round(width * (1 - config.source_holdout)))
    source_train, source_val = source.crop(slice(None), slice(0, split)), source.crop(slice(None), slice(split, None))
    source_stats, target_stats = BandStats.of(source), BandStats.of(target)  # per domain
    crops = RandomCrops(source_train, config.crop, length=config.steps * config.batch_size, seed=config.seed,
                        stats=source_stats)
    source_eval, target_eval = _centre(source_val, config.eval_crop), _centre(target, config.eval_crop)
    print(f"source {source.name}: {source.labels.shape} at {source.gsd_m} m, trains on {source_train.labels.shape}, "
          f"evaluates on {source_eval.labels.shape}; target {target.name}: {target_eval.labels.shape} at "
          f"{target.gsd_m} m\n")

    depth_model, normalization = build_depth_model(config.depth_model, seed=config.seed + 1)
    features = depth_hidden_size(depth_model)
    if features is None:
        raise ValueError(f"Cannot tell the feature width of the depth model {type(depth_model).__name__}.")
    # the demo's own short budget (the paper's 40k steps are TrainConfig's default)
    train_config = TrainConfig(steps=config.steps, batch_size=config.batch_size, learning_rate=config.learning_rate,
                               seed=config.seed, log_every=max(1, config.steps // 30), device=str(device))
    results, histories = {}, {}
    for method in config.methods:
        base, to_save = build_upernet(source.num_bands, len(CLASSES), config.backbone, config.crop, seed=config.seed)
        model = _wrap(method, base, to_save, config, features, normalization)
        if method == "spectralmoe_depth":
            model.set_depth_model(depth_model)
        history = train_segmentation(model, crops, train_config, progress=config.progress, description=method)
        source_metrics, _ = _evaluate(model, source_eval, source_stats, config, device, dtype)
        evaluated = time.perf_counter()
        target_metrics, target_prediction = _evaluate(model, target_eval, target_stats, config, device, dtype)
        results[method] = {
            "trainable_parameters": _count(model),
            "train_seconds": round(history.seconds, 2),
            "eval_seconds_target": round(time.perf_counter() - evaluated, 2),
            "source": source_metrics,
            "target": target_metrics,
            "final_task_loss": history.task_loss[-1],
            "routing_health": history.routing[-1] if history.routing else None,
        }
        histories[method] = history
        folder = out / "adapters" / method
        if isinstance(model, PeftModel):
            model.save_pretrained(folder)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            save_file(model.decode_head.state_dict(), folder / "decode_head.safetensors")
        if method == "spectralmoe_depth" or (method == config.methods[-1] and "spectralmoe_depth" not in results):
            kept = (method, model, target_prediction)
        print(f"{method}: source mIoU {source_metrics['miou']:.3f}, target mIoU {target_metrics['miou']:.3f}, "
              f"{history.seconds:.0f} s")

    method, model, target_prediction = kept
    figures = _figures(out, model, method, histories, target_eval, target_stats, target_prediction, config, device,
                       dtype)
    geotiff = _write_geotiff(out, target_eval, target_prediction, method)
    reload = _check_reload(out, method, model, target_eval, target_stats, config, depth_model, device, dtype)
    summary = {
        "note": RANDOM_INIT_NOTE,
        "device": str(device), "precision": precision,
        "source": source.name, "target": target.name, "classes": list(CLASSES), "ignore_index": IGNORE_INDEX,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k != "scenes"},
        "methods": results,
        "figures": [str(f.name) for f in figures],
        "target_prediction_geotiff": geotiff,
        "reload_check": reload,
        "total_seconds": round(time.perf_counter() - started, 1),
        "data_sources": list(source.sources + target.sources),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print("\n" + _table(results))
    print(f"\nreload of {method}: predictions identical = {reload['identical']}; wrote {out / 'results.json'}")
    if not reload["identical"]:
        raise RuntimeError(f"The reloaded {method} adapter predicts differently from the trained one.")
    return summary


def _figures(out: Path, model: nn.Module, method: str, histories: dict[str, TrainHistory], scene: Scene,
             stats: BandStats, prediction: np.ndarray, config: DemoConfig, device: torch.device,
             dtype: Optional[torch.dtype]) -> list[Path]:
    from .plots import plot_routing_map, plot_training_curves

    figures = [plot_training_curves(out / "training_curves.png", histories)]
    if is_spectralmoe(model):
        size = min(2 * config.crop, *scene.labels.shape)
        window = _most_labelled_window(scene, size)
        crop = scene.crop(*window)
        image = torch.from_numpy(normalize(crop, stats))[None]
        batch = {"pixel_values": image, "nodata_mask": torch.from_numpy(~crop.valid)[None]}
        maps = _routing_maps(model, batch, device, dtype)
        figures.append(plot_routing_map(
            out / "routing_map.png", crop.image, crop.labels, prediction[window], maps, config.num_experts, CLASSES,
            title=f"{method} on the unseen target ({scene.name}): top-1 expert per patch token, visual stream",
        ))
    return figures


def _most_labelled_window(scene: Scene, size: int) -> tuple[slice, slice]:
    labelled = scene.labels != IGNORE_INDEX
    best, best_score = (slice(0, size), slice(0, size)), -1.0
    height, width = labelled.shape
    for top in range(0, height - size + 1, size // 2):
        for left in range(0, width - size + 1, size // 2):
            window = labelled[top : top + size, left : left + size]
            classes = len(np.unique(scene.labels[top : top + size, left : left + size][window]))
            score = window.mean() + classes  # many classes first, then coverage
            if score > best_score:
                best, best_score = (slice(top, top + size), slice(left, left + size)), score
    return best


def _write_geotiff(out: Path, scene: Scene, prediction: np.ndarray, method: str) -> Optional[str]:
    if scene.crs is None:
        return None
    from .geotiff import write_prediction

    return str(write_prediction(out / f"target_prediction_{method}.tif", prediction, scene, CLASSES).name)


def _check_reload(out: Path, method: str, model: nn.Module, scene: Scene, stats: BandStats, config: DemoConfig,
                  depth_model: nn.Module, device: torch.device, dtype: Optional[torch.dtype]) -> dict:
    """Load the saved adapter onto a freshly built base model and compare predictions on target windows."""
    size = min(config.crop, *scene.labels.shape)
    image = torch.from_numpy(normalize(scene, stats))
    batch = {"pixel_values": torch.stack([image[:, :size, :size], image[:, -size:, -size:]]),
             "nodata_mask": torch.from_numpy(np.stack([~scene.valid[:size, :size], ~scene.valid[-size:, -size:]]))}
    batch = to_device(batch, device)
    with torch.no_grad():
        expected = _predictor(model, device, dtype)(batch)
    if not isinstance(model, PeftModel):
        return {"method": method, "identical": True, "checked": "not an adapter"}
    base, _ = build_upernet(scene.num_bands, len(CLASSES), config.backbone, config.crop, seed=config.seed)
    reloaded = PeftModel.from_pretrained(base, out / "adapters" / method).eval()
    if is_spectralmoe(reloaded) and reloaded.peft_config["default"].use_depth:
        reloaded.set_depth_model(depth_model)
    reloaded.to(device)  # with its depth model
    with torch.no_grad():
        actual = _predictor(reloaded, device, dtype)(batch)
    return {"method": method, "identical": bool(torch.equal(actual, expected)),
            "max_abs_logit_difference": float((actual - expected).abs().max())}
