"""The robustness battery (modeling/robustness.py): each condition does what its name says, is
deterministic, the scores are computed against a fixed operating point, and the CLI refuses the test
split. Tiny random models and synthetic images; the real battery results are in benchmarks/."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from modeling import robustness as rb
from synthetic import make_class_dataset, xray_like
from tiny_models import save_tiny_classifier


@pytest.fixture(scope="module")
def film():
    return xray_like(5, (120, 100))


def px(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def test_every_condition_is_deterministic_keeps_the_mode_and_changes_the_film(film):
    assert rb.condition_names()[0] == rb.PLAIN and len(rb.condition_names()) == len(rb.BATTERY) + 1
    assert rb.apply(rb.PLAIN, film) is film
    for c in rb.BATTERY:
        a, b = rb.apply(c.name, film), rb.apply(c.name, film.copy())
        assert a.mode == "L", c.name
        assert np.array_equal(px(a), px(b)), f"{c.name} is not deterministic"
        same_size = a.size == film.size
        assert not (same_size and np.array_equal(px(a), px(film))), f"{c.name} left the film unchanged"
        assert c.why, f"{c.name} does not say why it is in the battery"
    with pytest.raises(ValueError, match="unknown robustness condition"):
        rb.apply("invert", film)


def test_conditions_change_what_their_names_say(film):
    a = px(film)
    mid = (a > 60) & (a < 200)
    assert px(rb.apply("gamma_0.6", film))[mid].mean() > a[mid].mean() + 5  # mid-tones brighter
    assert px(rb.apply("gamma_1.6", film))[mid].mean() < a[mid].mean() - 5
    assert px(rb.apply("contrast_0.6", film)).std() < 0.7 * a.std()
    assert px(rb.apply("contrast_1.5", film)).std() > 1.2 * a.std()
    # blur removes high frequencies, sharpening adds them
    hf = lambda x: np.abs(np.diff(x, axis=1)).mean()  # noqa: E731
    assert hf(px(rb.apply("blur_1.5", film))) < 0.8 * hf(a) < hf(a) < hf(px(rb.apply("sharpen", film)))
    resid = px(rb.apply("noise_12", film)) - a
    assert 8 < resid.std() < 14 and abs(resid.mean()) < 2
    # geometry: zoom in crops the centre, zoom out frames a smaller film in black, aspect crops one axis
    assert film.size == (120, 100) and rb.apply("zoom_in_0.8", film).size == (96, 80)
    out = px(rb.apply("zoom_out_1.25", film))
    assert out.shape == a.shape and out[:5].max() == 0 and out[:, :5].max() == 0 and out[40:60, 40:80].mean() > 0
    assert rb.apply("aspect_wide", film).size == (102, 100) and rb.apply("aspect_tall", film).size == (120, 85)
    r = px(rb.apply("rotate_+10", film))
    assert r.shape == a.shape and r[0, -1] == 0  # a corner came from outside the film
    s = px(rb.apply("shift", film))
    assert s[:, :12].max() == 0 and s[:5].max() == 0
    assert np.allclose(s[5:, 12:], a[:-5, :-12], atol=1)  # 10% of the width right, 5% of the height down


def test_noise_depends_on_the_image_not_on_the_order_it_is_scored_in():
    one, two = xray_like(1, (64, 64)), xray_like(2, (64, 64))
    first = rb.apply("noise_12", one)
    rb.apply("noise_12", two)
    assert np.array_equal(px(rb.apply("noise_12", one)), px(first))
    assert not np.array_equal(px(rb.apply("noise_12", one)) - px(one), px(rb.apply("noise_12", two)) - px(two))


def test_battery_logits_scores_every_image_under_every_condition():
    images = [xray_like(i, (40, 40)) for i in range(7)]
    seen: list[int] = []

    def fn(batch):  # mean grey level as a "logit": lets us check each condition reached the function
        return np.array([[px(im).mean(), 0.0, 0.0] for im in batch])

    out = rb.battery_logits(fn, images, batch_size=3, progress=seen.append)
    assert list(out) == rb.condition_names() and all(v.shape == (7, 3) for v in out.values())
    assert seen == [3, 3, 1]
    assert np.allclose(out[rb.PLAIN][:, 0], [px(im).mean() for im in images])
    assert (out["gamma_0.6"][:, 0] > out[rb.PLAIN][:, 0]).all()
    assert (out["zoom_out_1.25"][:, 0] < out[rb.PLAIN][:, 0]).all()  # black frame
    with pytest.raises(ValueError, match="unknown robustness condition"):
        rb.battery_logits(fn, images, names=[rb.PLAIN, "flip"])


def _logits_for(labels: np.ndarray, strength: float = 4.0) -> np.ndarray:
    z = np.zeros((len(labels), 3))
    z[np.arange(len(labels)), labels] = strength
    return z


def test_score_holds_the_plain_operating_point_and_finds_the_worst_condition():
    labels = np.array([0] * 10 + [1] * 10 + [2] * 10)
    plain = _logits_for(labels)
    flipped = plain.copy()
    flipped[:4] = _logits_for(np.full(4, 2))[:4]  # 4 of 10 normals called viral: specificity 0.6
    report = rb.score({rb.PLAIN: plain, "gamma_0.6": plain.copy(), "zoom_in_0.8": flipped}, labels)
    op = rb.fit_operating_point(plain, labels)
    assert report["operating_point"] == pytest.approx({"temperature": op.temperature, "threshold": op.threshold})
    per = report["conditions"]
    assert per[rb.PLAIN]["macro_f1"] == pytest.approx(1.0) and per[rb.PLAIN]["specificity"] == pytest.approx(1.0)
    assert per["zoom_in_0.8"]["specificity"] == pytest.approx(0.6)
    assert per["zoom_in_0.8"]["specificity_argmax"] == pytest.approx(0.6)
    s = report["summary"]
    assert s["worst_specificity"] == pytest.approx(0.6) and s["mean_specificity"] == pytest.approx(0.8)
    assert s["worst_condition_specificity"] == "zoom_in_0.8" == s["worst_condition_macro_f1"]
    assert s["worst_macro_f1"] < s["mean_macro_f1"] < 1.0
    # the plain condition is not part of the worst case / mean
    assert rb.score({rb.PLAIN: flipped, "gamma_0.6": plain}, labels)["summary"]["worst_macro_f1"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="plain"):
        rb.score({"gamma_0.6": plain}, labels)


def test_cli_writes_the_report_and_refuses_the_test_split(tmp_path):
    data = make_class_dataset(tmp_path / "data", n_train=6, n_val=18, n_test=6)
    model = save_tiny_classifier(tmp_path / "model")
    out = tmp_path / "rob"
    from modeling.cli import robustness_main

    assert robustness_main(["--model", str(model), "--dataset", str(data), "--output-dir", str(out), "--no-progress",
                    "--precision", "float32"]) == 0
    report = json.loads((out / "robustness.json").read_text())
    assert list(report["conditions"]) == rb.condition_names() and report["n"] == 18
    assert [c["name"] for c in report["battery"]] == [c.name for c in rb.BATTERY]
    assert set(np.load(out / "logits.npz").files) == set(rb.condition_names())
    with pytest.raises(ValueError, match="validation tool"):
        robustness_main(["--model", str(model), "--dataset", str(data), "--output-dir", str(tmp_path / "t"),
                         "--split", "test"])


def _summary(worst_f1, worst_spec, mean_f1=0.8):
    return {"worst_macro_f1": worst_f1, "worst_specificity": worst_spec, "mean_macro_f1": mean_f1}


def test_selection_rule_filters_on_plain_validation_then_takes_the_worst_case():
    labels = np.repeat([0, 1, 2], 60)
    groups = [f"p{i // 2}" for i in range(len(labels))]

    def noisy(err, offset=0):  # predictions with a share `err` of the rows wrong, spread over the classes
        pred = labels.copy()
        wrong = (np.arange(len(labels)) * 37 + offset) % 100 < err * 100
        pred[wrong] = (pred[wrong] + 1) % 3
        return pred

    best_plain = rb.Candidate("best-plain", noisy(0.05), _summary(0.60, 0.90))
    robust = rb.Candidate("robust", noisy(0.06, offset=50), _summary(0.75, 0.70))
    robust_tied = rb.Candidate("robust-tied", noisy(0.06, offset=25), _summary(0.747, 0.85))
    weak = rb.Candidate("weak", noisy(0.45), _summary(0.90, 0.95))  # robust but much worse on plain validation
    ensemble = rb.Candidate("ensemble", noisy(0.02), _summary(0.95, 0.99), single_pass=False)
    out = rb.select([best_plain, robust, robust_tied, weak, ensemble], labels, groups, n_bootstrap=300)
    v = out["candidates"]
    assert out["best_plain"] == "best-plain"  # the ensemble is better but cannot ship as one pass
    assert not v["weak"]["eligible"] and "significantly below" in v["weak"]["why"]
    assert not v["ensemble"]["eligible"] and "forward pass" in v["ensemble"]["why"]
    assert v["robust"]["eligible"] and v["robust"]["vs_best_plain"]["ci95"][1] >= 0
    assert set(out["tied_on_worst_macro_f1"]) == {"robust", "robust-tied"}
    assert out["chosen"] == "robust-tied"  # tied on worst-case macro-F1, better worst-case specificity


def test_references_are_shown_but_never_chosen():
    labels = np.repeat([0, 1, 2], 60)

    def noisy(err, offset=0):
        pred = labels.copy()
        wrong = (np.arange(len(labels)) * 37 + offset) % 100 < err * 100
        pred[wrong] = (pred[wrong] + 1) % 3
        return pred

    released = rb.Candidate("released", noisy(0.01), _summary(0.99, 0.99), reference=True)
    new = rb.Candidate("new", noisy(0.05, 50), _summary(0.7, 0.7))
    out = rb.select([released, new], labels, n_bootstrap=200)
    assert out["chosen"] == "new" and out["best_plain"] == "new"
    assert not out["candidates"]["released"]["eligible"] and "reference" in out["candidates"]["released"]["why"]
    with pytest.raises(ValueError, match="release candidate"):
        rb.select([released], labels, n_bootstrap=10)


def test_the_battery_operating_point_pools_the_temperature_and_keeps_every_conditions_sensitivity():
    """v4's operating point: T from the pooled logits of every condition; the threshold the highest one
    that keeps 98.5% sensitivity plain and 97% under each condition. A darkened condition that pushes
    pneumonia scores down must pull the threshold down to hold its sensitivity."""
    from modeling.calibration import softmax
    from modeling.labels import pneumonia_probability

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 200)
    plain = rng.normal(0, 1, (600, 3)) + 4.0 * np.eye(3)[labels]
    dark = plain.copy()
    dark[:, 0] += 2.5  # every film looks more normal under this condition
    sharp_plain = plain * 3  # an overconfident model: plain alone asks for a higher temperature...
    op_plain = rb.fit_operating_point(sharp_plain, labels)
    op = rb.fit_battery_operating_point({rb.PLAIN: sharp_plain, "dark": dark * 3}, labels)
    assert op.temperature > op_plain.temperature  # ...and the shifted condition raises it further
    for name, lg, target in ((rb.PLAIN, sharp_plain, 0.985), ("dark", dark * 3, 0.97)):
        p = pneumonia_probability(softmax(lg / op.temperature))
        assert (p[labels != 0] >= op.threshold).mean() >= target
    p_dark = pneumonia_probability(softmax(dark * 3 / op.temperature))
    assert (p_dark[labels != 0] >= op_plain.threshold).mean() < 0.97  # the plain threshold would not hold
    plain_only = rb.fit_battery_operating_point({rb.PLAIN: sharp_plain}, labels)
    assert plain_only.threshold == pytest.approx(
        rb.fit_operating_point(sharp_plain, labels).threshold, rel=0.2)  # without conditions: the plain rule
    with pytest.raises(ValueError, match="plain"):
        rb.fit_battery_operating_point({"dark": dark}, labels)


def test_the_v4_objective_weighs_worst_case_specificity_beside_worst_case_macro_f1():
    labels = np.repeat([0, 1, 2], 60)
    pred = labels.copy()
    f1_only = rb.Candidate("f1-only", pred, _summary(0.80, 0.40))
    balanced = rb.Candidate("balanced", pred, _summary(0.74, 0.80))
    v3_rule = rb.select([f1_only, balanced], labels, n_bootstrap=100)
    v4_rule = rb.select([f1_only, balanced], labels, n_bootstrap=100, objective="worst_f1_and_specificity")
    assert v3_rule["chosen"] == "f1-only" and v4_rule["chosen"] == "balanced"
    assert v4_rule["candidates"]["balanced"]["objective"] == pytest.approx(0.77)
    with pytest.raises(ValueError, match="objective"):
        rb.select([f1_only], labels, objective="mean_of_everything")


def test_cxr_calibrate_battery_fits_the_v4_operating_point_and_checks_reused_logits(tmp_path):
    """cxr-calibrate --battery: the stored threshold keeps 97% sensitivity under every condition of the
    battery (bf16, as scored) and the config says how it was fit; logits of another model are refused."""
    from modeling.calibration import Calibration, softmax
    from modeling.cli import calibrate_main
    from modeling.labels import pneumonia_probability
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    data = make_class_dataset(tmp_path / "data", n_train=6, n_val=24, n_test=4)
    model = _uncalibrated(tmp_path / "m", seed=0)
    assert calibrate_main(["--model", str(model), "--dataset", str(data), "--output-dir", str(tmp_path / "cal"),
                           "--battery", "--no-progress"]) == 0
    m = AutoModelForImageClassification.from_pretrained(tmp_path / "cal")
    cal = Calibration.from_config(m.config)
    assert cal.temperature_applied and cal.condition_sensitivity == 0.97 and "every condition" in cal.fit_rule
    from datasets import load_from_disk

    val = load_from_disk(str(data))["validation"]
    # the uncalibrated model's bf16 battery logits (what the fit saw) over the stored temperature
    logits = rb.battery_logits(rb.model_logits_fn(AutoModelForImageClassification.from_pretrained(model),
                                                  AutoImageProcessor.from_pretrained(model, backend="pil")),
                               [r["image"] for r in val])
    pos = np.asarray(val["label"]) != 0
    for name, lg in logits.items():
        p = pneumonia_probability(softmax(lg / cal.temperature))
        # (a random tiny model's probabilities differ in the 7th digit: allow recomputation noise)
        assert (p[pos] >= cal.pneumonia_threshold - 1e-6).mean() >= (0.985 if name == rb.PLAIN else 0.97), name
    wrong = tmp_path / "wrong.npz"  # another model's logits: this one's, shifted
    np.savez(wrong, **{name: lg + np.array([1.0, 0.0, -1.0]) for name, lg in logits.items()})
    with pytest.raises(ValueError, match="not this model's"):
        calibrate_main(["--model", str(model), "--dataset", str(data), "--output-dir", str(tmp_path / "cal2"),
                        "--battery-logits", str(wrong), "--no-progress"])


def _uncalibrated(out, seed):
    """A tiny model as train.py's checkpoints/best (our labels, no calibration yet)."""
    from modeling.models import build_model
    from modeling.preprocessing import PreprocessConfig, build_image_processor
    from tiny_models import save_tiny_base

    build_model(str(save_tiny_base("dinov2", out.with_name(out.name + "-base"), seed=seed))).save_pretrained(out)
    build_image_processor(PreprocessConfig(size=32)).save_pretrained(out)
    return out
