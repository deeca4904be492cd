"""The HF ``Trainer`` path: the adapter's auxiliary loss added to the task loss, routing health in the logs, and
the paper's recipe as ``TrainingArguments`` defaults. Needs ``accelerate``
(``pip install 'spectralmoe-peft[trainer]'``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from .models import segmentation_logits
from .scenes import IGNORE_INDEX
from .train import is_spectralmoe, routing_health, segmentation_loss


def paper_training_arguments(output_dir: str, **overrides: Any) -> TrainingArguments:
    """AdamW, lr 1e-4, weight decay 0.05, polynomial decay with power 0.9 (the paper's recipe); ``overrides`` win.
    ``remove_unused_columns=False``: samples are dicts of tensors, not a ``datasets.Dataset``."""
    settings = dict(
        output_dir=output_dir, learning_rate=1e-4, weight_decay=0.05, optim="adamw_torch",
        lr_scheduler_type="polynomial", lr_scheduler_kwargs={"power": 0.9, "lr_end": 0.0}, warmup_steps=0,
        remove_unused_columns=False, report_to="none", save_strategy="no", logging_steps=10,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def collate_segmentation(samples: list[dict]) -> dict:
    """Stack a list of ``{"pixel_values", "labels", "nodata_mask"}`` samples into a batch."""
    return {key: torch.stack([sample[key] for sample in samples]) for key in samples[0]}


class SpectralMoETrainer(Trainer):
    """``Trainer`` for segmentation with SpectralMoE: task loss (cross-entropy, ``ignore_index`` respected) +
    ``get_aux_loss()``; every logging step also logs per-block expert load and gate entropy. Works for LoRA or
    plain models too (no aux loss, no routing logs), so baselines run through the same code."""

    ignore_index: int = IGNORE_INDEX

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        moe = is_spectralmoe(self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model)
        batch = dict(inputs)
        labels = batch.pop("labels")
        nodata = batch.pop("nodata_mask", None)
        extra = {"nodata_mask": nodata} if moe and nodata is not None else None
        logits = segmentation_logits(model, batch, extra)
        task = segmentation_loss(logits, labels, self.ignore_index)
        loss = task
        if moe:
            unwrapped = self.accelerator.unwrap_model(model)
            loss = task + unwrapped.base_model.get_aux_loss()
            if self.state.global_step % max(1, self.args.logging_steps) == 0 and model.training:
                self._routing_log = {"task_loss": task.item(), "aux_loss": (loss - task).item()}
                for name, health in routing_health(unwrapped).items():
                    self._routing_log[f"routing/{name}/entropy"] = health["entropy"]
                    self._routing_log[f"routing/{name}/max_share"] = health["max_share"]
                    for expert, share in enumerate(health["load"]):
                        self._routing_log[f"routing/{name}/load_e{expert}"] = share
        return (loss, {"logits": logits}) if return_outputs else loss

    def log(self, logs: dict, *args: Any, **kwargs: Any) -> None:
        pending = getattr(self, "_routing_log", None)
        if pending and "loss" in logs:
            logs = {**logs, **pending}
            self._routing_log = None
        super().log(logs, *args, **kwargs)
