"""The released model in space/model: loads as the card says, the card and README agree with the
measured JSON, and (with ../shared) an independent run over the official test folder reproduces the
card's test numbers."""

from __future__ import annotations

import json
import sys

import torch

from conftest import ROOT, shared_path

MODEL = ROOT / "space" / "model"


def test_release_folder_loads_float32_calibrated_and_small() -> None:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from modeling.calibration import Calibration
    from modeling.labels import LABELS

    model = AutoModelForImageClassification.from_pretrained(MODEL)
    assert model.dtype == torch.float32  # fp16 on disk, float32 compute (config.dtype)
    assert tuple(model.config.id2label[i] for i in range(3)) == LABELS
    cal = Calibration.from_config(model.config)
    assert cal.temperature_applied and cal.fitted_on.startswith("validation") and 0 < cal.pneumonia_threshold < 1
    weights = list(MODEL.glob("*.safetensors"))
    assert len(weights) == 1 and weights[0].stat().st_size <= 50 * 2**20
    from safetensors import safe_open

    with safe_open(weights[0], "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    proc = AutoImageProcessor.from_pretrained(MODEL, backend="pil")
    from modeling.preprocessing import config_from_processor

    cfg = config_from_processor(proc)
    assert cfg.size == 224 and not cfg.letterbox  # the network's input; v2 adds a centre crop before it
    runs = json.loads((MODEL / "training_runs.json").read_text())
    assert runs["release"] in {e["release"] for e in runs["test_evaluations"]}
    releases = [e["release"] for e in runs["test_evaluations"]]
    assert len(releases) == len(set(releases)), "a release evaluated on test more than once"
    for e in runs["test_evaluations"]:  # every evaluation's numbers are kept
        assert json.loads((MODEL / e["metrics"]).read_text())["n"] == 624


def test_cards_are_rendered_from_the_measured_json() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from release_card import README_END, README_START, readme_results, render

    latency = ROOT / "benchmarks" / "results" / "latency.json"
    assert (MODEL / "README.md").read_text() == render(MODEL, latency, ""), "run python scripts/release_card.py"
    assert (ROOT / "model_card.md").read_text() == render(MODEL, latency, "space/model/")
    test = json.loads((MODEL / "eval" / "test" / "metrics.json").read_text())
    assert test["n"] == 624 and test["split"] == "test" and not test.get("subset")
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index(README_START) + len(README_START):readme.index(README_END)].strip()
    assert block == readme_results(MODEL, latency)
    for key in ("accuracy", "macro_f1"):
        assert f"{test[key]:.4f}" in block, f"README results table lacks test {key}"


def test_the_readme_space_block_is_rendered_from_the_measured_json() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from release_card import SPACE_END, SPACE_START, readme_space

    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index(SPACE_START) + len(SPACE_START):readme.index(SPACE_END)].strip()
    assert block == readme_space().strip(), "run python scripts/release_card.py"


def test_the_archive_block_and_the_private_mode_section_are_rendered_from_the_measured_json() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from release_card import ARCHIVE_END, ARCHIVE_START, archive_table, private_mode_text

    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    block = doc[doc.index(ARCHIVE_START) + len(ARCHIVE_START):doc.index(ARCHIVE_END)].strip()
    assert block == archive_table().strip(), "run python scripts/release_card.py"
    assert private_mode_text() in (ROOT / "model_card.md").read_text()
    agreement = json.loads((ROOT / "benchmarks" / "results" / "onnx_agreement.json").read_text())
    assert agreement["agreement"]["float32"]["n"] == 689  # measured on every validation film
    assert agreement["agreement"]["float32"]["max_abs_probability_diff"] <= 1e-4


def test_the_shipped_gate_refuses_photographs_and_screenshots(tmp_path) -> None:
    """The bundled model's rules and learned gate, through the Space's path, on grey photographs and
    screenshots with text (benchmarks/input_gate.py's negatives): each is refused, none predicted."""
    import pytest

    from modeling.predict import Predictor
    from space.service import CxrService, InputError
    from space.store import FeedbackStore

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from input_gate import negatives

    neg = negatives()
    service = CxrService(Predictor.from_pretrained(str(MODEL), precision="auto"), FeedbackStore(tmp_path / "data"))
    for data in neg["photographs"] + neg["screenshots"][:4]:
        with pytest.raises(InputError, match="does not look like a frontal chest X-ray"):
            service.analyze(data, heatmap=False)
    assert service.store.count("predictions") == 0


def test_the_shipped_gate_refuses_no_validation_film_and_every_non_film(real_dataset, tmp_path) -> None:
    """Issue 21 item 4, asserted here rather than only measured in benchmarks/results/input_gate.json: through
    the Space's own path (rules, learned gate, scope) with the bundled model, no validation film is refused
    and every non-film of benchmarks/input_gate.py (grey photographs, other images, screenshots, synthetic
    patterns, a non-chest DICOM) is."""
    from modeling.data import load_cxr_dataset
    from modeling.image_io import to_grayscale
    from modeling.predict import Predictor
    from space.service import CxrService
    from space.store import FeedbackStore

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from input_gate import count, negatives, png

    service = CxrService(Predictor.from_pretrained(str(MODEL), precision="auto"), FeedbackStore(tmp_path / "data"))
    ds_dir, _, _ = real_dataset
    validation = load_cxr_dataset(str(ds_dir))["validation"]
    films = count(service, (png(to_grayscale(r["image"])) for r in validation))
    assert films["n"] == 689 and films["refused"] == 0, films
    neg = negatives()
    assert sum(len(v) for v in neg.values()) == 35
    for kind, items in neg.items():
        outcome = count(service, items)
        assert outcome["refused"] == outcome["n"], (kind, outcome)


def test_latency_report_is_for_the_released_weights() -> None:
    from modeling.predict import resolve_revision

    lat = json.loads((ROOT / "benchmarks" / "results" / "latency.json").read_text())
    assert lat["model_revision"] == resolve_revision(str(MODEL))
    assert lat["threads"] == 2
    assert {"pipeline_fp32", "predictor_fp32", "predictor_bf16", "predictor_fp32_gradcam"} <= set(lat["results"])


def test_independent_reproduction_on_official_test() -> None:
    test_dir = shared_path("data", "kermany", "chest_xray", "test")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import reproduce_test

    assert reproduce_test.main(["--model", str(MODEL), "--test-dir", str(test_dir)]) == 0


def test_the_spaces_examples_are_accepted_by_the_bundled_model(tmp_path) -> None:
    """Every example the Space offers goes through the Space's own path (rules, the learned gate, the scope
    check) with the released model and is not refused; the pediatric ones are answered (a demo whose normal
    example is refused looks broken, and the first gate did refuse it), and the adult DICOM example is the
    one a visitor clicks to see the scope check's answer."""
    from modeling.predict import Predictor
    from space.service import CxrService
    from space.store import FeedbackStore

    service = CxrService(Predictor.from_pretrained(str(MODEL), precision="auto"), FeedbackStore(tmp_path / "data"))
    examples = sorted((ROOT / "space" / "examples").glob("*.*"))
    examples = [p for p in examples if p.suffix.lower() in {".jpeg", ".jpg", ".png", ".dcm"}]
    assert len(examples) >= 4
    for path in examples:
        analysis = service.analyze(path.read_bytes())
        if path.name.startswith("kermany_"):  # the pediatric examples are answered
            assert analysis.prediction.label in {"normal", "bacterial_pneumonia", "viral_pneumonia"}, path.name
        else:  # the adult DICOM (space/examples/NOTICE.md) shows what a film outside the scope gets
            assert analysis.decision == "out_of_scope" and analysis.prediction.label is None, path.name


def test_the_scope_and_gate_reports_are_for_the_released_weights_and_shown_as_measured() -> None:
    """benchmarks/results/scope.json and input_gate.json were measured on the bundled weights, and the
    scope table in docs/space.md is the one rendered from scope.json."""
    from modeling.predict import resolve_revision

    sys.path.insert(0, str(ROOT / "scripts"))
    from release_card import SCOPE_END, SCOPE_START, scope_table

    revision = resolve_revision(str(MODEL))
    scope = json.loads((ROOT / "benchmarks" / "results" / "scope.json").read_text())
    gate = json.loads((ROOT / "benchmarks" / "results" / "input_gate.json").read_text())
    assert scope["model_revision"] == revision and gate["model_revision"] == revision
    doc = (ROOT / "docs" / "space.md").read_text()
    assert doc[doc.index(SCOPE_START) + len(SCOPE_START):doc.index(SCOPE_END)].strip() == scope_table(scope).strip()
    assert scope["space_examples"]["flagged"] == 0 and scope["space_examples"]["refused"] == 0
