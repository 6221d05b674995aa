"""train.py on the real merged dataset with the real pretrained backbone (../shared/models/dinov2-small):
a short run (128 training images, 112 px, a linear-probe epoch then a full fine-tuning epoch, no test evaluation: the official test split is
only evaluated for released checkpoints), then the saved model used the three ways users use it.
Skipped with a reason when ../shared is absent. ~1 min on 2 cores (after the session's dataset build)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, shared_path


@pytest.fixture(scope="module")
def real_run(real_dataset, tmp_path_factory):
    base = shared_path("models", "dinov2-small")
    out = tmp_path_factory.mktemp("real-train") / "model"
    proc = subprocess.run(
        [sys.executable, "train.py", "--dataset", str(real_dataset[0]), "--base-model", str(base),
         "--output-dir", str(out), "--epochs", "2", "--freeze-backbone-epochs", "1", "--max-train-samples", "128",
         "--max-eval-samples", "48", "--image-size", "112", "--batch-size", "16", "--learning-rate", "1e-4",
         "--n-bootstrap", "50", "--no-test", "--no-progress"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_short_real_run_saves_a_calibrated_dinov2_classifier(real_run):
    cfg = json.loads((real_run / "config.json").read_text())
    assert cfg["model_type"] == "dinov2" and len(cfg["id2label"]) == 3
    assert cfg["cxr_calibration"]["temperature_applied"] and cfg["cxr_calibration"]["n_fit"] == 48
    info = json.loads((real_run / "training_config.json").read_text())
    assert info["n_train"] == 128 and info["preprocessing"]["size"] == 112
    epochs = [json.loads(x) for x in (real_run / "train_log.jsonl").read_text().splitlines()]
    assert [e["backbone_frozen"] for e in epochs] == [True, False]
    assert all(np.isfinite(e["train_loss"]) and e["train_images_per_second"] > 0 for e in epochs)
    metrics = json.loads((real_run / "metrics.json").read_text())
    assert "test" not in metrics and metrics["validation"]["n"] == 48
    # pretrained features: a short run already separates normal from pneumonia (0.92 when written)
    assert metrics["validation"]["binary"]["auc"] > 0.75


def test_real_model_through_pipeline_predictor_and_gradcam(real_run):
    from transformers import pipeline

    from modeling.predict import Predictor

    film = next(iter(sorted(shared_path("data", "kermany").rglob("test/PNEUMONIA/*.jpeg"))))
    pred = Predictor.from_pretrained(str(real_run))
    [r] = pred.predict([film], heatmap=True)
    pipe = {d["label"]: d["score"] for d in pipeline("image-classification", model=str(real_run))(str(film))}
    assert pipe == pytest.approx(r.probabilities, abs=1e-5)
    assert r.heatmap.shape == (r.image_size[1], r.image_size[0])
    assert np.isfinite(r.heatmap).all() and r.heatmap.max() > r.heatmap.min()
    dicom = shared_path("data", "dicom", "txv_siim_cr_chest_pa_monochrome2_jpeg.dcm")
    d = pred.predict_one(dicom, heatmap=True, target_class="normal")
    assert d.heatmap_class == "normal" and sum(d.probabilities.values()) == pytest.approx(1.0)
