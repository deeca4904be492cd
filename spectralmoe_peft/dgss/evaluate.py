"""Segmentation metrics and sliding-window inference over whole scenes. Inputs may be numpy arrays or tensors on
any device; metrics are computed, and logits accumulated, on the host."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .scenes import IGNORE_INDEX


ArrayLike = Union[Tensor, np.ndarray]


def as_host_tensor(array: ArrayLike, name: str) -> Tensor:
    """A CPU tensor of a numpy array or a tensor on any device (numpy bool masks included)."""
    if isinstance(array, Tensor):
        return array.detach().cpu()
    if isinstance(array, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(array))
    raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(array).__name__}.")


def confusion_matrix(prediction: ArrayLike, labels: ArrayLike, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(num_classes, num_classes) int64 counts on the CPU, rows = true class, columns = predicted; ignored pixels
    skipped. Takes tensors (any device) or numpy arrays of any integer dtype."""
    prediction, labels = as_host_tensor(prediction, "prediction"), as_host_tensor(labels, "labels")
    if prediction.shape != labels.shape:
        raise ValueError(f"Prediction {tuple(prediction.shape)} and labels {tuple(labels.shape)} differ in shape.")
    for name, array in (("prediction", prediction), ("labels", labels)):
        if array.is_floating_point() or array.is_complex():
            raise TypeError(f"{name}: expected class ids (an integer array), got {array.dtype}; take argmax of logits.")
    labels, prediction = labels.long(), prediction.long()  # uint8 / uint16 rasters included
    keep = labels != ignore_index
    truth, predicted = labels[keep], prediction[keep]
    if truth.numel() and (truth.max() >= num_classes or truth.min() < 0):
        raise ValueError(f"Labels outside 0..{num_classes - 1} (and not ignore_index={ignore_index}).")
    index = truth * num_classes + predicted.clamp(0, num_classes - 1)
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(confusion: ArrayLike) -> Tensor:
    """IoU per class; NaN for a class absent from both labels and predictions (it does not enter the mean)."""
    confusion = as_host_tensor(confusion, "confusion").double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.full_like(union, float("nan")))


def segmentation_metrics(confusion: ArrayLike, class_names: Sequence[str]) -> dict:
    """mIoU over classes present in labels or predictions, per-class IoU, pixel accuracy; JSON-ready."""
    confusion = as_host_tensor(confusion, "confusion")
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
    image: ArrayLike,
    num_classes: int,
    window: int,
    stride: Optional[int] = None,
    batch_size: int = 16,
    nodata_mask: Optional[ArrayLike] = None,
    progress: bool = False,
    device: Union[str, torch.device, None] = None,
) -> Tensor:
    """Average class logits of overlapping windows over a (C, H, W) scene -> (num_classes, H, W) fp32 on the CPU.

    ``predict`` maps a batch ``{"pixel_values": (B, C, w, w), "nodata_mask": (B, w, w)}`` to logits
    ``(B, num_classes, w, w)``. Scenes smaller than the window are zero-padded (padding counts as nodata).
    ``image`` and ``nodata_mask`` may be numpy arrays; with ``device``, each batch is sent there (the scene and the
    averaged logits stay on the host, so a large scene does not have to fit on the device).
    """
    image = as_host_tensor(image, "image")
    if image.ndim != 3:
        raise ValueError(f"Expected one (C, H, W) scene, got shape {tuple(image.shape)}.")
    stride = stride or max(1, window // 2)
    channels, height, width = image.shape
    if nodata_mask is None:
        nodata = torch.zeros(height, width, dtype=torch.bool)
    else:
        nodata = as_host_tensor(nodata_mask, "nodata_mask").bool()
        if nodata.shape != (height, width):
            raise ValueError(f"nodata_mask has shape {tuple(nodata.shape)}; the scene is {height} x {width}.")
    pin = device is not None and torch.device(device).type == "cuda"
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
        if device is not None:
            batch = {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in batch.items()}
        out = predict(batch).float().cpu()
        if out.shape[-2:] != (window, window):
            out = F.interpolate(out, size=(window, window), mode="bilinear", align_corners=False)
        for (r, c), tile in zip(chunk, out):
            logits[:, r : r + window, c : c + window] += tile
            counts[:, r : r + window, c : c + window] += 1
    return (logits / counts)[:, :height, :width]
