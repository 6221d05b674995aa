"""The learned input gate (modeling/gate.py): fitting, verdicts, save/load, the predictor reading it in
the same forward pass, and the Space turning a film upright or refusing it."""

from __future__ import annotations


import numpy as np
import pytest

from modeling.gate import GATE_FILE, ROTATIONS, InputGate, fit_gate, invert, turn
from modeling.probe import LinearHead
from synthetic import jpeg_bytes, xray_like
from tiny_models import save_tiny_classifier


def clusters(n, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = {k: rng.normal(0, 6, d) for k in ("up", 90, 180, 270, "inv")}
    return {k: c + rng.normal(0, 1, (n, d)) for k, c in centres.items()}, centres


def test_fit_gate_tells_orientation_polarity_and_distance():
    train, centres = clusters(300)
    val, _ = clusters(400, seed=1)
    val = {k: v - np.mean(v, 0) + centres[k] for k, v in val.items()}  # same centres, new noise
    gate = fit_gate(train["up"], {r: train[r] for r in ROTATIONS[1:]}, train["inv"], val["up"], false_refusal=0.01)
    up = gate.verdicts(val["up"])
    assert sum(v.out_of_distribution for v in up) == pytest.approx(4, abs=1)  # the quantile: 1% of 400
    assert sum(v.needs_correction for v in up) <= 4
    for r in ROTATIONS[1:]:
        assert np.mean([v.rotation == r for v in gate.verdicts(val[r])]) > 0.95
    assert np.mean([v.inverted for v in gate.verdicts(val["inv"])]) > 0.95
    far = gate.verdicts(np.full((1, 8), 50.0))[0]
    assert far.out_of_distribution and "far from the chest X-rays" in far.refusal()


def test_refusal_limit_comes_from_validation_under_shift_and_the_band_below_it_is_a_caution(tmp_path):
    """Plain validation sets the caution limit; validation under the battery (here: a shifted copy) the
    refusal limit. A film between the two is predicted with a note; beyond the refusal limit, refused."""
    train, centres = clusters(300)
    val, _ = clusters(400, seed=1)
    val = {k: v - np.mean(v, 0) + centres[k] for k, v in val.items()}
    shifted = val["up"] + np.random.default_rng(2).normal(0, 1.5, val["up"].shape)  # a new site: wider spread
    gate = fit_gate(train["up"], {r: train[r] for r in ROTATIONS[1:]}, train["inv"], val["up"], shifted=shifted,
                    false_refusal=0.01)
    assert gate.caution_limit == pytest.approx(np.quantile(gate.distances(val["up"]), 0.99))
    assert gate.distance_limit == pytest.approx(np.quantile(gate.distances(shifted), 0.99))
    assert gate.distance_limit > gate.caution_limit
    shifted_verdicts = gate.verdicts(shifted)
    assert sum(v.out_of_distribution for v in shifted_verdicts) == pytest.approx(4, abs=1)
    between = [v for v in shifted_verdicts if v.unusual]
    assert between and all(not v.out_of_distribution and v.refusal() is None for v in between)
    assert all("unusual for this model" in v.caution() for v in between)
    assert all(v.caution() is None for v in gate.verdicts(val["up"]) if v.distance <= gate.caution_limit)
    far = gate.verdicts(np.full((1, 8), 50.0))[0]
    assert far.out_of_distribution and not far.unusual and far.caution() is None
    again = InputGate.load(gate.save(tmp_path / GATE_FILE))
    assert (again.caution_limit, again.distance_limit) == (gate.caution_limit, gate.distance_limit)
    plain_only = fit_gate(train["up"], {r: train[r] for r in ROTATIONS[1:]}, train["inv"], val["up"],
                          false_refusal=0.01)
    assert plain_only.distance_limit == plain_only.caution_limit == gate.caution_limit


def test_gate_round_trips_through_its_file(tmp_path):
    train, _ = clusters(100)
    gate = fit_gate(train["up"], {r: train[r] for r in ROTATIONS[1:]}, train["inv"], train["up"], meta={"x": 1})
    gate.save(tmp_path / GATE_FILE)
    again = InputGate.load(tmp_path / GATE_FILE)
    assert again.meta["x"] == 1 and again.distance_limit == gate.distance_limit
    probe = np.vstack([train["up"][:5], train[90][:5]])
    for a, b in zip(again.verdicts(probe), gate.verdicts(probe)):
        assert (a.rotation, a.inverted, a.out_of_distribution) == (b.rotation, b.inverted, b.out_of_distribution)
        assert a.distance == pytest.approx(b.distance, rel=1e-4)  # the precision matrix is stored as float32


def test_turn_and_invert_are_exact_and_correct_undoes_them():
    img = xray_like(3, (60, 40))
    v = InputGate(LinearHead(np.zeros((4, 1)), np.array([0.0, 9.0, 0.0, 0.0])),
                  LinearHead(np.zeros((2, 1)), np.array([0.0, 9.0])), mean=np.zeros(1), precision=np.eye(1),
                  distance_limit=1.0).verdicts(np.zeros((1, 1)))[0]
    assert v.rotation == 90 and v.inverted and not v.out_of_distribution and len(v.notes()) == 2
    broken = invert(turn(img, 90))
    assert broken.size == (40, 60)
    assert np.array_equal(np.asarray(v.correct(broken)), np.asarray(img))


def _gate_for(model_dir, *, rotation_bias=None, limit=1e9, caution=None):
    """A gate over the model's head features whose verdicts we choose: every film 'turned 90' (a huge
    bias), every film out of distribution (limit 0), or every film unusual (caution 0)."""
    import json

    d = 2 * json.loads((model_dir / "config.json").read_text())["hidden_size"]
    bias = np.zeros(4) if rotation_bias is None else np.asarray(rotation_bias, float)
    return InputGate(LinearHead(np.zeros((4, d)), bias), LinearHead(np.zeros((2, d)), np.array([0.0, -9.0])),
                     mean=np.zeros(d), precision=np.eye(d) * 1e-6, distance_limit=limit, caution_limit=caution)


def test_predictor_loads_the_gate_and_reads_it_in_the_same_pass(tmp_path):
    from modeling.predict import Predictor

    model_dir = save_tiny_classifier(tmp_path / "m", image_size=32)
    plain = Predictor.from_pretrained(str(model_dir)).predict_one(xray_like(1, (64, 64)))
    assert plain.gate is None and plain.to_dict()["gate"] is None
    _gate_for(model_dir).save(model_dir / GATE_FILE)
    for precision in ("float32", "bfloat16"):
        p = Predictor.from_pretrained(str(model_dir), precision=precision)
        for heatmap in (False, True):
            pred = p.predict_one(xray_like(1, (64, 64)), heatmap=heatmap)
            assert pred.gate is not None and pred.gate.distance > 0 and not pred.gate.needs_correction
            assert pred.probabilities == pytest.approx(plain.probabilities, abs=0.02)
            assert pred.to_dict()["gate"]["distance_limit"] == pytest.approx(1e9)


def test_space_turns_a_turned_film_upright_and_refuses_an_outlier(tmp_path):
    from modeling.image_io import load_image, pixel_sha256
    from modeling.predict import Predictor
    from space.service import CxrService, InputError
    from space.store import FeedbackStore

    model_dir = save_tiny_classifier(tmp_path / "m", image_size=32)
    _gate_for(model_dir, rotation_bias=[0, 9, 0, 0]).save(model_dir / GATE_FILE)  # "every film is turned 90"
    service = CxrService(Predictor.from_pretrained(str(model_dir)), FeedbackStore(tmp_path / "data"))
    data = jpeg_bytes(xray_like(5, (200, 160)))
    a = service.analyze(data)
    assert any("turned by 90 degrees" in n for n in a.notes) and a.to_dict()["gate"]["rotation"] == 90
    upright = turn(load_image(data), -90)
    assert a.image.size == (160, 200) and a.image_sha256 == pixel_sha256(upright)

    outlier_dir = save_tiny_classifier(tmp_path / "o", image_size=32)
    _gate_for(outlier_dir, limit=0.0).save(outlier_dir / GATE_FILE)
    strict = CxrService(Predictor.from_pretrained(str(outlier_dir)), FeedbackStore(tmp_path / "data2"))
    with pytest.raises(InputError, match="far from the chest X-rays the model was trained on"):
        strict.analyze(data)
    assert strict.store.count("predictions") == 0
    strict.flush()  # staging happens after the answer: wait for anything queued
    assert list(strict.store.staging.iterdir()) == []

    careful_dir = save_tiny_classifier(tmp_path / "c", image_size=32)
    gate = _gate_for(careful_dir, caution=0.0)  # every film is "unusual" but none is refused
    gate.save(careful_dir / GATE_FILE)
    careful = CxrService(Predictor.from_pretrained(str(careful_dir)), FeedbackStore(tmp_path / "data3"))
    c = careful.analyze(data, heatmap=True)
    assert any("unusual for this model" in n for n in c.notes) and c.to_dict()["gate"]["unusual"]
    assert careful.store.count("predictions") == 1


def test_fit_for_model_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    """The CLI fits, saves and reports on validation (turned and inverted copies counted)."""
    import json

    from modeling.cli import gate_main as main
    from synthetic import make_class_dataset

    data = make_class_dataset(tmp_path / "data", n_train=30, n_val=20, n_test=6)
    model_dir = save_tiny_classifier(tmp_path / "m", image_size=32)
    assert main(["--model", str(model_dir), "--dataset", str(data), "--n-fit", "30", "--false-refusal", "0.05",
                 "--output", str(tmp_path / "gate.json"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "gate.json").read_text())
    assert report["validation"]["n"] == 20 and report["validation"]["refused"] <= 1
    assert {"validation_turned_90", "validation_inverted", "validation_under_battery"} <= set(report)
    assert report["validation_under_battery"]["n"] == 20 * 15  # every battery condition
    assert report["distance_limit"] >= report["caution_limit"]
    assert InputGate.load(model_dir / GATE_FILE).meta["n_fit"] == 30
    monkeypatch.chdir(tmp_path)  # the shipped file names the model folder as given, not this machine's path
    assert main(["--model", str(tmp_path / "m"), "--dataset", str(data), "--n-fit", "30", "--no-battery",
                 "--no-progress"]) == 0
    assert InputGate.load(tmp_path / "m" / GATE_FILE).meta["model"] == "m"


def test_the_gate_costs_no_extra_forward_pass_even_with_a_heatmap(tmp_path):
    """A prediction is one forward pass, gate included; in the Space a heatmap request is one pass too
    (issue 21: it was the plain pass plus a float32 Grad-CAM pass): Grad-CAM runs in the compute
    precision, so the gate reads the very features of a plain pass, and the probabilities are the same."""
    from modeling.predict import Predictor
    from space.service import CxrService
    from space.store import FeedbackStore

    model_dir = save_tiny_classifier(tmp_path / "m", image_size=32)
    _gate_for(model_dir).save(model_dir / GATE_FILE)
    for precision in ("float32", "bfloat16"):
        p = Predictor.from_pretrained(str(model_dir), precision=precision)
        calls = []
        for net in {id(p.model): p.model, id(p._cam_net): p._cam_net}.values():
            net.register_forward_hook(lambda *a: calls.append(1))
        assert p.predict_one(xray_like(2, (64, 64))).gate is not None and len(calls) == 1
        service = CxrService(p, FeedbackStore(tmp_path / f"data-{precision}"))
        calls.clear()
        plain = service.analyze(jpeg_bytes(xray_like(3, (128, 128))), heatmap=False)
        assert len(calls) == 1
        calls.clear()
        a = service.analyze(jpeg_bytes(xray_like(3, (128, 128))), heatmap=True)
        assert len(calls) == 1 and a.prediction.heatmap is not None and a.prediction.gate is not None
        assert a.prediction.probabilities == plain.prediction.probabilities
        assert a.prediction.gate.distance == plain.prediction.gate.distance


def test_the_gate_field_reports_the_turn_that_was_corrected(tmp_path):
    """Issue 21: the film is turned upright, the note says so, and the API's gate field must say it too
    (it used to give the verdict on the corrected film: rotation 0)."""
    from modeling.predict import Predictor
    from space.service import CxrService
    from space.store import FeedbackStore

    model_dir = save_tiny_classifier(tmp_path / "m", image_size=32)
    _gate_for(model_dir).save(model_dir / GATE_FILE)
    predictor = Predictor.from_pretrained(str(model_dir))
    real = predictor.gate.verdicts
    seen = []

    def turned_once(feats):  # a real gate sees the turned film, then the film put upright
        out = real(feats)
        if not seen:
            out[0].rotation, out[0].rotation_probability = 270, 0.97
        seen.append(1)
        return out

    predictor.gate.verdicts = turned_once
    a = CxrService(predictor, FeedbackStore(tmp_path / "data")).analyze(jpeg_bytes(xray_like(5, (200, 160))))
    assert any("turned by 270 degrees" in n for n in a.notes)
    assert a.to_dict()["gate"]["rotation"] == 270 and a.to_dict()["gate"]["rotation_probability"] == 0.97
    assert len(seen) >= 2  # the corrected film was checked again (its distance decides)


def test_with_a_margin_only_films_far_beyond_every_real_one_are_refused():
    """Issue 21: distance alone earns a caution; the refusal limit is a margin over the farthest real film
    of the fit (training, validation, validation under the battery), not a quantile that some real
    films always exceed."""
    groups, centres = clusters(300, seed=3)
    up, val = groups["up"][:200], groups["up"][200:]
    rng = np.random.default_rng(5)
    shifted = val + rng.normal(0, 1.5, val.shape)  # the battery: the same films, farther out
    turned = {90: groups[90], 180: groups[180], 270: groups[270]}
    quantile = fit_gate(up, turned, groups["inv"], val, shifted=shifted, false_refusal=0.005)
    margin = fit_gate(up, turned, groups["inv"], val, shifted=shifted, false_refusal=0.005, refusal_margin=1.25)
    real = np.concatenate([up, val])
    assert (quantile.distances(val) > quantile.caution_limit).any()  # some real films earn a caution...
    assert not (margin.distances(real) > margin.distance_limit).any()  # ...none a refusal
    assert margin.caution_limit == pytest.approx(quantile.caution_limit)
    farthest = max(margin.distances(up).max(), margin.distances(val).max())
    assert margin.distance_limit == pytest.approx(1.25 * farthest)  # the battery's synthetic films do not set it
    assert margin.meta["refusal_margin"] == 1.25
    photo = centres["up"] + 40 * rng.normal(0, 1, (5, up.shape[1]))  # something far from every film
    assert (margin.distances(photo) > margin.distance_limit).all()
