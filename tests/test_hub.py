"""Model cards and push_to_hub, without network: the folder that would be uploaded is captured and loaded back."""

from __future__ import annotations

import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model

import spectralmoe_peft
from spectralmoe_peft import SpectralMoEConfig
from hub_fakes import fake_hub_upload
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
    uploaded = tmp_path / "uploaded"
    fake_hub_upload(monkeypatch, lambda repo_id: uploaded)  # stands in for the network: keep what would be sent
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


# --- the card's load recipes, executed as written --------------------------------------------------------------------
# The Hub is stood in for by a local Hub cache in offline mode: models published there under Hub ids load with
# from_pretrained("org/name") exactly as downloaded ones would, so the card's code runs unchanged (only the
# adapter's own repo id is filled in, as push_to_hub does).

COMMIT = "0" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def publish(cache, repo_id, model=None, folder=None):
    """Put a model (or a folder) into the local Hub cache under ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    if folder is not None:
        shutil.copytree(folder, snapshot)
    else:
        model.save_pretrained(snapshot)
    return snapshot


def recipes(card_text):
    """The python blocks of the SpectralMoE section."""
    import re

    section = card_text[card_text.index("spectralmoe-peft:start"): card_text.index("spectralmoe-peft:end")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run_recipe(code, repo):
    namespace = {}
    exec(compile(code.replace("<this repo or folder>", str(repo)), "<model card>", "exec"), namespace)
    return namespace["model"]


def perturb_trainable(model):
    """Move every trainable tensor (adapters, modules_to_save) away from where it started, as training would."""
    torch.manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)


def test_card_recipes_run_as_written_and_reproduce_the_trained_model(hub_cache, tmp_path):
    """A bare backbone, an *ForImageClassification (the `vit.` prefix), a segmentation UperNet (decode head saved),
    a base widened to 6 bands by wavelength, and depth models given by Hub id (attached as an object or by name):
    every recipe of each card (AutoPeftModel first) loads a model whose outputs equal the trained one's."""
    import transformers as tf
    from tiny_models import main_output

    from spectralmoe_peft.bands import widen_patch_embedding

    publish(hub_cache, "tiny-org/depth", make_depth_model())
    cases = {
        "backbone": ("dinov2", tf.Dinov2Model, {}),
        "classifier": ("vit_classifier", tf.ViTForImageClassification, {}),
        "upernet": ("upernet_dinov2", tf.UperNetForSemanticSegmentation, {"modules_to_save": ["decode_head"]}),
        "widened": ("dinov2", tf.Dinov2Model, {"band_wavelengths_nm": [490, 560, 665, 842, 1610, 2190]}),
    }
    for case, (family, cls, overrides) in cases.items():
        publish(hub_cache, f"tiny-org/{case}", make_model(family))
        base = cls.from_pretrained(f"tiny-org/{case}")
        bands = 3
        if case == "widened":
            path = widen_patch_embedding(base, band_wavelengths_nm=overrides["band_wavelengths_nm"])
            overrides = {**overrides, "modules_to_save": [path]}
            bands = 6
        config = SpectralMoEConfig(num_experts=3, expert_rank=4, num_tokens=5, init_weights=False, **overrides)
        model = get_peft_model(base, config)
        if case == "classifier":  # an object loaded from the Hub: its id is recorded
            model.set_depth_model(tf.Dinov2Model.from_pretrained("tiny-org/depth"))
        else:  # by name
            model.set_depth_model("tiny-org/depth")
        perturb_trainable(model)
        model.eval()
        x = torch.rand(2, bands, 32, 32)
        with torch.no_grad():
            expected = main_output(model(pixel_values=x))
        folder = tmp_path / f"adapter-{case}"
        model.save_pretrained(folder)
        text = (folder / "README.md").read_text()
        saved = (folder / "adapter_config.json").read_text()
        assert str(tmp_path) not in text and str(tmp_path) not in saved, case
        codes = recipes(text)
        assert len(codes) == 2 and "AutoPeftModel.from_pretrained" in codes[0], case
        assert f'{cls.__name__}.from_pretrained("tiny-org/{case}")' in codes[1], case
        assert "<Hub id" not in text, case  # everything known: no placeholder left
        for code in codes:
            loaded = run_recipe(code, folder)
            assert isinstance(loaded.get_base_model(), cls), case
            assert loaded.base_model.depth_model is None  # loaded on the first forward, by the config's Hub id
            with torch.no_grad():
                out = main_output(loaded(pixel_values=x))
            assert loaded.base_model.depth_model.config._name_or_path == "tiny-org/depth"
            assert torch.equal(out, expected), (case, code)
        if case == "widened":
            assert "from 3 to 6 input bands" in text and "490 nm" in text


def test_push_fills_in_the_repo_id_and_the_pushed_card_runs_from_the_hub(hub_cache, tmp_path, monkeypatch):
    import transformers as tf
    uploaded = tmp_path / "uploaded"
    fake_hub_upload(monkeypatch, lambda repo_id: uploaded)
    publish(hub_cache, "tiny-org/vit", make_model("vit_classifier"))
    model = get_peft_model(tf.ViTForImageClassification.from_pretrained("tiny-org/vit"),
                           SpectralMoEConfig(num_experts=3, expert_rank=4, num_tokens=5, init_weights=False,
                                             use_depth=False)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    model.push_to_hub("me/vit-spectralmoe")
    text = (uploaded / "README.md").read_text()
    assert "<this repo or folder>" not in text and 'from_pretrained("me/vit-spectralmoe")' in text
    assert ModelCard.load(uploaded / "README.md").data.base_model == "tiny-org/vit"
    publish(hub_cache, "me/vit-spectralmoe", folder=uploaded)
    for code in recipes(text):
        namespace = {}
        exec(code, namespace)  # as written: nothing substituted
        with torch.no_grad():
            assert torch.equal(namespace["model"](pixel_values=x).logits, expected)


def test_no_local_path_reaches_the_card_or_the_config(tmp_path):
    """A base and a depth model loaded from local folders: the card and adapter_config.json name neither folder;
    the card has placeholders and says what to put there; the config in memory keeps the paths."""
    import json

    import transformers as tf

    make_model("dinov2").save_pretrained(tmp_path / "base")
    make_depth_model().save_pretrained(tmp_path / "depth")
    model = get_peft_model(tf.Dinov2Model.from_pretrained(str(tmp_path / "base")),
                           SpectralMoEConfig(num_experts=3, expert_rank=4, num_tokens=5))
    model.set_depth_model(str(tmp_path / "depth"))
    model.save_pretrained(tmp_path / "adapter")
    text = (tmp_path / "adapter" / "README.md").read_text()
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert str(tmp_path) not in text and str(tmp_path) not in json.dumps(saved)
    assert saved["base_model_name_or_path"] is None and saved["depth_model_name_or_path"] is None
    assert "AutoPeftModel" not in text  # it would need the base model's Hub id
    assert 'Dinov2Model.from_pretrained("<Hub id of the base model>")' in text
    assert 'model.set_depth_model("<Hub id of the depth model>")' in text
    assert "loaded from a local folder: replace `<Hub id of the base model>`" in text
    assert "base_model" not in ModelCard.load(tmp_path / "adapter" / "README.md").data.to_dict()
    assert model.peft_config["default"].depth_model_name_or_path == str(tmp_path / "depth")


@pytest.mark.parametrize("name, expected", [
    ("org/model", "org/model"), ("gpt2", "gpt2"), (None, None), ("", None), ("/tmp/x/model", None),
    ("./model", None), ("~/models/x", None), ("a/b/c", None), ("C:\\models\\x", None),
    ("/home/u/.cache/huggingface/hub/models--depth-anything--Depth-Anything-V2-Small-hf/snapshots/abc",
     "depth-anything/Depth-Anything-V2-Small-hf"),
    ("depth", None), ("org/mirrored", "org/mirrored"),  # existing relative folders (made below)
])
def test_shareable_name(name, expected, tmp_path, monkeypatch):
    from spectralmoe_peft.hub import shareable_name

    monkeypatch.chdir(tmp_path)
    (tmp_path / "depth").mkdir()
    (tmp_path / "org" / "mirrored").mkdir(parents=True)
    assert shareable_name(name) == expected


def test_a_upernet_built_by_dgss_gets_the_build_call_and_it_reproduces_the_model(hub_cache, tmp_path):
    """dgss.build_upernet builds the UperNet from a Hub backbone (the UperNet itself has no Hub id): the card's
    recipe rebuilds it with build_upernet, and the adapter widens the backbone to 6 bands again on load."""
    from spectralmoe_peft.dgss import build_upernet

    publish(hub_cache, "tiny-org/dinov2", make_model("dinov2"))
    base, to_save = build_upernet(num_bands=6, num_classes=3, backbone="tiny-org/dinov2", head_hidden_size=16)
    model = get_peft_model(base, SpectralMoEConfig(num_experts=3, expert_rank=4, num_tokens=5, use_depth=False,
                                                   init_weights=False, rgb_band_indices=[2, 1, 0],
                                                   modules_to_save=to_save))
    perturb_trainable(model)
    model.eval()
    x = torch.rand(2, 6, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    model.save_pretrained(tmp_path / "adapter")
    text = (tmp_path / "adapter" / "README.md").read_text()
    (code,) = recipes(text)  # no Hub id of its own: no AutoPeftModel
    assert "build_upernet(num_bands=3, num_classes=3, backbone='tiny-org/dinov2', head_hidden_size=16" in code
    assert "from 3 to 6 input bands" in text and "<Hub id" not in text
    with torch.no_grad():
        assert torch.equal(run_recipe(code, tmp_path / "adapter")(pixel_values=x).logits, expected)

    # the same from a local copy of the backbone: a placeholder and a note, no path
    local = tmp_path / "local-backbone"
    make_model("dinov2").save_pretrained(local)
    base, to_save = build_upernet(num_bands=6, num_classes=3, backbone=str(local), head_hidden_size=16)
    model = get_peft_model(base, SpectralMoEConfig(use_depth=False, modules_to_save=to_save))
    model.save_pretrained(tmp_path / "local-adapter")
    text = (tmp_path / "local-adapter" / "README.md").read_text()
    assert str(tmp_path) not in text and "backbone='<Hub id of the backbone>'" in text
    assert "the backbone was loaded from a local folder: replace `<Hub id of the backbone>`" in text


def test_models_named_on_the_card_make_autopeftmodel_work(hub_cache, tmp_path):
    """Trained on a local copy of a Hub model, with a depth model attached as an object without a name:
    set_model_card_info(base_model=..., depth_model=...) names them in the card and in the config, so AutoPeftModel
    loads both from the Hub."""
    import transformers as tf

    snapshot = publish(hub_cache, "tiny-org/vit", make_model("vit"))
    shutil.copytree(snapshot, tmp_path / "local-copy")
    model = get_peft_model(tf.ViTModel.from_pretrained(str(tmp_path / "local-copy")),
                           SpectralMoEConfig(num_experts=3, expert_rank=4, num_tokens=5, init_weights=False)).eval()
    model.set_depth_model(make_depth_model())  # built from a config: no name
    publish(hub_cache, "tiny-org/depth", make_depth_model())  # the same weights, on the Hub
    spectralmoe_peft.set_model_card_info(model, base_model="tiny-org/vit", depth_model="tiny-org/depth")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
    model.save_pretrained(tmp_path / "adapter")
    text = (tmp_path / "adapter" / "README.md").read_text()
    assert str(tmp_path) not in text and "AutoPeftModel" in recipes(text)[0]
    for code in recipes(text):
        loaded = run_recipe(code, tmp_path / "adapter")
        with torch.no_grad():
            assert torch.equal(loaded(pixel_values=x).last_hidden_state, expected)
        assert loaded.base_model.depth_model.config._name_or_path == "tiny-org/depth"
