"""Training: a plain PyTorch loop with the paper's recipe, the auxiliary loss added, and routing health logged.

Recipe (SpectralMoE / Rein): AdamW, lr 1e-4, weight decay 0.05, polynomial decay with power 0.9. The adapter's
balance loss of each forward (``get_aux_loss()``) is added to the task loss; per-layer expert load and gate entropy
are logged so a collapsing router is seen while it happens, not after.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .models import segmentation_logits
from .scenes import IGNORE_INDEX


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8
    learning_rate: float = 1e-4
    weight_decay: float = 0.05
    poly_power: float = 0.9
    log_every: int = 10
    seed: int = 0
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"TrainConfig: steps ({self.steps}) and batch_size ({self.batch_size}) must be >= 1.")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0; got {self.learning_rate}.")


@dataclass
class TrainHistory:
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    task_loss: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    routing: list[dict] = field(default_factory=list)  # routing health at each logged step (SpectralMoE only)
    seconds: float = 0.0


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


def segmentation_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Cross-entropy over labelled pixels; 0 (with a gradient path) for a batch with none labelled, not NaN."""
    losses = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum()
    return losses / count.clamp_min(1)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_segmentation(
    model: nn.Module,
    dataset: Dataset,
    config: Optional[TrainConfig] = None,
    progress: bool = True,
    description: str = "training",
) -> TrainHistory:
    """Train the trainable parameters of ``model`` (adapter + ``modules_to_save``, or a head) on ``dataset``
    samples ``{"pixel_values", "labels", "nodata_mask"}`` for ``config.steps`` steps."""
    config = config or TrainConfig()
    parameters = trainable_parameters(model)
    if not parameters:
        raise ValueError("The model has no trainable parameters: nothing to train.")
    moe = is_spectralmoe(model)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lr_lambda(config.steps, config.poly_power))
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                        drop_last=len(dataset) >= config.batch_size, generator=generator)
    history = TrainHistory()
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
        extra = {"nodata_mask": batch["nodata_mask"]} if moe else None
        logits = segmentation_logits(model, batch, extra)
        task = segmentation_loss(logits, batch["labels"], config.ignore_index)
        aux = model.base_model.get_aux_loss() if moe else task.new_zeros(())
        loss = task + aux
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Non-finite loss at step {step} (task {task.item()}, aux {aux.item()}): check the input for NaN/Inf "
                "and lower the learning rate."
            )
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
