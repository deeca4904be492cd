"""The README's main job, `spectralmoe-peft demo`, end to end on a tiny budget (real data, all four methods)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import rasterio
from peft import PeftConfig

from spectralmoe_peft.dgss.demo import METHODS, DemoConfig


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "spectralmoe_peft.cli", "demo", "--out", str(out), "--steps", "3",
               "--eval-crop", "128", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "randomly initialized" in result.stdout  # says plainly what offline defaults mean
    assert "target mIoU" in result.stdout and "predictions identical = True" in result.stdout

    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == set(METHODS)
    for name, entry in results["methods"].items():
        for domain in ("source", "target"):
            metrics = entry[domain]
            assert 0.0 <= metrics["miou"] <= 1.0
            assert set(metrics["per_class_iou"]) == set(results["classes"])
            assert len(metrics["confusion_matrix"]) == 6 and metrics["labelled_pixels"] > 0
        assert entry["trainable_parameters"] > 0 and entry["train_seconds"] >= 0
    methods = results["methods"]
    head = methods["frozen"]["trainable_parameters"]
    assert head < methods["lora"]["trainable_parameters"] < methods["spectralmoe_visual"]["trainable_parameters"]
    assert methods["spectralmoe_visual"]["trainable_parameters"] < methods["spectralmoe_depth"]["trainable_parameters"]
    assert methods["spectralmoe_depth"]["routing_health"]["block0/depth"]["load"]
    assert results["reload_check"]["identical"] and results["reload_check"]["method"] == "spectralmoe_depth"

    assert {"routing_map.png", "training_curves.png"} <= {p.name for p in out.glob("*.png")}
    for method in ("lora", "spectralmoe_visual", "spectralmoe_depth"):
        config = PeftConfig.from_pretrained(out / "adapters" / method)
        assert config.modules_to_save and "decode_head" in config.modules_to_save
    assert (out / "adapters" / "frozen" / "decode_head.safetensors").exists()
    with rasterio.open(out / results["target_prediction_geotiff"]) as prediction:
        assert prediction.crs.to_string() == "EPSG:32633" and prediction.shape == (128, 128)


def test_demo_config_rejects_unknown_methods():
    with pytest.raises(ValueError, match="Unknown methods"):
        DemoConfig(methods=("frozen", "prompt_tuning"))
