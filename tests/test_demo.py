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
    with pytest.raises(ValueError, match="not a torch device"):
        DemoConfig(device="gpu0")


def test_demo_defaults_are_its_own_short_budget():
    """docs/full_scale.md: the demo's defaults are a short run (500 steps, lr 5e-3); the paper's recipe is passed
    explicitly. The CLI's defaults are DemoConfig's."""
    import argparse

    from spectralmoe_peft.cli import _demo_parser, main

    config = DemoConfig()
    assert (config.steps, config.learning_rate, config.batch_size, config.device) == (500, 5e-3, 8, None)
    parser = argparse.ArgumentParser()
    _demo_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo"])
    assert (args.steps, args.lr, args.batch_size, args.device) == (500, 5e-3, 8, None)
    assert main(["demo", "--device", "gpu0"]) == 2  # a bad option is an error message, not a traceback


def test_demo_takes_local_backbone_and_depth_model_paths(tmp_path):
    """--backbone / --depth-model accept what from_pretrained accepts; here local folders of an RGB DINOv2 (widened
    to 6 bands, the widened embedding trained and saved) and a Depth Anything model (its ViT gives the features)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    tf.Dinov2Model(tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   patch_size=8, image_size=64)).save_pretrained(tmp_path / "rgb_vit")
    backbone = tf.Dinov2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                               patch_size=7, image_size=63, out_indices=[1, 2], reshape_hidden_states=False)
    depth = tf.DepthAnythingConfig(backbone_config=backbone, patch_size=7, reassemble_hidden_size=24,
                                   fusion_hidden_size=16, head_hidden_size=8, neck_hidden_sizes=[12, 24],
                                   reassemble_factors=[2, 1])
    tf.DepthAnythingForDepthEstimation(depth).save_pretrained(tmp_path / "depth")
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "spectralmoe_peft.cli", "demo", "--out", str(out), "--steps", "2",
               "--eval-crop", "64", "--no-progress", "--methods", "spectralmoe_depth",
               "--backbone", str(tmp_path / "rgb_vit"), "--depth-model", str(tmp_path / "depth")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["reload_check"]["identical"]
    config = PeftConfig.from_pretrained(out / "adapters" / "spectralmoe_depth")
    assert "backbone.embeddings.patch_embeddings.projection" in config.modules_to_save
    assert config.depth_model_name_or_path is None  # a local folder is never written into a shared config
