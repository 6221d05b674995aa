"""Tests for the evaluation metric (modeling/cxr_metric, an `evaluate` module loaded by path), its
project API (modeling.metrics) and the plots (modeling.plots).

Point metrics are checked against scikit-learn on random and hand-made inputs and against hand
computations (ECE, Brier); the bootstrap against explicit resampling; the intervals for the
properties a patient-grouped bootstrap must have.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    precision_score,
    roc_auc_score,
)

from modeling.labels import LABELS
from modeling.metrics import METRIC_PATH, compute_metrics, format_summary, load_metric

ROOT = Path(__file__).resolve().parents[1]


def _module():
    """The metric file imported directly, to test its internals (it is self-contained)."""
    spec = importlib.util.spec_from_file_location("cxr_metric_under_test", METRIC_PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def synthetic(n, seed=0, signal=1.5, classes=(0, 1, 2)):
    """Softmax probabilities that favour the true class (a plausible, imperfect model)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(classes, size=n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True), y


def sklearn_reference(p, y, threshold):
    """Every point metric computed with scikit-learn (the reference implementation)."""
    pred = p.argmax(axis=1)
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=[0, 1, 2], zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(y, pred, labels=[0, 1, 2], average="macro", zero_division=0)
    pneu, score = y != 0, p[:, 1] + p[:, 2]
    bpred = score >= threshold
    tn, fp, fn, tp = confusion_matrix(pneu, bpred, labels=[False, True]).ravel()
    ref = {
        "accuracy": accuracy_score(y, pred),
        "macro_precision": mp,
        "macro_recall": mr,
        "macro_f1": mf,
        "confusion_matrix": confusion_matrix(y, pred, labels=[0, 1, 2]).tolist(),
        "nll": log_loss(y, p, labels=[0, 1, 2]),
        "brier": brier_score_loss(y, p, labels=[0, 1, 2], scale_by_half=False),
        "binary.confusion_matrix": [[tn, fp], [fn, tp]],
        "binary.sensitivity": tp / (tp + fn),
        "binary.specificity": tn / (tn + fp),
        "binary.ppv": precision_score(pneu, bpred, zero_division=0),
        "binary.npv": tn / (tn + fn) if tn + fn else 0.0,
        "binary.f1": f1_score(pneu, bpred, zero_division=0),
        "binary.accuracy": accuracy_score(pneu, bpred),
        "binary.auc": roc_auc_score(pneu, score),
    }
    for c, name in enumerate(LABELS):
        ref[f"per_class.{name}.precision"] = prec[c]
        ref[f"per_class.{name}.recall"] = rec[c]
        ref[f"per_class.{name}.f1"] = f1[c]
        ref[f"per_class.{name}.support"] = sup[c]
        if 0 < (y == c).sum() < len(y):
            ref[f"auc_per_class.{name}"] = roc_auc_score(y == c, p[:, c])
    if len(set(y.tolist())) == 3:
        ref["auc_ovr_macro"] = roc_auc_score(y, p, multi_class="ovr", average="macro")
    return ref


def get(result, dotted):
    for part in dotted.split("."):
        result = result[part]
    return result


def assert_matches_sklearn(result, p, y, threshold):
    for key, want in sklearn_reference(p, y, threshold).items():
        got = get(result, key)
        if isinstance(want, list):
            assert got == np.asarray(want).tolist(), key
        else:
            assert got == pytest.approx(float(want), abs=1e-12), key


# --- point metrics ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,n,threshold", [(0, 624, 0.5), (1, 97, 0.3), (2, 40, 0.8), (3, 300, 0.65)])
def test_point_metrics_equal_sklearn_on_random_inputs(seed, n, threshold):
    p, y = synthetic(n, seed=seed, signal=1.0)
    r = compute_metrics(p, y, threshold=threshold, n_bootstrap=0)
    assert r["n"] == n and r["binary"]["threshold"] == threshold
    assert_matches_sklearn(r, p, y, threshold)


def test_point_metrics_equal_sklearn_with_ties_and_rounded_scores():
    # Scores rounded to one decimal: many ties, which AUC must count as 1/2 (trapezoid).
    p, y = synthetic(200, seed=5, signal=0.8)
    p = np.round(p, 1)
    p[:, 2] = 1 - p[:, 0] - p[:, 1]
    p = np.clip(p, 0, 1)
    p /= p.sum(axis=1, keepdims=True)
    r = compute_metrics(p, y, n_bootstrap=0)
    assert_matches_sklearn(r, p, y, 0.5)


def test_hand_made_example():
    p = np.array(
        [
            [0.7, 0.2, 0.1],  # normal, right
            [0.6, 0.3, 0.1],  # bacterial, called normal (a missed pneumonia)
            [0.1, 0.8, 0.1],  # bacterial, right
            [0.2, 0.3, 0.5],  # viral, right
            [0.3, 0.5, 0.2],  # viral, called bacterial (still pneumonia)
            [0.4, 0.1, 0.5],  # normal, called viral (a false alarm)
        ]
    )
    y = np.array([0, 1, 1, 2, 2, 0])
    r = compute_metrics(p, y, n_bootstrap=0)
    assert r["confusion_matrix"] == [[1, 0, 1], [1, 1, 0], [0, 1, 1]]
    assert r["accuracy"] == pytest.approx(3 / 6)
    assert r["per_class"]["normal"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    # normal vs pneumonia at 0.5: pneumonia scores 0.3, 0.4, 0.9, 0.8, 0.7, 0.6
    assert r["binary"]["confusion_matrix"] == [[1, 1], [1, 3]]
    assert r["binary"]["sensitivity"] == pytest.approx(3 / 4)
    assert r["binary"]["specificity"] == pytest.approx(1 / 2)
    assert r["binary"]["ppv"] == pytest.approx(3 / 4)
    assert r["binary"]["npv"] == pytest.approx(1 / 2)
    # AUC by hand: normals score 0.3, 0.6; pneumonias 0.4, 0.9, 0.8, 0.7 -> 7 of 8 pairs ordered.
    assert r["binary"]["auc"] == pytest.approx(7 / 8)
    assert r["auc_per_class"]["normal"] == pytest.approx(7 / 8)  # same ranking, see the module docs
    assert_matches_sklearn(r, p, y, 0.5)


ECE_P = np.array(
    [
        [0.90, 0.05, 0.05],  # y=0, right, conf 0.90  -> bin (0.867, 0.933]
        [0.05, 0.90, 0.05],  # y=0, wrong, conf 0.90  -> same bin: acc 0.5, conf 0.9
        [0.18, 0.20, 0.62],  # y=2, right, conf 0.62  -> bin (0.600, 0.667]
        [0.50, 0.30, 0.20],  # y=1, wrong, conf 0.50  -> bin (0.467, 0.533]
        [0.42, 0.33, 0.25],  # y=0, right, conf 0.42  -> bin (0.400, 0.467]
    ]
)
ECE_Y = np.array([0, 0, 2, 1, 0])


def test_ece_hand_worked():
    # 15 bins: (2 * |0.5 - 0.9| + |1 - 0.62| + |0 - 0.5| + |1 - 0.42|) / 5
    r = compute_metrics(ECE_P, ECE_Y, n_bootstrap=0)
    assert r["ece"] == pytest.approx((2 * 0.4 + 0.38 + 0.5 + 0.58) / 5)
    assert r["reliability"]["count"][13] == 2 and sum(r["reliability"]["count"]) == 5
    assert r["reliability"]["accuracy"][13] == pytest.approx(0.5)
    assert r["reliability"]["confidence"][13] == pytest.approx(0.9)
    assert r["reliability"]["accuracy"][0] is None  # an empty bin has no accuracy
    # One bin: |accuracy 3/5 - mean confidence 3.34/5|, the bins no longer cancel differently.
    assert compute_metrics(ECE_P, ECE_Y, n_bootstrap=0, n_bins=1)["ece"] == pytest.approx(abs(0.6 - 0.668))


def test_ece_bin_edges_are_upper_inclusive():
    # conf exactly 0.6 = 9/15 belongs to bin (0.533, 0.6] (Guo et al.), not the next one.
    r = compute_metrics(np.array([[0.6, 0.3, 0.1]]), np.array([0]), n_bootstrap=0)
    assert r["reliability"]["count"][8] == 1
    assert r["ece"] == pytest.approx(0.4)


def test_brier_hand_computed():
    # Row sums of (p - onehot)^2: 0.015, 1.715, 0.2168, 0.78, 0.5078.
    r = compute_metrics(ECE_P, ECE_Y, n_bootstrap=0)
    assert r["brier"] == pytest.approx((0.015 + 1.715 + 0.2168 + 0.78 + 0.5078) / 5)
    perfect = compute_metrics(np.eye(3), np.arange(3), n_bootstrap=0)
    assert perfect["brier"] == 0 and perfect["ece"] == 0 and perfect["accuracy"] == 1
    worst = compute_metrics(np.eye(3), np.array([1, 2, 0]), n_bootstrap=0)
    assert worst["brier"] == pytest.approx(2.0)  # the multiclass Brier's maximum


def test_result_is_plain_json():
    p, y = synthetic(120, seed=3)
    r = compute_metrics(p, y, [f"p{i // 2}" for i in range(120)], n_bootstrap=50)

    def walk(x):
        assert type(x) in (dict, list, str, int, float, bool, type(None)), type(x)
        for v in x.values() if isinstance(x, dict) else x if isinstance(x, list) else ():
            walk(v)

    walk(r)
    assert json.loads(json.dumps(r, allow_nan=False)) == r


def test_accepts_lists_and_torch_tensors():
    torch = pytest.importorskip("torch")
    p, y = synthetic(80, seed=4)
    ref = compute_metrics(p, y, n_bootstrap=20)
    assert compute_metrics(p.tolist(), y.tolist(), n_bootstrap=20) == ref
    # float32 softmax on the tensor: same argmax, metrics equal up to float32 rounding
    t = compute_metrics(torch.tensor(p, dtype=torch.float32, requires_grad=True), torch.tensor(y), n_bootstrap=20)
    assert t["confusion_matrix"] == ref["confusion_matrix"]
    assert t["binary"]["auc"] == pytest.approx(ref["binary"]["auc"], abs=1e-6)


# --- loading ------------------------------------------------------------------------------------


def test_module_is_self_contained():
    """evaluate copies the file alone into its cache: it cannot import the project."""
    tree = ast.parse(METRIC_PATH.read_text())
    imported = {
        (n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    assert imported <= {"__future__", "math", "numbers", "numpy", "scipy", "sklearn", "datasets", "evaluate"}


@pytest.mark.parametrize("form", ["file", "folder"])
def test_loads_by_path_offline_from_another_cwd(form, tmp_path, monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    path = METRIC_PATH if form == "file" else METRIC_PATH.parent
    metric = evaluate.load(str(path), keep_in_memory=True)
    r = metric.compute(predictions=ECE_P, references=ECE_Y, n_bootstrap=0)
    assert r["accuracy"] == pytest.approx(3 / 5)
    assert r["brier"] == pytest.approx(3.2346 / 5)


def test_loads_in_a_fresh_process_with_no_hub_and_an_empty_module_cache(tmp_path):
    """The strict version: a new interpreter, another cwd, a dead HF_ENDPOINT and an empty evaluate
    module cache, so nothing can come from the network or from an earlier copy."""
    code = (
        "import evaluate, sys; m = evaluate.load(sys.argv[1]); "
        "print(m.compute(predictions=[[.8,.1,.1],[.1,.7,.2],[.2,.2,.6]], references=[0,1,2],"
        " n_bootstrap=10)['accuracy'])"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
    }
    out = subprocess.run(
        [sys.executable, "-c", code, str(METRIC_PATH.parent)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1.0"


def test_load_metric_is_cached():
    assert load_metric() is load_metric()


# --- bootstrap ----------------------------------------------------------------------------------


def test_weighted_stats_equal_sklearn_on_explicit_resamples():
    """A resample is the rows repeated by their integer weights: the vectorised weighted formulas must
    give exactly scikit-learn's numbers on the repeated rows (AUC ties included)."""
    mod = _module()
    p, y = synthetic(60, seed=7, signal=1.0)
    p = np.round(p, 2)
    p /= p.sum(axis=1, keepdims=True)
    ev = mod._Evaluator(p, y, 0.5, 15, LABELS)
    w = np.random.default_rng(0).integers(0, 3, size=(4, len(y))).astype(float)
    stats = ev.stats(w)
    for b in range(len(w)):
        rows = np.repeat(np.arange(len(y)), w[b].astype(int))
        ref = sklearn_reference(p[rows], y[rows], 0.5)
        for key, want in ref.items():
            if key in stats:
                assert stats[key][b] == pytest.approx(float(want), abs=1e-12), (b, key)
        assert stats["_cm"][b].tolist() == ref["confusion_matrix"]


def test_resample_weights_draw_whole_groups():
    mod = _module()
    group_index = np.array([0, 0, 0, 1, 2, 2, 3])
    w = mod._resample_weights(np.random.default_rng(1), group_index, 4, 500)
    assert w.shape == (500, 7)
    # all rows of a group share the group's count; the group counts add up to the number of groups
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 1] == w[:, 2]).all() and (w[:, 4] == w[:, 5]).all()
    assert (w[:, [0, 3, 4, 6]].sum(axis=1) == 4).all()
    # each group is drawn once per resample on average
    assert w[:, [0, 3, 4, 6]].mean(axis=0) == pytest.approx([1, 1, 1, 1], abs=0.15)


def ci_width(r, key):
    low, high = r["ci"][key]
    return high - low


CI_KEYS = [
    "accuracy",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "per_class.normal.f1",
    "per_class.viral_pneumonia.f1",
    "per_class.bacterial_pneumonia.recall",
    "auc_ovr_macro",
    "auc_per_class.viral_pneumonia",
    "brier",
    "nll",
    "binary.auc",
    "binary.sensitivity",
    "binary.specificity",
    "binary.ppv",
    "binary.npv",
    "binary.f1",
    "binary.accuracy",
]


def test_intervals_contain_the_point_estimate_and_are_described():
    p, y = synthetic(624, seed=0)
    groups = [f"patient{i // 3}" for i in range(624)]
    r = compute_metrics(p, y, groups, n_bootstrap=1000, seed=0)
    for key in CI_KEYS:
        low, high = r["ci"][key]
        assert low < get(r, key) < high, key
    # ECE is biased upward under resampling (noise adds miscalibration), so its percentile interval
    # need not contain the point estimate; only its presence and order are checked.
    assert r["ci"]["ece"][0] < r["ci"]["ece"][1]
    assert r["n_groups"] == 208 and r["ci_resamples_used"] == {}
    for words in ("percentile bootstrap", "1000 resamples", "patient group (208 groups)", "95%"):
        assert words in r["ci_method"]


def test_intervals_are_deterministic_for_a_seed():
    p, y = synthetic(150, seed=1)
    a = compute_metrics(p, y, n_bootstrap=200, seed=3)
    assert compute_metrics(p, y, n_bootstrap=200, seed=3) == a
    assert compute_metrics(p, y, n_bootstrap=200, seed=4)["ci"] != a["ci"]


def test_grouped_resampling_is_wider_when_rows_of_a_patient_are_copies():
    """Five identical images per patient carry the information of one: resampling patients keeps the
    interval of the 100 originals, resampling rows pretends there are 500 and is ~sqrt(5) narrower."""
    p, y = synthetic(100, seed=2, signal=1.0)
    p5, y5 = np.repeat(p, 5, axis=0), np.repeat(y, 5)
    groups = [str(i) for i in np.repeat(np.arange(100), 5)]
    grouped = compute_metrics(p5, y5, groups, n_bootstrap=1000)
    rows = compute_metrics(p5, y5, None, n_bootstrap=1000)
    original = compute_metrics(p, y, None, n_bootstrap=1000)
    assert grouped["accuracy"] == rows["accuracy"] == original["accuracy"]
    for key in ("accuracy", "macro_f1", "binary.auc", "binary.sensitivity", "brier"):
        assert ci_width(grouped, key) > 1.6 * ci_width(rows, key), key
        assert ci_width(grouped, key) == pytest.approx(ci_width(original, key), rel=0.3), key
    assert "row (500 rows; no groups given)" in rows["ci_method"]


def test_intervals_narrow_with_more_data():
    small = compute_metrics(*synthetic(150, seed=8), n_bootstrap=500)
    large = compute_metrics(*synthetic(1500, seed=8), n_bootstrap=500)
    for key in ("accuracy", "macro_f1", "auc_ovr_macro", "binary.sensitivity", "ece", "brier"):
        assert ci_width(large, key) < 0.6 * ci_width(small, key), key


def test_resamples_without_a_class_are_skipped_for_its_auc_and_counted():
    p, y = synthetic(40, seed=9, classes=(0, 1))
    y[0] = 2  # one viral image: about a third of the resamples miss it
    r = compute_metrics(p, y, n_bootstrap=300)
    used = r["ci_resamples_used"]
    assert 50 < used["auc_per_class.viral_pneumonia"] < 300
    assert used["auc_ovr_macro"] == used["auc_per_class.viral_pneumonia"]
    assert "accuracy" not in used and "binary.auc" not in used
    assert r["ci"]["auc_per_class.viral_pneumonia"] is not None


# --- degenerate and bad inputs ------------------------------------------------------------------


def test_class_absent_from_references_gives_none_auc_not_a_crash():
    p, y = synthetic(90, seed=6, classes=(0, 1))  # no viral image at all
    r = compute_metrics(p, y, n_bootstrap=100)
    assert r["auc_per_class"]["viral_pneumonia"] is None
    assert r["auc_ovr_macro"] is None  # like sklearn, which refuses a macro AUC then
    assert r["per_class"]["viral_pneumonia"]["support"] == 0
    assert r["per_class"]["viral_pneumonia"]["recall"] == 0.0  # zero_division=0, as sklearn
    assert r["ci"]["auc_per_class.viral_pneumonia"] is None
    assert r["ci_resamples_used"]["auc_per_class.viral_pneumonia"] == 0
    assert r["ci"]["auc_per_class.normal"] is not None
    assert_matches_sklearn(r, p, y, 0.5)
    json.dumps(r, allow_nan=False)


def test_only_normal_images():
    p, _ = synthetic(10, seed=1)
    r = compute_metrics(p, np.zeros(10, dtype=int), n_bootstrap=20)
    assert r["binary"]["auc"] is None and r["binary"]["sensitivity"] == 0.0
    assert r["ci"]["binary.auc"] is None


GOOD_P = [[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.2, 0.2, 0.6]]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"probs": [[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]]}, r"shape \(n, 3\).*got shape \(3, 2\)"),
        ({"probs": [0.5, 0.3, 0.2]}, r"shape \(n, 3\)"),
        ({"probs": [[0.8, 0.3, 0.1], [0.1, 0.7, 0.2], [0.2, 0.2, 0.6]]}, r"sum to 1.*row 0 sums to 1\.2"),
        ({"probs": [[2.0, -1.5, 0.5], [0.1, 0.7, 0.2], [0.2, 0.2, 0.6]]}, r"probabilities in \[0, 1\].*softmax"),
        ({"probs": [[np.nan, 0.5, 0.5], [0.1, 0.7, 0.2], [0.2, 0.2, 0.6]]}, "NaN"),
        ({"labels": [0, 1, 3]}, r"labels in 0\.\.2.*\[0, 1, 3\]"),
        ({"labels": [-1, 1, 2]}, r"labels in 0\.\.2"),
        ({"labels": [0, 1]}, r"number of predictions \(3\) and references \(2\)"),
        ({"groups": ["a", "b"]}, r"groups must have one patient id per prediction row \(3\), got 2"),
        ({"threshold": 0.0}, r"threshold must be a number in \(0, 1\)"),
        ({"threshold": 1.0}, r"threshold must be a number in \(0, 1\)"),
        ({"threshold": 1.5}, r"threshold must be a number in \(0, 1\)"),
        ({"n_bootstrap": -1}, "n_bootstrap must be an integer >= 0"),
        ({"n_bins": 0}, "n_bins must be an integer >= 1"),
    ],
)
def test_bad_inputs_raise_value_error_that_says_why(kwargs, message):
    args = {"probs": GOOD_P, "labels": [0, 1, 2], "groups": None, **kwargs}
    extra = {k: v for k, v in args.items() if k not in ("probs", "labels", "groups")}
    with pytest.raises(ValueError, match=message):
        compute_metrics(args["probs"], args["labels"], args["groups"], **extra)


def test_bad_input_through_evaluate_directly():
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        load_metric().compute(predictions=[[0.5, 0.5]] * 3, references=[0, 1, 2])
    # the shared instance is still usable after a failed compute
    assert load_metric().compute(predictions=GOOD_P, references=[0, 1, 2], n_bootstrap=0)["n"] == 3


# --- summary and plots --------------------------------------------------------------------------


def test_format_summary():
    p, y = synthetic(200, seed=0)
    r = compute_metrics(p, y, [str(i // 2) for i in range(200)], n_bootstrap=100)
    text = format_summary(r)
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "value", "95%", "CI"]
    acc = next(line for line in lines if line.startswith("accuracy"))
    low, high = r["ci"]["accuracy"]
    assert f"{r['accuracy']:.3f}" in acc and f"[{low:.3f}, {high:.3f}]" in acc
    assert "sensitivity @ 0.5" in text and "F1 viral_pneumonia" in text
    assert "n = 200 images, 100 groups" in lines[-1]
    no_ci = format_summary(compute_metrics(p, y, n_bootstrap=0))
    assert "[" not in no_ci
    absent = format_summary(compute_metrics(*synthetic(30, seed=1, classes=(0, 1)), n_bootstrap=0))
    assert "n/a" in absent  # the undefined macro AUC


def _assert_png(path: Path):
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 300
        im.verify()


def test_save_plots_writes_valid_pngs_and_leaks_no_figures(tmp_path):
    import matplotlib.pyplot as plt

    from modeling.plots import save_plots

    before = plt.get_fignums()
    p, y = synthetic(300, seed=0)
    paths = save_plots(p, y, tmp_path / "plots", threshold=0.4, title_prefix="test split")
    assert set(paths) == {"confusion_matrix", "roc", "reliability"}
    for name, path in paths.items():
        assert path == tmp_path / "plots" / f"{name}.png"
        _assert_png(path)
    assert plt.get_fignums() == before


def test_each_plot_alone_and_with_an_absent_class(tmp_path):
    from modeling.plots import plot_confusion_matrix, plot_reliability, plot_roc

    p, y = synthetic(60, seed=1, classes=(0, 1))
    _assert_png(plot_confusion_matrix(p, y, tmp_path / "cm.png"))
    _assert_png(plot_roc(p, y, tmp_path / "roc.png", threshold=0.7))
    _assert_png(plot_reliability(p, y, tmp_path / "rel.png", n_bins=10))


def test_agreement_counts_probability_differences_label_and_call_changes():
    from modeling.metrics import agreement

    a = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    b = np.array([[0.69, 0.21, 0.1], [0.2, 0.3, 0.5], [0.45, 0.1, 0.45]])
    out = agreement(a, b, threshold=0.6)
    assert out["n"] == 3 and out["max_abs_prob_diff"] == pytest.approx(0.35)
    assert out["label_changes"] == 2 and out["pneumonia_call_changes"] == 1  # row 3: 0.9 -> 0.55
    assert "pneumonia_call_changes" not in agreement(a, b)
    with pytest.raises(ValueError, match="same shape"):
        agreement(a, b[:2])
