"""Figures people would rather look at than read: routing maps and training curves (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np

from .train import TrainHistory

CLASS_COLOURS = np.array([[31, 119, 180], [44, 110, 44], [170, 220, 110], [190, 150, 80], [240, 200, 40],
                          [200, 40, 40]], dtype=np.float32) / 255.0


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("Plots need matplotlib: pip install 'spectralmoe-peft[demo]'") from error
    return plt


def rgb_composite(image: np.ndarray, rgb: Sequence[int] = (2, 1, 0)) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) in [0, 1], each band stretched between its 2nd and 98th percentile."""
    bands = image[list(rgb)].astype(np.float64)
    low = np.percentile(bands, 2, axis=(1, 2), keepdims=True)
    high = np.percentile(bands, 98, axis=(1, 2), keepdims=True)
    return np.clip((bands - low) / np.maximum(high - low, 1e-9), 0, 1).transpose(1, 2, 0)


def label_image(labels: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Class indices -> colours; ignored pixels white."""
    out = np.ones(labels.shape + (3,), np.float32)
    known = labels != ignore_index
    out[known] = CLASS_COLOURS[np.clip(labels[known], 0, len(CLASS_COLOURS) - 1)]
    return out


def plot_routing_map(path: Union[str, Path], image: np.ndarray, labels: np.ndarray, prediction: np.ndarray,
                     expert_maps: Mapping[str, np.ndarray], num_experts: int, class_names: Sequence[str],
                     title: str = "") -> Path:
    """Image, labels and prediction next to one map per block of the expert each patch token was routed to."""
    plt = _pyplot()
    panels = 3 + len(expert_maps)
    fig, axes = plt.subplots(1, panels, figsize=(2.6 * panels, 3.0), squeeze=False)
    axes = axes[0]
    axes[0].imshow(rgb_composite(image))
    axes[0].set_title("image (R,G,B)")
    axes[1].imshow(label_image(labels))
    axes[1].set_title("labels")
    axes[2].imshow(label_image(prediction))
    axes[2].set_title("prediction")
    cmap = plt.get_cmap("tab10", num_experts)
    for ax, (name, experts) in zip(axes[3:], expert_maps.items()):
        shown = ax.imshow(experts, cmap=cmap, vmin=-0.5, vmax=num_experts - 0.5, interpolation="nearest")
        ax.set_title(name)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if expert_maps:
        fig.colorbar(shown, ax=list(axes[3:]), ticks=range(num_experts), label="expert", shrink=0.8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=CLASS_COLOURS[i]) for i in range(len(class_names))]
    fig.legend(handles, class_names, loc="lower center", ncol=len(class_names), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_training_curves(path: Union[str, Path], histories: Mapping[str, TrainHistory]) -> Path:
    """Task loss per method, and the auxiliary (balance) loss of the SpectralMoE runs."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, history in histories.items():
        left.plot(history.step, history.task_loss, label=name)
        if any(history.aux_loss):
            right.plot(history.step, history.aux_loss, label=name)
    left.set_xlabel("step")
    left.set_ylabel("task loss (cross-entropy)")
    left.legend(fontsize=8)
    right.set_xlabel("step")
    right.set_ylabel("auxiliary balance loss")
    if right.lines:
        right.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
