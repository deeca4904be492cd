"""Segmentation metrics and sliding-window inference over whole scenes."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .scenes import IGNORE_INDEX


def confusion_matrix(prediction: Tensor, labels: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(num_classes, num_classes) int64 counts, rows = true class, columns = predicted; ignored pixels skipped."""
    if prediction.shape != labels.shape:
        raise ValueError(f"Prediction {tuple(prediction.shape)} and labels {tuple(labels.shape)} differ in shape.")
    keep = labels != ignore_index
    truth, predicted = labels[keep].long(), prediction[keep].long()
    if truth.numel() and (truth.max() >= num_classes or truth.min() < 0):
        raise ValueError(f"Labels outside 0..{num_classes - 1} (and not ignore_index={ignore_index}).")
    index = truth * num_classes + predicted.clamp(0, num_classes - 1)
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(confusion: Tensor) -> Tensor:
    """IoU per class; NaN for a class absent from both labels and predictions (it does not enter the mean)."""
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.full_like(union, float("nan")))


def segmentation_metrics(confusion: Tensor, class_names: Sequence[str]) -> dict:
    """mIoU over classes present in labels or predictions, per-class IoU, pixel accuracy; JSON-ready."""
    iou = iou_per_class(confusion)
    present = ~iou.isnan()
    total = confusion.sum().item()
    return {
        "miou": float(iou[present].mean()) if present.any() else float("nan"),
        "per_class_iou": {name: (None if math.isnan(v) else float(v)) for name, v in zip(class_names, iou.tolist())},
        "pixel_accuracy": float(confusion.diag().sum() / total) if total else float("nan"),
        "labelled_pixels": int(total),
    }


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)  # the last window ends flush with the scene
    return starts


@torch.no_grad()
def sliding_window_logits(
    predict: Callable[[dict[str, Tensor]], Tensor],
    image: Tensor,
    num_classes: int,
    window: int,
    stride: Optional[int] = None,
    batch_size: int = 16,
    nodata_mask: Optional[Tensor] = None,
    progress: bool = False,
) -> Tensor:
    """Average class logits of overlapping windows over a (C, H, W) scene -> (num_classes, H, W).

    ``predict`` maps a batch ``{"pixel_values": (B, C, w, w), "nodata_mask": (B, w, w)}`` to logits
    ``(B, num_classes, w, w)``. Scenes smaller than the window are zero-padded (padding counts as nodata).
    """
    if image.ndim != 3:
        raise ValueError(f"Expected one (C, H, W) scene, got shape {tuple(image.shape)}.")
    stride = stride or max(1, window // 2)
    channels, height, width = image.shape
    nodata = nodata_mask if nodata_mask is not None else torch.zeros(height, width, dtype=torch.bool)
    pad_h, pad_w = max(0, window - height), max(0, window - width)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h))
        nodata = F.pad(nodata, (0, pad_w, 0, pad_h), value=True)
    full_h, full_w = image.shape[1:]
    logits = torch.zeros(num_classes, full_h, full_w)
    counts = torch.zeros(1, full_h, full_w)
    corners = [(r, c) for r in _window_starts(full_h, window, stride) for c in _window_starts(full_w, window, stride)]
    batches = range(0, len(corners), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="sliding window", leave=False)
    for start in batches:
        chunk = corners[start : start + batch_size]
        batch = {
            "pixel_values": torch.stack([image[:, r : r + window, c : c + window] for r, c in chunk]),
            "nodata_mask": torch.stack([nodata[r : r + window, c : c + window] for r, c in chunk]),
        }
        out = predict(batch).float()
        if out.shape[-2:] != (window, window):
            out = F.interpolate(out, size=(window, window), mode="bilinear", align_corners=False)
        for (r, c), tile in zip(chunk, out):
            logits[:, r : r + window, c : c + window] += tile
            counts[:, r : r + window, c : c + window] += 1
    return (logits / counts)[:, :height, :width]
