"""Every ```python block of README.md and docs/*.md runs, as a reader would run it, so a snippet cannot rot.

Blocks run in order, one namespace per file (like a notebook), in a temporary working directory. The reader's world
is stood in for, never the snippet's text:

- Hub ids are local folders: tiny random models are saved under the ids the docs use (``facebook/dinov3-...``,
  ``depth-anything/...``) in the working directory, so ``from_pretrained("<id>")`` loads them with transformers' own
  code; the Hub is offline. ``push_to_hub("<id>")`` uploads into the folder ``<id>`` (the network call is faked one
  level down, as in tests/test_hub.py), so loading ``"<id>"`` back reads what was uploaded.
- The real scenes are small synthetic scenes with the same bands; long training is short: ``TrainConfig`` and
  ``paper_training_arguments`` default to 2 steps of batch 2 (other settings as given), datasets hold few crops.
- Objects the prose says the reader already has (``backbone``, ``depth_model``, ``x``, a segmentation ``model``,
  ...) are given per file in ``GIVEN``.

A block that cannot run here (it needs the Hub, a GPU, torchrun, several processes) is marked in the markdown, on
the line right before its fence: ``<!-- snippet: skip (needs a GPU) -->``. Such blocks are counted and listed
(``test_skipped_blocks_are_marked_with_a_reason``); every other block must run.
"""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch
import transformers as tf
from hub_fakes import fake_hub_upload

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*snippet:(?P<rest>.*?)-->", re.S)
SKIP = re.compile(r"^\s*skip\s*\((?P<reason>.*\S.*)\)\s*$", re.S)
PYTHON = {"python", "py", "python3"}
PROMPTS = {"pycon", "ipython", "python-repl"}  # not run: write such examples as plain ```python

DINOV3 = "facebook/dinov3-vitl16-pretrain-sat493m"
DEPTH_ANYTHING = "depth-anything/Depth-Anything-V2-Large-hf"


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the first code line in the markdown file
    code: str
    skip: Optional[str]  # the reason given in the marker

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The python blocks of one markdown file, each with the skip reason of a marker right before its fence."""
    text = path.read_text()
    found, previous_end = [], 0
    for match in FENCE.finditer(text):
        before = text[previous_end:match.start()].rstrip().splitlines()
        previous_end = match.end()
        if match.group("lang").strip().lower() not in PYTHON:
            continue
        marker = MARKER.fullmatch(before[-1].strip()) if before else None
        skip = None
        if marker is not None:
            reason = SKIP.match(marker.group("rest"))
            assert reason, (f"{path.name}: unknown snippet marker {before[-1].strip()!r}; "
                            "use <!-- snippet: skip (why) -->")
            skip = reason.group("reason").strip()
        line = text[:match.start("body")].count("\n") + 1
        found.append(Block(path, line, textwrap.dedent(match.group("body")), skip))
    return found


# --------------------------------------------------------------------------------------------------- the world


def _tiny_dinov3(num_channels: int = 3) -> tf.DINOv3ViTModel:
    config = tf.DINOv3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                image_size=32, patch_size=8, num_register_tokens=2, num_channels=num_channels)
    return tf.DINOv3ViTModel(config).eval()


def _tiny_depth_anything() -> tf.DepthAnythingForDepthEstimation:
    backbone = tf.Dinov2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                               patch_size=7, image_size=28, out_indices=[1, 2], reshape_hidden_states=False)
    return tf.DepthAnythingForDepthEstimation(tf.DepthAnythingConfig(
        backbone_config=backbone, patch_size=7, reassemble_hidden_size=24, fusion_hidden_size=16,
        head_hidden_size=8, neck_hidden_sizes=[12, 24], reassemble_factors=[2, 1])).eval()


def _save_hub_models(root: Path) -> None:
    """The Hub ids the docs name, as local folders of tiny random models with the same architectures."""
    torch.manual_seed(0)
    _tiny_dinov3().save_pretrained(root / DINOV3)
    torch.manual_seed(1)
    _tiny_depth_anything().save_pretrained(root / DEPTH_ANYTHING)
    (root / DEPTH_ANYTHING / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "DPTImageProcessor", "image_mean": [0.485, 0.456, 0.406],
         "image_std": [0.229, 0.224, 0.225]}))


def _fake_upload(monkeypatch, root: Path) -> None:
    """push_to_hub's network calls write the uploaded files into the folder named by the repo id."""
    fake_hub_upload(monkeypatch, lambda repo_id: root / repo_id)


def _synthetic_scene(name: str, bands, wavelengths, height: int, width: int, seed: int):
    from spectralmoe_peft.dgss import IGNORE_INDEX, Scene

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, (height, width)).astype(np.uint8)
    valid = np.ones((height, width), bool)
    valid[:, :5] = False  # a nodata edge
    labels[~valid] = IGNORE_INDEX
    image = (rng.random((len(bands), height, width)) * 255 * valid).astype(np.float32)
    return Scene(name, image, labels, valid, tuple(bands), tuple(wavelengths), 10.0, "EPSG:32633",
                 (10.0, 0.0, 500000.0, 0.0, -10.0, 5800000.0))


def _shorten(monkeypatch) -> None:
    """The scenes are small synthetic ones, training takes 2 steps of batch 2, datasets hold at most 4 crops."""
    import spectralmoe_peft.dgss as dgss
    import spectralmoe_peft.dgss.scenes as scenes
    import spectralmoe_peft.dgss.tiles as tiles
    import spectralmoe_peft.dgss.train as train
    import spectralmoe_peft.dgss.trainer as trainer

    landsat = _synthetic_scene("landsat7_nc", scenes.LANDSAT7_BANDS, scenes.LANDSAT7_WAVELENGTHS_NM, 72, 80, 0)
    sentinel = _synthetic_scene("sentinel2_brandenburg", scenes.SENTINEL2_BANDS, scenes.SENTINEL2_WAVELENGTHS_NM,
                                64, 96, 1)
    @dataclasses.dataclass
    class ShortTrainConfig(train.TrainConfig):  # the real one, other defaults; explicit arguments win
        steps: int = 2
        batch_size: int = 2
        log_every: int = 1

    real_arguments = trainer.paper_training_arguments

    def short_arguments(output_dir, **overrides):
        return real_arguments(output_dir, **{**overrides, "max_steps": 2, "per_device_train_batch_size": 2,
                                             "per_device_eval_batch_size": 2, "logging_steps": 1})

    real_crops = tiles.RandomCrops

    class FewCrops(real_crops):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.length = min(self.length, 4)

    for module in (dgss, scenes):
        monkeypatch.setattr(module, "load_landsat7_nc", lambda: landsat)
        monkeypatch.setattr(module, "load_sentinel2_brandenburg", lambda: sentinel)
    for module in (dgss, train):
        monkeypatch.setattr(module, "TrainConfig", ShortTrainConfig)
    for module in (dgss, tiles):
        monkeypatch.setattr(module, "RandomCrops", FewCrops)
    monkeypatch.setattr(trainer, "paper_training_arguments", short_arguments)


# what the prose around the snippets says the reader already has, per file


def _adapted_dinov3():
    from peft import get_peft_model

    from spectralmoe_peft import SpectralMoEConfig

    model = get_peft_model(tf.AutoModel.from_pretrained(DINOV3), SpectralMoEConfig())
    model.set_depth_model(tf.AutoModelForDepthEstimation.from_pretrained(DEPTH_ANYTHING))
    return model


def _segmentation_model():
    from peft import get_peft_model

    from spectralmoe_peft import SpectralMoEConfig
    from spectralmoe_peft.dgss import build_depth_model, build_upernet

    base, to_save = build_upernet(6, 6, image_size=32)
    model = get_peft_model(base, SpectralMoEConfig(modules_to_save=to_save, rgb_band_indices=[2, 1, 0]))
    model.set_depth_model(build_depth_model()[0])
    return model


def _full_scale() -> dict:
    from spectralmoe_peft.dgss import RandomCrops, load_landsat7_nc

    return {"model": _segmentation_model(), "train": RandomCrops(load_landsat7_nc(), size=32, length=4, seed=0)}


def _common() -> dict:
    torch.manual_seed(0)
    return {
        "backbone": tf.AutoModel.from_pretrained(DINOV3),
        "vit": tf.AutoModel.from_pretrained(DINOV3),
        "vit_or_segmentation_model": tf.AutoModel.from_pretrained(DINOV3),
        "base": tf.AutoModel.from_pretrained(DINOV3),
        "depth_model": tf.AutoModelForDepthEstimation.from_pretrained(DEPTH_ANYTHING),
        "x": torch.rand(2, 3, 32, 32),
        "task_loss": lambda out: out.last_hidden_state.square().mean(),
    }


GIVEN: dict[str, Callable[[], dict]] = {
    "README.md": _common,
    "api.md": _common,
    "sharing.md": lambda: {**_common(), "model": _adapted_dinov3()},
    "spectral_inputs.md": _common,
    "full_scale.md": _full_scale,
}


@pytest.fixture
def world(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("SPECTRALMOE_PEFT_CACHE", str(tmp_path / "cache"))  # nothing fetched: the scenes are faked
    _save_hub_models(tmp_path)
    _fake_upload(monkeypatch, tmp_path)
    _shorten(monkeypatch)
    return tmp_path


def run_blocks(path: Path) -> list[Block]:
    namespace = {"__name__": "__snippet__", **GIVEN.get(path.name, dict)()}
    ran = []
    for block in blocks(path):
        if block.skip is not None:
            continue
        # pad so a traceback's line numbers are the markdown file's
        code = compile("\n" * (block.line - 1) + block.code, str(path.relative_to(ROOT)), "exec")
        error = None
        try:
            exec(code, namespace)
        except Exception:
            error = traceback.format_exc()
        if error is not None:  # outside the except: the report is the block and its traceback, nothing chained
            pytest.fail(f"the block at {block.where} fails:\n{block.code}\n{error}", pytrace=False)
        ran.append(block)
    return ran


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_python_block_runs(path, world, one_thread):
    run_blocks(path)


def test_skipped_blocks_are_marked_with_a_reason(capsys):
    """Markers are explicit and counted: each names why, sits right before a python block, and the list is shown."""
    all_blocks = [block for path in DOCS for block in blocks(path)]
    skipped = [block for block in all_blocks if block.skip is not None]
    for path in DOCS:
        markers = len(MARKER.findall(path.read_text()))
        assert markers == sum(block.path == path for block in skipped), (
            f"{path.name}: a <!-- snippet: ... --> marker that is not right before a ```python fence")
    with capsys.disabled():
        print(f"\n{len(all_blocks)} python blocks in {len(DOCS)} files, {len(skipped)} skipped:")
        for block in skipped:
            print(f"  {block.where}: {block.skip}")
    assert len(all_blocks) - len(skipped) >= 10  # the docs' snippets are run, not marked away


def test_no_block_hides_from_the_runner():
    """Python written as an interactive session (```pycon, >>> prompts) would not be run: write it as ```python."""
    for path in DOCS:
        for match in FENCE.finditer(path.read_text()):
            lang = match.group("lang").strip().lower()
            assert lang not in PROMPTS and not match.group("body").lstrip().startswith(">>>"), (
                f"{path.name}: a ```{lang} block with prompts is never run; write it as ```python")


ADDS_AUX_LOSS = re.compile(r"\+\s*[\w.]*get_aux_loss\(\)|get_aux_loss\(\)\s*\+")


def test_no_snippet_adds_the_balance_loss_twice():
    """The balance loss is in the autograd graph by default (aux_loss_in_graph=True): a snippet that adds
    get_aux_loss() to a loss must be one that turned that off."""
    for path in DOCS:
        for block in blocks(path):
            if ADDS_AUX_LOSS.search(block.code):
                assert "aux_loss_in_graph=False" in block.code, (
                    f"{block.where} adds get_aux_loss() to a loss, but the balance loss is already in the graph")


def test_the_parser_finds_blocks_markers_and_line_numbers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```python\na = 1\n```\n\n<!-- snippet: skip (needs a GPU) -->\n```python\nb = 2\n```\n"
                    "```bash\nls\n```\n")
    found = blocks(page)
    assert [(b.line, b.code, b.skip) for b in found] == [(4, "a = 1\n", None), (9, "b = 2\n", "needs a GPU")]
    page.write_text("- item\n\n  <!-- snippet: skip (needs torchrun (2 processes)) -->\n"
                    "  ```python\n  if True:\n      d = 4\n  ```\n")
    assert [(b.line, b.code, b.skip) for b in blocks(page)] == [
        (5, "if True:\n    d = 4\n", "needs torchrun (2 processes)")]
    page.write_text("<!-- snippet: skip () -->\n```python\nc = 3\n```\n")
    with pytest.raises(AssertionError, match="unknown snippet marker"):
        blocks(page)


# ------------------------------------------------------------------- README's claims beside its "Use" snippet


def _adapted_and_saved(path: Path):
    from peft import get_peft_model

    from spectralmoe_peft import SpectralMoEConfig
    from tiny_models import make_depth_model, make_model

    backbone = make_model("dinov3")
    model = get_peft_model(backbone, SpectralMoEConfig(init_weights=False)).eval()
    model.set_depth_model(make_depth_model())
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
    model.save_pretrained(path)
    return backbone, model, x, expected


def test_reloading_onto_the_wrapped_backbone_raises_and_leaves_the_model_usable(tmp_path):
    """README: `get_peft_model` wrapped `backbone` in place; `PeftModel.from_pretrained(backbone, ...)` stops with a
    ValueError that says to build a fresh base model."""
    from peft import PeftModel

    backbone, model, x, expected = _adapted_and_saved(tmp_path / "out")
    with pytest.raises(ValueError, match="build a fresh base model"):
        PeftModel.from_pretrained(backbone, tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).last_hidden_state, expected)
    assert len(model.peft_config) == 1


def test_a_reloaded_adapter_needs_its_depth_model_again(tmp_path):
    """README: the reloaded adapter fails until `set_depth_model` is called again; then its outputs are identical."""
    from peft import PeftModel

    from tiny_models import make_depth_model, make_model

    _, _, x, expected = _adapted_and_saved(tmp_path / "out")
    reloaded = PeftModel.from_pretrained(make_model("dinov3"), tmp_path / "out").eval()
    with pytest.raises(ValueError, match="set_depth_model"):
        reloaded(pixel_values=x)
    reloaded.set_depth_model(make_depth_model())
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=x).last_hidden_state, expected)


def test_depth_pixel_values_need_an_attached_depth_model():
    """README, spectral_inputs.md: `depth_pixel_values=` run through the attached depth model, so without one the
    forward stops with a ValueError that says to attach one; the model still runs with depth_hidden_states=."""
    from peft import get_peft_model

    from spectralmoe_peft import SpectralMoEConfig
    from tiny_models import make_depth_model, make_model

    model = get_peft_model(make_model("dinov3"), SpectralMoEConfig(init_weights=False, depth_hidden_size=48)).eval()
    x = torch.rand(2, 3, 32, 48)
    with pytest.raises(ValueError, match=r"depth_pixel_values=.*no depth model.*set_depth_model"):
        model(pixel_values=x, depth_pixel_values=torch.rand(2, 3, 28, 28))
    depth = make_depth_model()
    with torch.no_grad():
        tokens = depth(pixel_values=torch.rand(2, 3, 28, 28), output_hidden_states=True).hidden_states
        grids = tuple(t[:, 1:].transpose(1, 2).reshape(2, 48, 4, 4) for t in tokens)  # CLS dropped, 4x4 patches
        assert model(pixel_values=x, depth_hidden_states=grids).last_hidden_state.shape == (2, 3 + 24, 32)


# --------------------------------------------------------------------- api.md's config table is the config


def _api_table() -> dict[str, str]:
    """field -> default cell of docs/api.md's `SpectralMoEConfig` table (rows naming two fields share one cell)."""
    table = {}
    for match in re.finditer(r"^\| (`[^|]+`) \| ([^|]+) \|", (ROOT / "docs" / "api.md").read_text(), re.M):
        fields = re.findall(r"`(\w+)`", match.group(1))
        cells = match.group(2).split(",") if len(fields) > 1 else [match.group(2)]
        cells = [cell.strip().strip("`") for cell in cells]
        for name, cell in zip(fields, cells if len(cells) == len(fields) else cells * len(fields)):
            table[name] = cell
    return table


def test_api_md_documents_every_config_field_with_its_default():
    import ast

    from peft import PeftConfig

    from spectralmoe_peft import SpectralMoEConfig

    own = {f.name for f in dataclasses.fields(SpectralMoEConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    table, config = _api_table(), SpectralMoEConfig()
    assert own <= set(table), f"undocumented in api.md: {sorted(own - set(table))}"
    imagenet = {"depth_image_mean": [0.485, 0.456, 0.406], "depth_image_std": [0.229, 0.224, 0.225]}
    for name in sorted(own):
        documented = imagenet[name] if table[name] == "ImageNet" else ast.literal_eval(table[name])
        assert getattr(config, name) == documented, f"api.md: {name} defaults to {table[name]}"
