"""Write a class map as a georeferenced GeoTIFF, on the grid of the scene it was predicted from."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np

from .scenes import IGNORE_INDEX, Scene, _require_geo


def write_prediction(path: Union[str, Path], prediction: np.ndarray, scene: Scene,
                     class_names: Sequence[str] = ()) -> Path:
    """``prediction`` (H, W) class indices -> single-band uint8 GeoTIFF with the scene's CRS and transform;
    nodata pixels of the scene are written as ``IGNORE_INDEX`` (declared the file's nodata value)."""
    rasterio = _require_geo()
    from affine import Affine

    prediction = np.asarray(prediction)
    if prediction.shape != scene.labels.shape:
        raise ValueError(f"Prediction {prediction.shape} does not cover scene {scene.name!r} {scene.labels.shape}.")
    if scene.crs is None or scene.transform is None:
        raise ValueError(f"Scene {scene.name!r} has no georeferencing (crs/transform) to write a GeoTIFF with.")
    data = np.where(scene.valid, prediction, IGNORE_INDEX).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", height=data.shape[0], width=data.shape[1], count=1, dtype="uint8",
                   crs=scene.crs, transform=Affine(*scene.transform), nodata=IGNORE_INDEX, compress="deflate")
    with rasterio.open(path, "w", **profile) as sink:
        sink.write(data, 1)
        if class_names:
            sink.update_tags(1, **{f"class_{i}": name for i, name in enumerate(class_names)})
    return path
