"""The HF ``Trainer`` path: the adapter's auxiliary loss applied once, compact routing health in the
logs, an mIoU ``compute_metrics``, and the paper's recipe as ``TrainingArguments`` defaults. Needs ``accelerate``
(``pip install 'spectralmoe-peft[trainer]'``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from transformers import EvalPrediction, Trainer, TrainingArguments

from .evaluate import confusion_matrix, segmentation_metrics
from .models import segmentation_logits
from .scenes import IGNORE_INDEX
from .train import (
    SPECTRALMOE_INPUTS,
    is_spectralmoe,
    non_finite_loss_error,
    routing_health,
    routing_summary,
    segmentation_loss,
    spectralmoe_inputs,
)

# sample keys the Trainer must hand to compute_loss although the base model's forward does not name them
SAMPLE_KEYS = ("pixel_values", "labels", *SPECTRALMOE_INPUTS)
ROUTING_LOGS = ("compact", "full")


def _bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def paper_training_arguments(output_dir: str, **overrides: Any) -> TrainingArguments:
    """The paper's recipe: AdamW, lr 1e-4, weight decay 0.05, polynomial decay with power 0.9, batch 8 per device,
    40k steps, bf16 autocast when it trains on CUDA with bf16 support (fp32 otherwise); ``overrides`` win.
    ``remove_unused_columns=False``: samples are dicts of tensors, not a ``datasets.Dataset``."""
    settings = dict(
        output_dir=output_dir, learning_rate=1e-4, weight_decay=0.05, optim="adamw_torch",
        lr_scheduler_type="polynomial", lr_scheduler_kwargs={"power": 0.9, "lr_end": 0.0}, warmup_steps=0,
        max_steps=40_000, per_device_train_batch_size=8, bf16=_bf16_supported() and not overrides.get("use_cpu"),
        remove_unused_columns=False, report_to="none", save_strategy="no", logging_steps=10,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def collate_segmentation(samples: list[dict]) -> dict:
    """Stack a list of ``{"pixel_values", "labels", "nodata_mask"}`` samples into a batch; a list of per-layer
    tensors (cached ``depth_hidden_states``) becomes a list of stacked layers."""

    def stack(values: list):
        if isinstance(values[0], (list, tuple)):
            return [torch.stack(layer) for layer in zip(*values)]
        return torch.stack(values)

    return {key: stack([sample[key] for sample in samples]) for key in samples[0]}


def argmax_logits(logits: torch.Tensor, labels: Any = None) -> torch.Tensor:
    """For ``Trainer(preprocess_logits_for_metrics=argmax_logits)``: keep class ids (B, H, W), not the logits
    (B, C, H, W), so evaluation does not gather C times the memory on the host."""
    return logits.argmax(1)


def segmentation_compute_metrics(
    class_names: Sequence[str], ignore_index: int = IGNORE_INDEX
) -> Callable[[EvalPrediction], dict]:
    """A ``compute_metrics`` for the Trainer: mIoU, pixel accuracy and per-class IoU (``iou_<class>``, None for a
    class absent from labels and predictions), exactly :func:`segmentation_metrics` of the whole evaluation set's
    confusion matrix. Predictions may be logits (N, C, H, W) or class ids (N, H, W) from :func:`argmax_logits`;
    labels padded by the Trainer (-100) count as ignored."""
    names = list(class_names)

    def compute_metrics(prediction: EvalPrediction) -> dict:
        predicted, labels = np.asarray(prediction.predictions), np.asarray(prediction.label_ids)
        if predicted.ndim == labels.ndim + 1:
            predicted = predicted.argmax(1)
        labels = np.where(labels == -100, ignore_index, labels)
        confusion = confusion_matrix(predicted, labels, len(names), ignore_index)
        metrics = segmentation_metrics(confusion, names)
        result = {"miou": metrics["miou"], "pixel_accuracy": metrics["pixel_accuracy"]}
        result.update({f"iou_{name}": value for name, value in metrics["per_class_iou"].items()})
        return result

    return compute_metrics


class SpectralMoETrainer(Trainer):
    """``Trainer`` for segmentation with SpectralMoE: task loss (cross-entropy, ``ignore_index`` respected); the
    balance loss rides in the graph (``aux_loss_in_graph=True``), and ``get_aux_loss()`` is added only for adapters that
    opted out (otherwise it is detached: the logged loss is the total objective, the gradient counts it once); every
    logging step also logs the routing health. Works for LoRA or plain models too (no aux
    loss, no routing logs), so baselines run through the same code.

    ``routing_log="compact"`` (default) logs per stream, aggregated over blocks (see
    :func:`~spectralmoe_peft.dgss.train.routing_summary`): ``routing/<stream>/load_entropy``, ``max_load``,
    ``min_load``, ``dead_experts``, ``gate_entropy``; ``"full"`` adds per block ``routing/block<i>/<stream>/entropy``,
    ``max_share`` and ``load_e<k>`` per expert. The sample keys SpectralMoE reads (``nodata_mask``, ...) reach
    ``compute_loss`` also with ``remove_unused_columns=True``. A non-finite training loss raises
    ``FloatingPointError`` before the weights change."""

    ignore_index: int = IGNORE_INDEX

    def __init__(self, *args: Any, routing_log: str = "compact", **kwargs: Any) -> None:
        if routing_log not in ROUTING_LOGS:
            raise ValueError(f"routing_log must be one of {ROUTING_LOGS}; got {routing_log!r}.")
        self.routing_log = routing_log
        super().__init__(*args, **kwargs)
        # compute_loss returns a per-batch mean (it does not use num_items_in_batch): let Trainer divide it by the
        # gradient-accumulation steps (models whose forward takes **kwargs would otherwise get N x the loss)
        self.model_accepts_loss_kwargs = False

    def _set_signature_columns_if_needed(self) -> None:
        # the base model's forward names pixel_values (and labels) only: without this, remove_unused_columns=True
        # (the TrainingArguments default) drops nodata_mask silently
        super()._set_signature_columns_if_needed()
        self._signature_columns += [key for key in SAMPLE_KEYS if key not in self._signature_columns]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        moe = is_spectralmoe(self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model)
        batch = dict(inputs)
        labels = batch.pop("labels")
        extra = spectralmoe_inputs(batch) if moe else None
        logits = segmentation_logits(model, batch, extra)
        task = segmentation_loss(logits, labels, self.ignore_index)
        loss = task
        if moe:
            unwrapped = self.accelerator.unwrap_model(model)
            loss = task + unwrapped.base_model.get_aux_loss()
        if model.training and not torch.isfinite(loss):
            raise non_finite_loss_error(self.state.global_step, task, loss - task)
        if moe and model.training and self.state.global_step % max(1, self.args.logging_steps) == 0:
            self._routing_log = {"task_loss": task.item(), "aux_loss": (loss - task).item(),
                                 **self._routing_logs(unwrapped)}
        return (loss, {"logits": logits}) if return_outputs else loss

    def _routing_logs(self, model) -> dict:
        health = routing_health(model)
        logs = {f"routing/{key}": value for key, value in routing_summary(health).items()}
        if self.routing_log == "full":
            for name, entry in health.items():
                logs[f"routing/{name}/entropy"] = entry["entropy"]
                logs[f"routing/{name}/max_share"] = entry["max_share"]
                for expert, share in enumerate(entry["load"]):
                    logs[f"routing/{name}/load_e{expert}"] = share
        return logs

    def log(self, logs: dict, *args: Any, **kwargs: Any) -> None:
        pending = getattr(self, "_routing_log", None)
        if pending and "loss" in logs:
            logs = {**logs, **pending}
            self._routing_log = None
        super().log(logs, *args, **kwargs)
