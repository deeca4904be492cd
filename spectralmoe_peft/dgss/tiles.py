"""From scenes to training samples: per-domain normalization, random crops, samples as dicts.

Each domain is normalized with its own per-band statistics over valid pixels (DN and reflectance live on different
scales; nothing of the target's labels is used). Nodata pixels become 0 after normalization and travel with the
sample as ``nodata_mask`` so the adapter keeps them out of its routing statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .scenes import IGNORE_INDEX, Scene


@dataclass(frozen=True)
class BandStats:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, scene: Scene) -> "BandStats":
        pixels = scene.image[:, scene.valid].astype(np.float64)  # C, V
        if pixels.shape[1] == 0:
            raise ValueError(f"Scene {scene.name!r} has no valid pixels to compute band statistics from.")
        return cls(tuple(pixels.mean(1).tolist()), tuple(np.maximum(pixels.std(1), 1e-6).tolist()))


def normalize(scene: Scene, stats: BandStats | None = None) -> np.ndarray:
    """(C, H, W) float32, zero-mean unit-variance per band over the scene's valid pixels; nodata set to 0."""
    stats = stats or BandStats.of(scene)
    mean = np.asarray(stats.mean, np.float32)[:, None, None]
    std = np.asarray(stats.std, np.float32)[:, None, None]
    image = (scene.image - mean) / std
    return np.where(scene.valid[None], image, 0.0).astype(np.float32)


def sample(image: np.ndarray, scene: Scene, rows: slice, cols: slice) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.from_numpy(np.ascontiguousarray(image[:, rows, cols])),
        "labels": torch.from_numpy(scene.labels[rows, cols].astype(np.int64)),
        "nodata_mask": torch.from_numpy(~scene.valid[rows, cols]),
    }


class RandomCrops(Dataset):
    """``length`` random ``size`` x ``size`` crops (with flips) that hold at least ``min_labelled`` labelled pixels.

    Deterministic given ``seed``: crop ``i`` is always the same crop, so runs and methods see identical data.
    """

    def __init__(self, scene: Scene, size: int, length: int, seed: int = 0, min_labelled: float = 0.05,
                 stats: BandStats | None = None) -> None:
        height, width = scene.labels.shape
        if size > height or size > width:
            raise ValueError(f"Crop size {size} exceeds scene {scene.name!r} of {height} x {width} px.")
        self.scene, self.size, self.length = scene, size, length
        self.image = normalize(scene, stats)
        labelled = (scene.labels != IGNORE_INDEX).astype(np.float64)
        # integral image: the labelled fraction of any window in O(1)
        integral = np.pad(labelled.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        window = (integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size])
        corners = np.argwhere(window >= min_labelled * size * size)
        if len(corners) == 0:
            raise ValueError(f"No {size} px crop of {scene.name!r} has {min_labelled:.0%} labelled pixels.")
        rng = np.random.default_rng(seed)
        self.corners = corners[rng.integers(0, len(corners), size=length)]
        self.flips = rng.integers(0, 4, size=length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row, col = self.corners[index]
        item = sample(self.image, self.scene, slice(row, row + self.size), slice(col, col + self.size))
        flip = int(self.flips[index])
        dims = [d for d, bit in ((-1, 1), (-2, 2)) if flip & bit]
        return {key: value.flip(dims) if dims else value for key, value in item.items()}
