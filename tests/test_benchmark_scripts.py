"""The scene-scale inference and torch.compile benchmarks run, and measure what their docs say.

Their workers are called in this process on tiny configurations (the command-line runs spawn one fresh process
per method, which costs an interpreter start each: too slow for the suite).
"""

from __future__ import annotations

import copy
import math
import os
import sys
from dataclasses import asdict, replace

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_compile
import bench_expert_parts
import bench_inference
from naive import NaiveSpectralMoE
from tiny_models import make_model

# 96 px scene, 64 px tiles at stride 32: 2 x 2 tiles, one batch
TINY_SCENE = replace(bench_inference.QUICK, scene=96, tile=64, stride=32, tile_batch=4)
TINY_STEP = replace(bench_compile.QUICK, image=32, blocks=1)
FULL = ("smoe_full", "smoe_full_half", "naive_full")


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _spec(**extra) -> dict:
    return {"config": asdict(TINY_SCENE), "device": "cpu", "threads": 1, "rounds": 1, **extra}


def test_inference_time_split_adds_up_and_depth_is_timed_only_where_it_runs(restore_threads):
    assert TINY_SCENE.num_tiles == 4
    results = bench_inference.timing_worker(_spec(kind="timing", methods=list(bench_inference.METHODS)))
    assert set(results) == set(bench_inference.METHODS)
    half = results.pop("smoe_full_half")
    if bench_inference.has_depth_input_scale():
        results["smoe_full_half"] = half
    else:  # reported by name, the other methods still ran
        assert "depth_input_scale" in half["error"]
    for method, result in results.items():
        assert "error" not in result, (method, result)
        parts = result["backbone_s"] + result["depth_s"] + result["adapter_s"]
        assert math.isclose(parts, result["forward_s"], rel_tol=1e-9, abs_tol=1e-12), method
        assert 0 < result["forward_s"] <= result["scene_s"], method
        assert result["backbone_s"] > 0, method
        assert math.isclose(result["tiles_per_s"], 4 / result["scene_s"]), method
        assert (result["depth_s"] > 0) == (method in FULL), method


def test_inference_memory_worker_reports_both_peaks(restore_threads):
    result = bench_inference.memory_worker(_spec(kind="memory", method="smoe_full"))
    assert set(result) == {"batch_mem_mb", "scene_mem_mb", "mem_method"}
    assert all(math.isfinite(result[key]) for key in ("batch_mem_mb", "scene_mem_mb"))


def test_inference_command_line_refuses_bad_options_by_name(capsys):
    with pytest.raises(SystemExit):
        bench_inference.main(["--quick", "--tile", "50"])
    assert "--tile must be a multiple of the patch size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_inference.main(["--quick", "--methods", "lora,dora"])
    assert "unknown methods ['dora']" in capsys.readouterr().err


def test_inference_report_shows_errors_and_ratios(capsys):
    results = {
        "lora": {"scene_s": 2.0, "tiles_per_s": 2.0, "batch_mem_mb": 10.0, "scene_mem_mb": 20.0, "backbone_s": 1.5,
                 "depth_s": 0.0, "adapter_s": 0.3, "other_s": 0.2},
        "smoe_full": {"scene_s": 3.0, "tiles_per_s": 1.3, "batch_mem_mb": 15.0, "scene_mem_mb": 25.0,
                      "backbone_s": 1.5, "depth_s": 0.8, "adapter_s": 0.4, "other_s": 0.3},
        "smoe_full_half": {"error": "RuntimeError: needs depth_input_scale"},
    }
    out = bench_inference.report(TINY_SCENE, results)
    text = capsys.readouterr().out
    assert "smoe_full_half  ERROR RuntimeError: needs depth_input_scale" in text
    full = next(r for r in out["results"] if r["method"] == "smoe_full")
    assert full["time_vs_lora"] == pytest.approx(1.5) and full["mem_vs_lora"] == pytest.approx(1.5)


def test_naive_disable_adapter_is_the_plain_backbone():
    base = make_model("dinov2")
    plain = copy.deepcopy(base).eval()
    naive = NaiveSpectralMoE(base, num_experts=3, top_k=1, expert_rank=4, num_tokens=5, use_depth=False,
                             scale_init=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = plain(pixel_values=x).last_hidden_state
        with naive.disable_adapter():
            off = naive(pixel_values=x).last_hidden_state
        on = naive(pixel_values=x).last_hidden_state
    torch.testing.assert_close(off, reference, rtol=0, atol=0)
    assert (on - reference).abs().max() > 1e-3  # the switch is back off after the block


def _compile(method: str, **extra) -> dict:
    spec = {"config": asdict(TINY_STEP), "device": "cpu", "threads": 1, "warmup": 1, "steps": 1,
            "backend": "eager", "mode": None, "method": method, **extra}
    return bench_compile.worker(spec)


@pytest.mark.parametrize("method", ["lora", "smoe_visual"])
def test_compile_worker_reports_the_ratio_and_no_graph_break(method, restore_threads):
    result = _compile(method)
    assert "error" not in result, result
    assert result["compiled_vs_eager"] == pytest.approx(result["compiled_ms"] / result["eager_ms"])
    assert result["graph_breaks"] == 0 and result["compile_s"] == result["compile_s"]


def test_compile_worker_records_a_failure_instead_of_crashing(restore_threads):
    result = _compile("lora", backend="no_such_backend")
    assert result["failed_at"] in ("model.compile()", "first compiled step") and "no_such_backend" in result["error_text"]


def test_depth_model_on_the_fly_compiles_without_graph_breaks(restore_threads):
    """README/performance.md: compiled before its first call, the model with the depth model on the fly is one graph.
    (transformers 5 installs its output-capturing hooks under a lock on the first output_hidden_states call, which
    broke the graph until set_depth_model installed them up front.)"""
    torch._dynamo.reset()
    result = _compile("smoe_full", warmup=0)
    torch._dynamo.reset()
    assert "error" not in result, result
    assert result["graph_breaks"] == 0, result["graph_break_reasons"]


def test_expert_parts_measures_every_part_at_each_expert_count():
    """bench_expert_parts times the fusion (head width E*r + 1), the dense projection and the grouped one."""
    rows = [bench_expert_parts.measure(e, batch=1, tokens=16, width=32, rank=4, repeats=1) for e in (2, 4)]
    assert [row["fusion_width"] for row in rows] == [9, 17]
    for row in rows:
        assert row["fusion_ms"] > 0 and row["projection_ms"] > 0
        assert row.get("grouped_ms", 1.0) > 0 or "grouped_error" in row
