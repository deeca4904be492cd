"""Model cards and push_to_hub, without network: the folder that would be uploaded is captured and loaded back."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from peft import PeftModel, get_peft_model

import spectralmoe_peft
from spectralmoe_peft import SpectralMoEConfig
from tiny_models import make_depth_model, make_model

BASE = "facebook/dinov3-vits16-pretrain-lvd1689m"


def adapted(**overrides):
    config = SpectralMoEConfig(**{"num_experts": 3, "expert_rank": 4, "num_tokens": 5, "init_weights": False,
                                  "depth_hidden_size": 48, "rgb_band_indices": [2, 1, 0], **overrides})
    model = get_peft_model(make_model("dinov2", num_channels=6), config).eval()
    if config.use_depth:
        model.set_depth_model(make_depth_model())
    return model


def describe(model):
    spectralmoe_peft.set_model_card_info(
        model, base_model=BASE, depth_model="depth-anything/Depth-Anything-V2-Small-hf",
        bands=["B02", "B03", "B04", "B08", "B11", "B12"], wavelengths_nm=[490, 560, 665, 842, 1610, 2190],
        classes=["water", "forest"], metrics={"target mIoU": 0.4321}, datasets=["Landsat-7 NC -> Sentinel-2"],
    )


def test_card_says_how_to_load_and_what_was_trained(tmp_path):
    model = adapted()
    describe(model)
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # a second save replaces the section rather than adding another
    card = ModelCard.load(tmp_path / "README.md")
    text = card.text
    assert text.count("spectralmoe-peft:start") == 1
    assert "import spectralmoe_peft" in text and "PeftModel.from_pretrained" in text
    assert text.index("import spectralmoe_peft") < text.index("PeftModel.from_pretrained")
    for fact in (BASE, "Depth-Anything-V2-Small-hf", "B11 (1610 nm)", "water, forest", "0.4321", "top-1",
                 "band indices [2, 1, 0]", "- PEFT "):
        assert fact in text, fact
    assert "[More Information Needed]" not in text
    assert card.data.base_model == BASE and card.data.library_name == "peft"
    assert "spectralmoe" in card.data.tags and f"base_model:adapter:{BASE}" in card.data.tags


def test_visual_only_card_has_no_depth_call(tmp_path):
    model = adapted(use_depth=False)
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "visual-only" in text and "set_depth_model" not in text


def test_set_model_card_info_checks_bands(tmp_path):
    with pytest.raises(ValueError, match="2 band names but 3 wavelengths"):
        spectralmoe_peft.set_model_card_info(adapted(use_depth=False), bands=["a", "b"], wavelengths_nm=[1, 2, 3])


def test_push_to_hub_uploads_a_folder_that_loads_back_with_its_card(tmp_path, monkeypatch):
    import transformers.utils.hub as hub

    uploaded = tmp_path / "uploaded"

    def create_commit(repo_id, operations, **kwargs):  # stands in for the network: keep what would be sent
        for operation in operations:
            target = uploaded / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(operation.path_or_fileobj, target)
        return SimpleNamespace(commit_url="offline")

    fake_api = SimpleNamespace(create_repo=lambda repo_id, **kw: SimpleNamespace(repo_id=repo_id),
                               create_commit=create_commit)
    monkeypatch.setattr(hub, "hf_api", lambda: fake_api)
    # a new repo: transformers then writes its template card over the saved one
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda repo_id, tags=None, token=None:
                        ModelCard.from_template(ModelCardData(tags=tags or [], library_name="transformers")))
    model = adapted()
    describe(model)
    x = torch.rand(2, 6, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
    model.push_to_hub("me/dinov3-spectralmoe")

    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= {p.name for p in uploaded.iterdir()}
    card = (uploaded / "README.md").read_text()
    assert "import spectralmoe_peft" in card and BASE in card and "0.4321" in card
    loaded = PeftModel.from_pretrained(make_model("dinov2", num_channels=6), uploaded).eval()
    loaded.set_depth_model(make_depth_model())
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).last_hidden_state, expected)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"classes": [0, 1, 2]}, "classes"),
        ({"classes": "water"}, "classes"),
        ({"bands": "RGB"}, "bands"),
        ({"bands": ["B02", 3]}, "bands"),
        ({"wavelengths_nm": [490, "560"]}, "wavelengths_nm"),
        ({"wavelengths_nm": [490, float("nan")]}, "wavelengths_nm"),
        ({"metrics": {"mIoU": torch.tensor(0.5)}}, "metrics"),
        ({"metrics": [0.5]}, "metrics"),
        ({"datasets": "Sentinel-2"}, "datasets"),
        ({"base_model": 3}, "base_model"),
        ({"notes": ["a"]}, "notes"),
    ],
)
def test_set_model_card_info_refuses_what_the_card_cannot_show_and_keeps_what_was_set(kwargs, argument):
    model = adapted(use_depth=False)
    spectralmoe_peft.set_model_card_info(model, classes=["water", "forest"])
    with pytest.raises(TypeError, match=rf"set_model_card_info\({argument}=\.\.\.\): must"):
        spectralmoe_peft.set_model_card_info(model, **kwargs)
    assert model.base_model.model_card_info == {"classes": ["water", "forest"]}


def test_set_model_card_info_wants_the_peft_model():
    with pytest.raises(TypeError, match="expects the PeftModel"):
        spectralmoe_peft.set_model_card_info(make_model(), classes=["water"])


def test_numbered_classes_pass_as_text(tmp_path):
    model = adapted(use_depth=False)
    spectralmoe_peft.set_model_card_info(model, classes=[str(c) for c in range(3)], metrics={"epochs": 40})
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "- Classes (3): 0, 1, 2" in text and "| epochs | 40 |" in text


def test_a_card_problem_never_costs_the_weights(tmp_path, monkeypatch):
    """peft writes the card before the weights: a failing SpectralMoE section is a warning, the weights are saved."""
    model = adapted(use_depth=False)
    object.__setattr__(model.base_model, "model_card_info", {"classes": [0, 1, 2]})  # past the checks
    x = torch.rand(2, 6, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
    with pytest.warns(RuntimeWarning, match="could not write its section of the model card.*weights and config are "
                                            "saved regardless"):
        model.save_pretrained(tmp_path)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in tmp_path.iterdir()}
    loaded = PeftModel.from_pretrained(make_model("dinov2", num_channels=6), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).last_hidden_state, expected)

    import spectralmoe_peft.hub as hub

    monkeypatch.setattr(hub, "model_card_section", lambda *a, **k: 1 / 0)  # any failure, not only bad info
    with pytest.warns(RuntimeWarning, match="ZeroDivisionError"):
        model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "adapter_model.safetensors").exists()


def test_a_depth_model_named_by_the_config_is_loaded_on_the_first_forward_and_its_normalization_wins(tmp_path):
    """docs/sharing.md: the config's depth_model_name_or_path chooses the model that runs, and its preprocessor's
    mean/std replace the config's; an attached depth model is used as is, and nothing is loaded."""
    import json

    depth_dir = tmp_path / "depth"
    make_depth_model().save_pretrained(depth_dir)
    (depth_dir / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                    "image_std": [0.6, 0.5, 0.4]}))
    config = SpectralMoEConfig(num_experts=3, expert_rank=4, num_tokens=5, depth_hidden_size=48,
                               depth_model_name_or_path=str(depth_dir))
    model = get_peft_model(make_model(), config).eval()
    assert model.base_model.depth_model is None
    with torch.no_grad():
        model(pixel_values=torch.rand(1, 3, 32, 32))
    assert model.base_model.depth_model is not None
    assert (config.depth_image_mean, config.depth_image_std) == ([0.1, 0.2, 0.3], [0.6, 0.5, 0.4])

    config = SpectralMoEConfig(num_experts=3, expert_rank=4, num_tokens=5, depth_hidden_size=48,
                               depth_model_name_or_path=str(tmp_path / "not-there"))
    model = get_peft_model(make_model(), config).eval()
    attached = make_depth_model()
    model.set_depth_model(attached)
    with torch.no_grad():
        model(pixel_values=torch.rand(1, 3, 32, 32))  # would raise if it tried to load "not-there"
    assert model.base_model.depth_model is attached and config.depth_image_mean == [0.485, 0.456, 0.406]


def test_a_depth_model_that_needs_its_own_code_is_refused_and_its_code_never_runs(tmp_path):
    """trust_remote_code stays off: a config naming a repository with custom code cannot make that code run (with
    trust_remote_code=True, transformers would import evil.py and write the marker)."""
    import json

    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "code-ran"
    (evil / "config.json").write_text(json.dumps({
        "model_type": "evil-depth", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                                                  "AutoModelForDepthEstimation": "evil.EvilModel"}}))
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = SpectralMoEConfig(num_experts=3, expert_rank=4, num_tokens=5, depth_model_name_or_path=str(evil))
    model = get_peft_model(make_model(), config).eval()
    with pytest.raises(ValueError, match="trust_remote_code"):
        with torch.no_grad():
            model(pixel_values=torch.rand(1, 3, 32, 32))
    assert not marker.exists()
