"""Training: a plain PyTorch loop with the paper's recipe, the auxiliary loss applied once, routing health logged.

Recipe (SpectralMoE / Rein), the defaults of :class:`TrainConfig`: AdamW, lr 1e-4, weight decay 0.05, polynomial
decay with power 0.9, batch 8, 40k iterations, bf16 autocast where the device supports it (CUDA with bf16; fp32 on
the CPU, where bf16 autocast is slower, not faster). The adapter's balance loss reaches the routers through the
task loss's backward (``aux_loss_in_graph=True``, the default); ``get_aux_loss()`` is then detached and added only
to report the total objective. Adapters that opted out get it with its graph, so it is applied exactly once either
way. Per-layer expert load and gate entropy are logged so a collapsing router is seen while it happens, not after.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .models import segmentation_logits
from .scenes import IGNORE_INDEX

PRECISIONS = ("auto", "bf16", "fp32")
# sample keys that are SpectralMoE forward inputs (passed to a SpectralMoE model, not to a plain or LoRA one)
SPECTRALMOE_INPUTS = ("nodata_mask", "depth_pixel_values", "depth_hidden_states", "elevation")


def resolve_device(device: Union[str, torch.device, None] = None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` means CUDA when it is available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: {device!r} is not a torch device (use e.g. 'cuda', 'cuda:1' or 'cpu').") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asked for, but CUDA is not available here; use 'cpu' or leave it unset.")
    return resolved


def autocast_dtype(device: torch.device, precision: str = "auto") -> Optional[torch.dtype]:
    """The autocast dtype of ``precision`` on ``device``, or None for plain fp32. ``"auto"``: bf16 on a CUDA device
    that supports it (the paper's setting), fp32 elsewhere (CPU bf16 autocast is slower than fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}.")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` on ``device`` in ``dtype``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors (and lists of tensors, as cached ``depth_hidden_states``) on ``device`` (asynchronous
    copies from pinned memory); other values as they are."""

    def move(value):
        if isinstance(value, Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, (list, tuple)):
            return type(value)(move(v) for v in value)
        return value

    return {key: move(value) for key, value in batch.items()}


def spectralmoe_inputs(batch: dict) -> dict:
    """The SpectralMoE-only inputs a batch carries (``nodata_mask``, cached ``depth_hidden_states``, ...)."""
    return {key: batch[key] for key in SPECTRALMOE_INPUTS if batch.get(key) is not None}


@dataclass
class TrainConfig:
    """The paper's recipe by default; a short run passes its own ``steps`` (and, on a random backbone, a larger
    ``learning_rate``), as the demo does. ``device=None`` picks CUDA when available; ``precision``: ``"auto"``
    (bf16 autocast on CUDA with bf16 support, else fp32), ``"bf16"`` or ``"fp32"``."""

    steps: int = 40_000
    batch_size: int = 8
    learning_rate: float = 1e-4
    weight_decay: float = 0.05
    poly_power: float = 0.9
    log_every: int = 10
    seed: int = 0
    ignore_index: int = IGNORE_INDEX
    device: Optional[str] = None
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"TrainConfig: steps ({self.steps}) and batch_size ({self.batch_size}) must be >= 1.")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0; got {self.learning_rate}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}; got {self.precision!r}.")
        resolve_device(self.device)  # a bad device string fails here, not after the data is loaded


@dataclass
class TrainHistory:
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    task_loss: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    routing: list[dict] = field(default_factory=list)  # routing health at each logged step (SpectralMoE only)
    seconds: float = 0.0
    device: str = ""  # where it trained, e.g. "cuda:0"
    autocast: Optional[str] = None  # "bfloat16" when it trained under autocast, None for fp32


def is_spectralmoe(model: nn.Module) -> bool:
    """A PeftModel whose tuner is SpectralMoE (it has an aux loss and routing statistics)."""
    return hasattr(getattr(model, "base_model", None), "get_aux_loss")


def poly_lr_lambda(total_steps: int, power: float = 0.9):
    """Factor (1 - step / total)^power: the 'poly' schedule of mmsegmentation, used by the paper."""
    return lambda step: max(0.0, 1.0 - step / total_steps) ** power


def routing_health(model: nn.Module) -> dict:
    """Per block and stream: expert load (fraction of token slots per expert), gate entropy (nats), and the share
    of the busiest expert. A healthy router keeps every expert in use; a collapsed one sends ~all tokens to one."""
    health = {}
    for block, streams in model.base_model.get_routing_stats().items():
        for stream, stats in streams.items():
            load = stats.expert_load.float()
            health[f"block{block}/{stream}"] = {
                "load": [round(v, 4) for v in load.tolist()],
                "entropy": float(stats.gate_entropy),
                "max_share": float(load.max()),
            }
    return health


def normalized_load_entropy(load: list[float]) -> float:
    """Entropy of an expert-load distribution divided by log(E): 1 = perfectly balanced, 0 = one expert takes all."""
    if len(load) < 2:
        return 1.0
    total = sum(load)
    shares = [v / total for v in load if v > 0] if total > 0 else []
    return -sum(p * math.log(p) for p in shares) / math.log(len(load))


def routing_summary(health: dict) -> dict:
    """:func:`routing_health` aggregated over blocks, per stream, as a few numbers that stay readable at 24 blocks:
    ``load_entropy`` (mean over blocks of the normalized load entropy, 1 = balanced), ``max_load`` / ``min_load``
    (the largest and smallest share of any expert in any block), ``dead_experts`` (expert-block pairs that got no
    token) and ``gate_entropy`` (mean over blocks, nats). Keys: ``"<stream>/<name>"``."""
    streams: dict[str, list[dict]] = {}
    for name, entry in health.items():
        streams.setdefault(name.split("/", 1)[1], []).append(entry)
    summary = {}
    for stream, entries in streams.items():
        loads = [entry["load"] for entry in entries]
        summary[f"{stream}/load_entropy"] = sum(map(normalized_load_entropy, loads)) / len(loads)
        summary[f"{stream}/max_load"] = max(max(load) for load in loads)
        summary[f"{stream}/min_load"] = min(min(load) for load in loads)
        summary[f"{stream}/dead_experts"] = sum(v == 0 for load in loads for v in load)
        summary[f"{stream}/gate_entropy"] = sum(entry["entropy"] for entry in entries) / len(entries)
    return summary


def segmentation_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Cross-entropy over labelled pixels (in fp32, also under autocast); 0 (with a gradient path) for a batch with
    none labelled, not NaN."""
    losses = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum()
    return losses / count.clamp_min(1)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def non_finite_loss_error(step: int, task: Tensor, aux: Tensor) -> FloatingPointError:
    return FloatingPointError(
        f"Non-finite loss at step {step} (task {task.item()}, aux {aux.item()}); the weights were not updated with it. "
        "Check the input for NaN/Inf (mark nodata with nodata_mask rather than NaN) and lower the learning rate."
    )


def train_segmentation(
    model: nn.Module,
    dataset: Dataset,
    config: Optional[TrainConfig] = None,
    progress: bool = True,
    description: str = "training",
) -> TrainHistory:
    """Train the trainable parameters of ``model`` (adapter + ``modules_to_save``, or a head) on ``dataset``
    samples ``{"pixel_values", "labels", "nodata_mask"}`` (optionally cached ``depth_hidden_states``, ...) for
    ``config.steps`` steps, on ``config.device``.

    The model (with its depth model) is moved to the device and stays there; batches come from pinned memory on
    CUDA; the forward runs under bf16 autocast when ``config.precision`` asks for it; the loss is taken in fp32 and
    everything logged is a host float. A non-finite loss raises ``FloatingPointError`` before the weights change."""
    config = config or TrainConfig()
    parameters = trainable_parameters(model)
    if not parameters:
        raise ValueError("The model has no trainable parameters: nothing to train.")
    device = resolve_device(config.device)
    dtype = autocast_dtype(device, config.precision)
    model.to(device)  # a SpectralMoE model's depth model moves with it
    moe = is_spectralmoe(model)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lr_lambda(config.steps, config.poly_power))
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                        drop_last=len(dataset) >= config.batch_size, generator=generator,
                        pin_memory=device.type == "cuda")
    history = TrainHistory(device=str(device), autocast=None if dtype is None else str(dtype).removeprefix("torch."))
    bar = range(config.steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=description, leave=False)
    model.train()
    start = time.perf_counter()
    batches = iter(loader)
    for step in bar:
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        batch = to_device(batch, device)
        extra = spectralmoe_inputs(batch) if moe else None
        with autocast(device, dtype):
            logits = segmentation_logits(model, batch, extra)
        task = segmentation_loss(logits, batch["labels"], config.ignore_index)
        aux = model.base_model.get_aux_loss() if moe else task.new_zeros(())
        loss = task + aux  # aux: detached (already in the graph) unless the adapter opted out: applied once
        if not torch.isfinite(loss):
            raise non_finite_loss_error(step, task, aux)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % config.log_every == 0 or step == config.steps - 1:
            history.step.append(step)
            history.loss.append(loss.item())
            history.task_loss.append(task.item())
            history.aux_loss.append(aux.item())
            history.learning_rate.append(scheduler.get_last_lr()[0])
            if moe:
                history.routing.append(routing_health(model))
        if progress:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    history.seconds = time.perf_counter() - start
    model.eval()
    return history
