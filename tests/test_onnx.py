"""ONNX export (modeling.onnx_export, `cxr-export --onnx`) and the onnxruntime backend of the Predictor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from synthetic import xray_like
from tiny_models import save_tiny_classifier

pytest.importorskip("onnxruntime")

from modeling.onnx_export import HeadDecomposition, export_onnx, run_session, session  # noqa: E402
from modeling.predict import Predictor  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model_dir = save_tiny_classifier(tmp_path_factory.mktemp("onnx") / "m", image_size=28)
    summary = export_onnx(model_dir, check_images=[xray_like(i, (60, 50)) for i in range(6)],
                          variants=("float32", "int8", "float16"))
    return model_dir, summary


def test_the_variants_agree_with_torch_and_land_in_the_transformers_js_layout(exported):
    model_dir, summary = exported
    onnx_dir = model_dir / "onnx"
    assert {p.name for p in onnx_dir.iterdir()} == {"model.onnx", "model_quantized.onnx", "model_fp16.onnx",
                                                   "browser.json"}
    agree = summary["agreement"]
    assert agree["float32"]["max_abs_probability_diff"] <= 1e-4 and agree["float32"]["within_tolerance"]
    assert agree["int8"]["bytes"] < agree["float32"]["bytes"] / 2  # the smaller variant is smaller
    assert agree["float32"]["patch_contributions_sum_error"] < 1e-5
    cfg = json.loads((onnx_dir / "browser.json").read_text())
    assert cfg["labels"] == ["normal", "bacterial_pneumonia", "viral_pneumonia"]
    assert cfg["threshold"] == pytest.approx(0.4) and cfg["input"]["height"] == 28
    assert cfg["default_variant"] == "int8" and cfg["variants"]["int8"]["shipped"]


def test_a_variant_outside_its_tolerance_is_not_shipped(tmp_path, monkeypatch):
    import modeling.onnx_export as ox

    model_dir = save_tiny_classifier(tmp_path / "m", image_size=28)
    monkeypatch.setitem(ox.TOLERANCES, "int8", (0.0, 0.0))  # nothing quantized is exact
    summary = export_onnx(model_dir, check_images=[xray_like(i, (60, 50)) for i in range(4)])
    assert not summary["agreement"]["int8"]["within_tolerance"]
    assert not (model_dir / "onnx" / "model_quantized.onnx").exists() and (model_dir / "onnx" / "model.onnx").exists()
    assert json.loads((model_dir / "onnx" / "browser.json").read_text())["default_variant"] == "float32"


def test_patch_contributions_split_the_heads_patch_term_exactly(exported):
    """The browser heatmap's meaning: per class, the patch contributions add up to the logit minus
    the CLS term and the bias (the head is linear in [CLS, mean patch])."""
    from transformers import AutoModelForImageClassification

    model_dir, _ = exported
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    pv = torch.randn(3, 3, 28, 28)
    with torch.inference_mode():
        logits, feats, contrib = HeadDecomposition(model)(pv)
        torch.testing.assert_close(logits, model(pixel_values=pv).logits)
        d = feats.shape[1] // 2
        w, b = model.classifier.weight, model.classifier.bias
        cls_term = feats[:, :d] @ w[:, :d].T
        torch.testing.assert_close(contrib.sum((2, 3)), logits - cls_term - b, atol=1e-5, rtol=1e-4)
    side = 28 // model.config.patch_size
    assert contrib.shape == (3, 3, side, side)  # one value per patch and class
    got = run_session(session(model_dir / "onnx" / "model.onnx"), pv.numpy())
    np.testing.assert_allclose(got["patch_contributions"], contrib.numpy(), atol=1e-5)


def test_the_onnx_backend_predicts_like_torch_with_the_same_gate_and_scope_features(exported, monkeypatch):
    model_dir, _ = exported
    films = [xray_like(10 + i, (64, 56)) for i in range(4)]
    ref = Predictor.from_pretrained(str(model_dir)).predict(films)
    fast = Predictor.from_pretrained(str(model_dir), backend="onnx")
    calls = []
    real_run = fast._onnx.run
    monkeypatch.setattr(fast, "_onnx", type("S", (), {"run": lambda self, *a: calls.append(1) or real_run(*a)})())
    got = fast.predict(films)
    assert fast.backend == "onnx" and calls  # the session answered, not the torch model
    for a, b in zip(ref, got):
        assert b.probabilities == pytest.approx(a.probabilities, abs=1e-5) and b.label == a.label
    heat = fast.predict_one(films[0], heatmap=True)  # Grad-CAM keeps the torch model
    assert heat.heatmap.shape == (56, 64)
    with pytest.raises(ValueError, match="backend"):
        Predictor.from_pretrained(str(model_dir), backend="tensorrt")


def test_the_onnx_backend_says_how_to_export_when_there_is_no_graph(tmp_path):
    model_dir = save_tiny_classifier(tmp_path / "m", image_size=28)
    with pytest.raises(FileNotFoundError, match="cxr-export"):
        Predictor.from_pretrained(str(model_dir), backend="onnx")


def test_cxr_export_onnx_checks_on_a_folder_and_writes_its_report(tmp_path):
    from modeling.cli import export_main

    model_dir = save_tiny_classifier(tmp_path / "m", image_size=28)
    films = tmp_path / "films"
    films.mkdir()
    for i in range(3):
        xray_like(i, (70, 70)).save(films / f"{i}.png")
    report = tmp_path / "agreement.json"
    assert export_main(["--model", str(model_dir), "--onnx", "--check-images", str(films), "--report", str(report)]) == 0
    got = json.loads(report.read_text())
    assert got["agreement"]["float32"]["n"] == 3 and "--onnx" in got["command"]
    assert (model_dir / "onnx" / "model_quantized.onnx").exists()


def test_auto_backend_keeps_the_faster_path_and_frees_the_other(exported, monkeypatch):
    import time as _time

    model_dir, _ = exported
    film = xray_like(30, (64, 56))
    p = Predictor.from_pretrained(str(model_dir), backend="auto", precision="bfloat16")
    assert p.backend == "auto" and p._onnx is not None and p._fast is not None
    real_run = p._onnx.run
    slow = type("S", (), {"run": lambda self, *a: (_time.sleep(0.05), real_run(*a))[1]})()
    monkeypatch.setattr(p, "_onnx", slow)  # make onnxruntime the slow one here
    times = p.choose_backend(film, repeats=2)
    assert set(times) == {"torch", "onnx"} and times["onnx"] > times["torch"]
    assert p.backend == "torch" and p._onnx is None and p._fast is not None
    assert p.predict_one(film).label is not None
    plain = Predictor.from_pretrained(str(model_dir), backend="auto")
    assert plain.choose_backend(film, repeats=1) and plain.backend in ("torch", "onnx")
    no_graph = Predictor.from_pretrained(str(save_tiny_classifier(model_dir.parent / "bare", image_size=28)),
                                         backend="auto")
    assert no_graph.backend == "torch" and no_graph.choose_backend(film) == {}


def test_the_export_never_replaces_a_model_folder_and_keeps_a_good_export_on_failure(exported, tmp_path, monkeypatch):
    import modeling.onnx_export as ox

    model_dir, _ = exported
    films = [xray_like(i, (60, 50)) for i in range(2)]
    for bad in (model_dir, model_dir.parent):
        if (bad / "config.json").exists() or bad == model_dir:
            with pytest.raises(ValueError, match="holds a model"):
                export_onnx(model_dir, check_images=films, output_dir=bad)
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        export_onnx(model_dir, check_images=films, output_dir=other)
    assert (other / "keep.txt").exists()
    before = sorted(p.name for p in (model_dir / "onnx").iterdir())
    monkeypatch.setitem(ox.TOLERANCES, "float32", (-1.0, 0.0))  # the float32 graph "disagrees"
    with pytest.raises(RuntimeError, match="disagrees"):
        export_onnx(model_dir, check_images=films)
    assert sorted(p.name for p in (model_dir / "onnx").iterdir()) == before  # the earlier export is intact


def test_a_centre_crop_model_is_refused_with_a_reason(tmp_path):
    from modeling.preprocessing import PreprocessConfig, build_image_processor

    model_dir = save_tiny_classifier(tmp_path / "m", image_size=28)
    build_image_processor(PreprocessConfig(size=28, crop_pct=0.9)).save_pretrained(model_dir)
    with pytest.raises(ValueError, match="centre crop"):
        export_onnx(model_dir, check_images=[xray_like(0, (60, 50))])


def tiny_gate(dim: int, seed: int = 0, scale: float = 1.0):
    """An input gate with random (not fitted) numbers: enough to check that its numbers travel intact."""
    from modeling.gate import InputGate
    from modeling.probe import LinearHead

    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim))
    return InputGate(orientation=LinearHead(scale * rng.normal(size=(4, dim)), rng.normal(size=4)),
                     polarity=LinearHead(scale * rng.normal(size=(2, dim)), rng.normal(size=2)),
                     mean=rng.normal(size=dim), precision=a @ a.T / dim + np.eye(dim),
                     distance_limit=30.0, caution_limit=20.0)


def test_the_input_gate_ships_beside_the_graph_for_the_page(tmp_path):
    """The page runs the server's learned gate on the graph's features: gate.bin holds input_gate.npz's
    numbers (float32) in the layout browser.json gives, and the export counts the films whose gate
    outcome the graph's features change."""
    from modeling.gate import load_gate

    model_dir = save_tiny_classifier(tmp_path / "m", image_size=28)
    cfg = json.loads((model_dir / "config.json").read_text())
    tiny_gate(2 * cfg["hidden_size"]).save(model_dir / "input_gate.npz")
    gate = load_gate(str(model_dir))
    summary = export_onnx(model_dir, check_images=[xray_like(i, (60, 50)) for i in range(4)])
    spec = json.loads((model_dir / "onnx" / "browser.json").read_text())["gate"]
    raw = np.frombuffer((model_dir / "onnx" / spec["file"]).read_bytes(), np.float32)
    want = {"orientation_weight": gate.orientation.weight, "orientation_bias": gate.orientation.bias,
            "polarity_weight": gate.polarity.weight, "polarity_bias": gate.polarity.bias, "mean": gate.mean,
            "precision": gate.precision}
    offset = 0
    for name, shape in spec["arrays"]:
        n = int(np.prod(shape))
        np.testing.assert_array_equal(raw[offset:offset + n].reshape(shape), want.pop(name).astype(np.float32))
        offset += n
    assert offset == raw.size and not want  # every array, nothing else
    assert spec["dim"] == 2 * cfg["hidden_size"] and spec["rotations"] == [0, 90, 180, 270]
    assert (spec["distance_limit"], spec["caution_limit"], spec["confidence"]) == (30.0, 20.0, gate.confidence)
    assert summary["agreement"]["float32"]["gate_verdict_changes"] == 0


def test_a_model_without_a_gate_ships_none(exported):
    model_dir, _ = exported
    assert json.loads((model_dir / "onnx" / "browser.json").read_text())["gate"] is None
    assert not (model_dir / "onnx" / "gate.bin").exists()


@pytest.mark.slow
def test_the_export_is_pushed_to_the_hub_model_repo_and_served_from_there(hub, tmp_path):
    """`cxr-export --onnx --push-to-hub REPO` puts the export in the model repo's onnx/ folder (real
    huggingface_hub client, local Hub server), a second push replaces it (local dot-files stay home),
    the Predictor's onnxruntime backend loads it from the Hub id with the model, and a repo holding
    other weights is refused."""
    from conftest import ROOT
    from hub_server import run_python_json

    model_dir = save_tiny_classifier(tmp_path / "m", image_size=28)
    films = tmp_path / "films"
    films.mkdir()
    for i in range(3):
        xray_like(i, (70, 70)).save(films / f"{i}.png")
    server, env = hub
    got = run_python_json(f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from huggingface_hub import HfApi
from modeling.cli import export_main
from modeling.predict import Predictor
from PIL import Image
api = HfApi()
api.create_repo("test-user/cxr-tiny", repo_type="model")
api.upload_folder(repo_id="test-user/cxr-tiny", repo_type="model", folder_path={str(model_dir)!r})
api.upload_file(repo_id="test-user/cxr-tiny", path_or_fileobj=b"stale", path_in_repo="onnx/old_variant.onnx")
assert export_main(["--model", {str(model_dir)!r}, "--onnx", "--check-images", {str(films)!r},
                    "--variants", "float32", "--push-to-hub", "test-user/cxr-tiny"]) == 0
first = sorted(api.list_repo_files("test-user/cxr-tiny"))
import pathlib
pathlib.Path({str(model_dir / "onnx" / ".source.sha256")!r}).write_text("local stamp")
assert export_main(["--model", {str(model_dir)!r}, "--onnx", "--check-images", {str(films)!r},
                    "--push-to-hub", "test-user/cxr-tiny"]) == 0
files = sorted(api.list_repo_files("test-user/cxr-tiny"))
api.create_repo("test-user/other-model", repo_type="model")
api.upload_file(repo_id="test-user/other-model", path_or_fileobj=b"other weights", path_in_repo="model.safetensors")
refused = export_main(["--model", {str(model_dir)!r}, "--onnx", "--check-images", {str(films)!r},
                       "--push-to-hub", "test-user/other-model"])
other = sorted(api.list_repo_files("test-user/other-model"))
film = Image.open({str(films / "0.png")!r})
via_hub = Predictor.from_pretrained("test-user/cxr-tiny", backend="onnx").predict_one(film).probabilities
local = Predictor.from_pretrained({str(model_dir)!r}).predict_one(film).probabilities
print(json.dumps({{"first": first, "files": files, "via_hub": via_hub, "local": local, "refused": refused,
                  "other": other}}))
""", env)
    assert "onnx/old_variant.onnx" not in got["first"] and "onnx/model_quantized.onnx" not in got["first"]
    onnx_files = [f for f in got["files"] if f.startswith("onnx/")]
    assert {"onnx/model.onnx", "onnx/model_quantized.onnx", "onnx/browser.json"} <= set(onnx_files)
    assert "onnx/old_variant.onnx" not in onnx_files  # the folder is replaced, not merged
    assert not any(f.startswith("onnx/.") for f in onnx_files)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(got["files"])  # the model stays
    assert got["via_hub"] == pytest.approx(got["local"], abs=1e-5)
    assert got["refused"] == 2 and not any(f.startswith("onnx/") for f in got["other"])  # other weights: not pushed
