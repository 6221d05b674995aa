"""The scope check (modeling/scope.py): fitting and its limit, the patient split (the held-out part is
never read), save/load, the predictor withholding the label and the call for a flagged film,
cxr-predict, and the running Space answering "out_of_scope" and storing nothing more than a
prediction stores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from modeling.probe import LinearHead
from modeling.scope import SCOPE_FILE, ScopeCheck, fit_scope, patient_of, patient_split
from synthetic import jpeg_bytes, xray_like
from tiny_models import save_tiny_classifier


def _blobs(n, d=6, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (n, d)) + shift


def test_fit_scope_sets_its_limit_on_in_scope_validation_and_separates_what_it_can():
    in_fit, out_fit = _blobs(300, seed=1), _blobs(300, shift=3.0, seed=2)
    in_val, out_val = _blobs(400, seed=3), _blobs(200, shift=3.0, seed=4)
    check, tried = fit_scope(in_fit, out_fit, in_val, out_val, flag_rate=0.01, Cs=(0.01, 1.0))
    assert set(tried) == {"C=0.01", "C=1"}
    assert (check.scores(in_val) > check.limit).mean() <= 0.01  # the limit: <= 1% of in-scope films flagged
    assert (check.scores(out_val) > check.limit).mean() > 0.9  # far-away films are flagged
    typical = in_val[[int(np.argmin(check.scores(in_val)))]]  # the most in-scope validation film
    v = check.verdicts(np.vstack([typical, out_val[:1] + 10]))
    assert v[1].out_of_scope and "children aged 1-5" in v[1].message()
    assert not v[0].out_of_scope and v[0].message() is None
    assert check.meta["n_in_fit"] == 300 and check.meta["C"] in (0.01, 1.0)


def test_a_battery_limit_flags_at_most_the_share_under_every_condition_too():
    """The limit can be fit on validation under the robustness battery (cxr-scope --battery): films of
    another tone or noise level than the training hospital's must not be flagged more than plain ones."""
    in_fit, out_fit = _blobs(300, seed=1), _blobs(300, shift=3.0, seed=2)
    in_val, out_val = _blobs(400, seed=3), _blobs(200, shift=3.0, seed=4)
    shifted = {"gamma_0.6": in_val + 0.6, "noise_12": in_val + np.random.default_rng(5).normal(0, 0.8, in_val.shape)}
    plain, _ = fit_scope(in_fit, out_fit, in_val, out_val, flag_rate=0.01, Cs=(1.0,))
    robust, tried = fit_scope(in_fit, out_fit, in_val, out_val, flag_rate=0.01, Cs=(1.0,), in_val_conditions=shifted)
    assert robust.limit > plain.limit
    for feats in [in_val, *shifted.values()]:
        assert (robust.scores(feats) > robust.limit).mean() <= 0.01
    assert (plain.scores(shifted["gamma_0.6"]) > plain.limit).mean() > 0.01  # what the plain limit would do
    assert tried["C=1"]["limit_set_by"] in shifted and robust.meta["limit_conditions"] == ["plain", *shifted]


def test_the_limit_flags_at_most_the_share_asked_for():
    """1% of 680 in-scope validation films is 6.8: at most 6 may be flagged (a plain quantile flagged 7)."""
    from modeling.scope import limit_for

    scores = np.random.default_rng(0).normal(0, 1, 680)
    assert (scores > limit_for(scores, 0.01)).sum() == 6
    assert (scores > limit_for(scores, 0.0)).sum() == 0 and (scores > limit_for(scores, 0.5)).sum() == 340


def test_scope_round_trips_through_its_file(tmp_path):
    check = ScopeCheck(LinearHead(np.arange(12.0).reshape(2, 6), np.array([0.5, -0.5])), limit=1.25,
                       meta={"model": "m"})
    loaded = ScopeCheck.load(check.save(tmp_path / SCOPE_FILE))
    x = _blobs(5)
    assert np.allclose(loaded.scores(x), check.scores(x)) and loaded.limit == 1.25 and loaded.meta == {"model": "m"}


def test_patient_split_keeps_each_patient_in_one_part_and_is_stable(tmp_path):
    names = [f"{pid:08d}_{k:03d}.jpeg" for pid in range(60) for k in range(3)]
    paths = [tmp_path / ("no_finding" if i % 2 else "pneumonia") / n for i, n in enumerate(names)]
    parts = patient_split(paths)
    assert sum(len(v) for v in parts.values()) == len(paths)
    owners = {}
    for part, files in parts.items():
        for p in files:
            assert owners.setdefault(patient_of(p), part) == part
    assert all(len(v) > 0 for v in parts.values())
    assert patient_split(list(reversed(paths))) == parts
    assert patient_of("00012345_007.png") == "00012345"


def _scope_for(model_dir, *, flag: bool) -> ScopeCheck:
    """A scope check over the model's head features whose verdict we choose (every film flagged or none)."""
    d = 2 * json.loads((model_dir / "config.json").read_text())["hidden_size"]
    return ScopeCheck(LinearHead(np.zeros((2, d)), np.array([0.0, 5.0])), limit=0.0 if flag else 10.0)


def test_the_predictor_gives_no_label_and_no_call_for_a_flagged_film_in_the_same_pass(tmp_path):
    from modeling.predict import Predictor

    model_dir = save_tiny_classifier(tmp_path / "m", image_size=32)
    film = xray_like(1, (64, 64))
    plain = Predictor.from_pretrained(str(model_dir)).predict_one(film)
    assert plain.scope is None and not plain.out_of_scope and plain.to_dict()["scope"] is None
    _scope_for(model_dir, flag=True).save(model_dir / SCOPE_FILE)
    p = Predictor.from_pretrained(str(model_dir))
    calls = []
    p.model.register_forward_hook(lambda *a: calls.append(1))
    for heatmap in (False, True):
        pred = p.predict_one(film, heatmap=heatmap)
        assert pred.out_of_scope and pred.label is None and pred.pneumonia is None
        assert pred.probabilities == pytest.approx(plain.probabilities, abs=1e-5)  # kept, as unreliable output
        d = pred.to_dict()
        assert d["out_of_scope"] and d["scope"] == {"score": 5.0, "limit": 0.0, "out_of_scope": True}
    assert len(calls) == 2  # one pass each: the scope check reads the head's input of that pass
    _scope_for(model_dir, flag=False).save(model_dir / SCOPE_FILE)
    ok = Predictor.from_pretrained(str(model_dir)).predict_one(film)
    assert not ok.out_of_scope and ok.label == plain.label and ok.pneumonia == plain.pneumonia


def test_cxr_predict_carries_the_scope_verdict(tmp_path, capsys):
    from modeling.cli import predict_main

    model_dir = save_tiny_classifier(tmp_path / "m", image_size=32)
    _scope_for(model_dir, flag=True).save(model_dir / SCOPE_FILE)
    film = tmp_path / "film.png"
    xray_like(2, (64, 64)).save(film)
    assert predict_main(["--model", str(model_dir), str(film)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["out_of_scope"] and line["label"] is None and line["pneumonia"] is None
    assert line["scope"]["limit"] == 0.0 and set(line["probabilities"]) == {"normal", "bacterial_pneumonia",
                                                                           "viral_pneumonia"}


def test_the_service_records_an_out_of_scope_answer_without_a_heatmap(tmp_path):
    from modeling.gate import GATE_FILE
    from modeling.predict import Predictor
    from space.service import CxrService
    from space.store import FeedbackStore
    from test_gate import _gate_for

    model_dir = save_tiny_classifier(tmp_path / "m", image_size=32)
    _scope_for(model_dir, flag=True).save(model_dir / SCOPE_FILE)
    _gate_for(model_dir).save(model_dir / GATE_FILE)
    service = CxrService(Predictor.from_pretrained(str(model_dir)), FeedbackStore(tmp_path / "data"))
    calls = []
    service.predictor.model.register_forward_hook(lambda *a: calls.append(1))
    a = service.analyze(jpeg_bytes(xray_like(3, (128, 128))), heatmap=True)
    assert a.decision == "out_of_scope" and "children aged 1-5" in a.verdict
    assert a.prediction.heatmap is None and len(calls) == 1  # one pass; no map for an answer not given
    d = a.to_dict()
    assert d["label"] is None and d["decision"] == "out_of_scope" and d["scope"]["out_of_scope"]
    rows = service.store.predictions_frame()
    assert len(rows) == 1 and rows.iloc[0]["decision"] == "out_of_scope" and rows.iloc[0]["label"] == ""
    rows = service.batch([_write_film(tmp_path)])
    assert rows[0]["decision"] == "out_of_scope" and rows[0]["label"] == "" and rows[0]["error"] == ""


def _write_film(tmp_path):
    path = tmp_path / "batch-film.jpeg"
    path.write_bytes(jpeg_bytes(xray_like(4, (96, 96))))
    return path


def test_a_flagged_film_over_the_running_app_gets_no_call_and_stores_only_a_prediction(tmp_path):
    """/predict on a film the scope check flags: decision out_of_scope with the score and limit, no label,
    no pneumonia call, no heatmap; stored as one prediction (decision out_of_scope) and its staged
    pixels, as any prediction is; the DICOM's planted name and values are nowhere on disk."""
    from gradio_client import handle_file

    from test_space import PHI_FILE_NAME, _write, phi_dicom
    from test_space_hardening_app import phi_offenders, start_scanned_app

    root = tmp_path / "scoped-app"
    model = save_tiny_classifier(root / "model", image_size=32)
    _scope_for(model, flag=True).save(model / SCOPE_FILE)
    running = start_scanned_app(model, root)
    try:
        path = _write(tmp_path, PHI_FILE_NAME, phi_dicom())
        result = running.client().predict(handle_file(path), "predicted", api_name="/predict")
        assert result["decision"] == "out_of_scope" and result["label"] is None
        assert result["scope"] == {"score": 5.0, "limit": 0.0, "out_of_scope": True}
        assert result["heatmap_png"] is None and "children aged 1-5" in result["verdict"]
        assert running.rows("predictions") == 1
        assert running.rows("predictions", "decision = 'out_of_scope' AND label = ''") == 1
        with pytest.raises(Exception, match="outside what the model was trained on"):  # not pediatric data
            running.client().predict(result["prediction_id"], "normal", "radiologist", "", True, api_name="/feedback")
        assert running.rows("feedback") == 0
        # the pixels of the prediction are staged, as for any prediction (after the answer)
        from test_space_hardening_app import wait_until

        assert wait_until(lambda: len(list((running.data_dir / "staging").glob("*.png"))) == 1, timeout=10)
        assert not phi_offenders(running)
    finally:
        running.stop()


def test_cxr_scope_fits_saves_and_never_reads_the_held_out_patients(tmp_path):
    """The command fits on training films and the fit patients, sets the limit on validation, saves the
    check beside the weights; the held-out patients' files are corrupt here, and it still succeeds."""
    from PIL import ImageOps

    from modeling.cli import scope_main
    from synthetic import make_class_dataset

    data = make_class_dataset(tmp_path / "data", n_train=30, n_val=20, n_test=6)
    model_dir = save_tiny_classifier(tmp_path / "m", image_size=32)
    outside = tmp_path / "nih"
    names = [outside / ("no_finding" if pid % 2 else "pneumonia") / f"{pid:08d}_{k:03d}.jpeg"
             for pid in range(40) for k in range(2)]
    held_out = set(patient_split(names)["held_out"])
    assert held_out
    for i, path in enumerate(names):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path in held_out:
            path.write_bytes(b"not a film: reading it would fail")
        else:
            path.write_bytes(jpeg_bytes(ImageOps.invert(xray_like(100 + i, (64, 64)))))
    report_file = tmp_path / "scope.json"
    assert scope_main(["--model", str(model_dir), "--dataset", str(data), "--out-of-scope", str(outside),
                       "--n-fit", "30", "--flag-rate", "0.05", "--output", str(report_file), "--no-progress"]) == 0
    report = json.loads(report_file.read_text())
    assert report["in_scope_validation"]["n"] == 20 and report["in_scope_validation"]["flagged"] <= 1
    assert report["out_of_scope_parts"]["held_out"]["films"] == len(held_out)
    check = ScopeCheck.load(model_dir / SCOPE_FILE)
    assert check.limit == pytest.approx(report["limit"]) and check.meta["n_in_fit"] == 60  # plain + one view each


def test_the_heatmap_pass_answers_by_the_plain_passs_verdict():
    """A prediction given another pass's verdicts (Prediction.with_checks: a caller that decides on one
    pass and draws the heatmap in another, whose own scope verdict can differ near the limit): the label
    and the call follow the verdict kept."""
    from modeling.predict import Prediction
    from modeling.scope import ScopeVerdict

    second = Prediction(label=None, probabilities={"normal": 0.2, "bacterial_pneumonia": 0.7, "viral_pneumonia": 0.1},
                        pneumonia_probability=0.8, pneumonia=None, threshold=0.4, image_size=(8, 8),
                        scope=ScopeVerdict(score=0.51, limit=0.5))
    kept = second.with_checks(None, ScopeVerdict(score=0.49, limit=0.5))
    assert kept.label == "bacterial_pneumonia" and kept.pneumonia is True and not kept.out_of_scope
    flagged = kept.with_checks(None, ScopeVerdict(score=0.9, limit=0.5))
    assert flagged.label is None and flagged.pneumonia is None and flagged.out_of_scope


def test_feedback_is_not_taken_for_an_out_of_scope_film(tmp_path):
    """A reading of a film outside the model's scope (an adult's) would be exported as pediatric training
    data: the service refuses it and stores nothing."""
    from modeling.predict import Predictor
    from space.service import CxrService
    from space.store import FeedbackStore, StoreError

    model_dir = save_tiny_classifier(tmp_path / "m", image_size=32)
    _scope_for(model_dir, flag=True).save(model_dir / SCOPE_FILE)
    service = CxrService(Predictor.from_pretrained(str(model_dir)), FeedbackStore(tmp_path / "data"))
    a = service.analyze(jpeg_bytes(xray_like(3, (96, 96))), channel="api")
    with pytest.raises(StoreError, match="outside what the model was trained on"):
        service.feedback(a.prediction_id, "normal", "radiologist", consent=True)
    assert service.store.count("feedback") == 0
