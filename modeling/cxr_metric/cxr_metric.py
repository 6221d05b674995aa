# Copyright the cxr-pneumonia authors. Licensed under the Apache License, Version 2.0.
"""cxr_metric: the evaluation of the pediatric chest X-ray pneumonia triage model, as one
``evaluate`` module, with patient-grouped bootstrap confidence intervals.

Why a local module: ``evaluate.load("accuracy")`` downloads scripts from the Hub, which is not
reachable where this project trains and tests, and the Hub's metrics know nothing of patients,
calibration or the normal-vs-pneumonia view. This file is loaded by path::

    evaluate.load("/abs/path/modeling/cxr_metric/cxr_metric.py")   # or the folder

``evaluate`` copies this single file into its module cache and imports it from there, so it must stay
self-contained: it imports numpy, scipy, scikit-learn, datasets and evaluate only, never the project's
``modeling`` package. Class order is the project's (``modeling/labels.py``): 0 normal,
1 bacterial_pneumonia, 2 viral_pneumonia.

Why one vectorised code path: a cluster bootstrap resample is the original rows with an integer
weight per row (how many times its patient group was drawn). Every metric here is computed from a
weight matrix ``W`` (resamples x rows); the point estimate is the single row of ones. Confusion
matrices and calibration bins are then matrix products and AUCs are weighted Mann-Whitney sums over
one pre-sorted order, so 1000 resamples of 624 rows take well under a second, and the point
estimate and the bootstrap can never disagree on a definition.
"""

from __future__ import annotations

import math
import numbers

import datasets
import evaluate
import numpy as np

_CITATION = """\
@inproceedings{guo2017calibration,
  title     = {On Calibration of Modern Neural Networks},
  author    = {Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.},
  booktitle = {Proceedings of the 34th International Conference on Machine Learning},
  year      = {2017}
}
@article{brier1950verification,
  title   = {Verification of forecasts expressed in terms of probability},
  author  = {Brier, Glenn W.},
  journal = {Monthly Weather Review},
  volume  = {78},
  number  = {1},
  pages   = {1--3},
  year    = {1950}
}
@book{efron1993introduction,
  title     = {An Introduction to the Bootstrap},
  author    = {Efron, Bradley and Tibshirani, Robert J.},
  publisher = {Chapman and Hall/CRC},
  year      = {1993}
}
@article{kermany2018identifying,
  title   = {Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep Learning},
  author  = {Kermany, Daniel S. and others},
  journal = {Cell},
  volume  = {172},
  number  = {5},
  pages   = {1122--1131},
  year    = {2018}
}
"""

_DESCRIPTION = """\
Evaluation of a 3-class chest X-ray classifier (normal, bacterial pneumonia, viral pneumonia) from its
calibrated class probabilities, plus the clinically common normal-vs-pneumonia view (pneumonia
probability = p[bacterial] + p[viral], pneumonia truth = label != normal) at a decision threshold.

Point metrics: accuracy; per-class and macro precision, recall, F1 (argmax prediction); the confusion
matrix; one-vs-rest ROC AUC per class and their macro mean; expected calibration error (ECE, Guo et
al. 2017: equal-width bins on the top-label confidence, |accuracy - confidence| weighted by the bin's
share of rows); the multiclass Brier score; the negative log-likelihood; and, for normal vs
pneumonia, AUC, accuracy, sensitivity, specificity, PPV, NPV, F1 and the 2x2 confusion matrix.

Confidence intervals: percentile bootstrap, resampling whole patient groups (cluster bootstrap), so
several images of one child count as one draw and the intervals are not too narrow.

Conventions (the numbers match scikit-learn's on the same inputs):
- a ratio whose denominator is empty (precision of a never-predicted class, recall of an absent class,
  sensitivity with no pneumonia case...) is 0, as scikit-learn's default zero_division;
- an AUC is undefined (None) when its positive or its negative class is absent; the macro AUC is
  None when any class AUC is (scikit-learn refuses to compute it then). Bootstrap resamples where a
  metric is undefined are skipped for that metric and ``ci_resamples_used`` says how many were used;
- the Brier score is the multiclass one, mean over rows of sum over the 3 classes of
  (p - onehot)^2, in [0, 2] (scikit-learn's ``brier_score_loss`` with ``scale_by_half=False``);
  it is NOT the binary Brier score of the pneumonia probability;
- binary.auc equals auc_per_class.normal: with rows summing to 1, p1 + p2 = 1 - p0 ranks the rows
  exactly as p0 does in reverse; both are reported because readers look for each under its name;
- the NLL clips probabilities to [eps, 1 - eps] (float64 eps) like scikit-learn's ``log_loss``.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one row of 3 class probabilities per image, in the
        order normal, bacterial_pneumonia, viral_pneumonia. Rows must sum to 1 (within 1e-3) and lie
        in [0, 1]: pass calibrated softmax outputs, not logits.
    references (`list` of `int`): the true class per image, in 0..2.
    groups (`list` of `str`, optional): patient id per image, the bootstrap's resampling unit.
        Default None: each image is its own group (only right when every patient has one image).
    threshold (`float`, default 0.5): pneumonia is predicted when p[1] + p[2] >= threshold; in (0, 1).
    n_bootstrap (`int`, default 1000): number of bootstrap resamples; 0 computes no intervals.
    seed (`int`, default 0): seed of the bootstrap's random generator (intervals are deterministic).
    n_bins (`int`, default 15): number of equal-width confidence bins of the ECE.
    label_names (`tuple` of 3 `str`): names used as keys of the per-class results.
    confidence (`float`, default 0.95): coverage of the percentile intervals.

Returns:
    A JSON-serialisable dict (plain floats, ints, lists, None):
    n, n_groups, accuracy, macro_precision, macro_recall, macro_f1,
    per_class {name: {precision, recall, f1, support}},
    confusion_matrix (rows = true class, columns = argmax prediction),
    auc_ovr_macro, auc_per_class {name: one-vs-rest AUC or None},
    ece, brier, nll,
    reliability {bin_edges, count, accuracy, confidence} (the bins of the ECE; empty bins are None),
    binary {threshold, auc, accuracy, sensitivity, specificity, ppv, npv, f1,
            confusion_matrix [[tn, fp], [fn, tp]]},
    and when n_bootstrap > 0: ci {dotted metric name: [low, high] or None}, e.g. "accuracy",
    "per_class.viral_pneumonia.f1", "binary.sensitivity", "auc_ovr_macro"; ci_method (a sentence);
    ci_resamples_used {dotted name: resamples used} for the metrics where some were skipped.

Examples:
    >>> import evaluate
    >>> cxr = evaluate.load("modeling/cxr_metric/cxr_metric.py")  # from the repo root; else an absolute path
    >>> r = cxr.compute(predictions=[[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.2, 0.2, 0.6]],
    ...                 references=[0, 1, 2], n_bootstrap=0)
    >>> r["accuracy"], r["binary"]["sensitivity"]
    (1.0, 1.0)
"""

LABEL_NAMES = ("normal", "bacterial_pneumonia", "viral_pneumonia")
N_CLASSES = 3
SUM_TOLERANCE = 1e-3  # float16/float32 softmax rows are within this of 1
BATCH = 250  # bootstrap resamples per matrix product: bounds memory to BATCH x n floats


def _finite(x):
    """Python float, or None for NaN (JSON has no NaN)."""
    x = float(x)
    return None if math.isnan(x) else x


def _ratio(num, den):
    """num / den elementwise, 0 where den == 0 (scikit-learn's zero_division=0 convention)."""
    out = np.zeros_like(num, dtype=float)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _ratio_nan(num, den):
    """num / den elementwise, NaN where den == 0 (an empty reliability bin has no accuracy)."""
    out = np.full_like(num, np.nan, dtype=float)
    np.divide(num, den, out=out, where=den > 0)
    return out


class _AUC:
    """Weighted ROC AUC of one score against one binary truth, for many weight vectors at once.

    AUC = P(score of a positive > score of a negative) + 0.5 P(tie) (Mann-Whitney; equal to the
    trapezoidal area scikit-learn computes). With integer row weights (a bootstrap resample) it equals
    the AUC of the resample with rows repeated, so the rows are sorted once here and each resample only
    needs a cumulative sum.
    """

    def __init__(self, score, positive):
        order = np.argsort(score, kind="stable")
        s = score[order]
        self.order = order
        self.pos = positive[order].astype(float)
        n = len(s)
        # For each sorted position: start and end (exclusive) of its block of tied scores.
        new_block = np.r_[True, s[1:] != s[:-1]]
        starts = np.flatnonzero(new_block)
        ends = np.r_[starts[1:], n]
        block = np.cumsum(new_block) - 1
        self.start, self.end = starts[block], ends[block]

    def __call__(self, w):
        ws = w[:, self.order]
        wpos = ws * self.pos
        wneg = ws - wpos
        cneg = np.concatenate([np.zeros((len(w), 1)), np.cumsum(wneg, axis=1)], axis=1)
        below = cneg[:, self.start]
        tied = cneg[:, self.end] - below
        num = np.sum(wpos * (below + 0.5 * tied), axis=1)
        den = wpos.sum(axis=1) * wneg.sum(axis=1)
        auc = np.full(len(w), np.nan)
        np.divide(num, den, out=auc, where=den > 0)
        return auc


class _Evaluator:
    """Everything about the rows that does not depend on the resample, precomputed once."""

    def __init__(self, probs, labels, threshold, n_bins, names):
        self.names = names
        self.n_bins = n_bins
        k = N_CLASSES
        pred = probs.argmax(axis=1)
        self.cells = np.eye(k * k)[labels * k + pred]  # n x 9: one-hot (true, pred) cell
        pneu_true = labels != 0
        pneu_prob = probs[:, 1] + probs[:, 2]
        pneu_pred = pneu_prob >= threshold
        self.bcells = np.eye(4)[pneu_true * 2 + pneu_pred]  # n x 4: tn, fp, fn, tp
        conf = probs.max(axis=1)
        correct = (pred == labels).astype(float)
        self.edges = np.linspace(0.0, 1.0, n_bins + 1)
        # Bin i holds edges[i] < conf <= edges[i+1] (Guo et al.); conf >= 1/3 > 0 here.
        bins = np.clip(np.searchsorted(self.edges, conf, side="left") - 1, 0, n_bins - 1)
        onehot = np.eye(n_bins)[bins]
        self.rel = np.concatenate([onehot, onehot * conf[:, None], onehot * correct[:, None]], axis=1)
        onehot_true = np.eye(k)[labels]
        eps = np.finfo(np.float64).eps
        self.row_losses = np.stack(
            [
                np.sum((probs - onehot_true) ** 2, axis=1),  # multiclass Brier
                -np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1 - eps)),  # NLL
            ],
            axis=1,
        )
        self.aucs = [_AUC(probs[:, c], labels == c) for c in range(k)]
        self.binary_auc = _AUC(pneu_prob, pneu_true)

    def stats(self, w):
        """Flat dict of every scalar metric (dotted name -> array over resamples), plus the
        confusion matrices and reliability sums under keys starting with '_'."""
        k, names = N_CLASSES, self.names
        total = w.sum(axis=1)
        cm = (w @ self.cells).reshape(-1, k, k)
        tp = np.diagonal(cm, axis1=1, axis2=2)
        support, predicted = cm.sum(axis=2), cm.sum(axis=1)
        precision, recall = _ratio(tp, predicted), _ratio(tp, support)
        f1 = _ratio(2 * tp, predicted + support)
        out = {
            "accuracy": tp.sum(axis=1) / total,
            "macro_precision": precision.mean(axis=1),
            "macro_recall": recall.mean(axis=1),
            "macro_f1": f1.mean(axis=1),
        }
        for c, name in enumerate(names):
            out[f"per_class.{name}.precision"] = precision[:, c]
            out[f"per_class.{name}.recall"] = recall[:, c]
            out[f"per_class.{name}.f1"] = f1[:, c]
        aucs = np.stack([auc(w) for auc in self.aucs], axis=1)
        for c, name in enumerate(names):
            out[f"auc_per_class.{name}"] = aucs[:, c]
        out["auc_ovr_macro"] = aucs.mean(axis=1)  # NaN when any class AUC is undefined
        rel = w @ self.rel
        nb = self.n_bins
        count, conf_sum, correct_sum = rel[:, :nb], rel[:, nb : 2 * nb], rel[:, 2 * nb :]
        out["ece"] = np.abs(correct_sum - conf_sum).sum(axis=1) / total
        losses = (w @ self.row_losses) / total[:, None]
        out["brier"], out["nll"] = losses[:, 0], losses[:, 1]
        tn, fp, fn, tp2 = (w @ self.bcells).T
        out["binary.auc"] = self.binary_auc(w)
        out["binary.accuracy"] = (tn + tp2) / total
        out["binary.sensitivity"] = _ratio(tp2, tp2 + fn)
        out["binary.specificity"] = _ratio(tn, tn + fp)
        out["binary.ppv"] = _ratio(tp2, tp2 + fp)
        out["binary.npv"] = _ratio(tn, tn + fn)
        out["binary.f1"] = _ratio(2 * tp2, 2 * tp2 + fp + fn)
        out["_cm"], out["_bcm"] = cm, np.stack([tn, fp, fn, tp2], axis=1).reshape(-1, 2, 2)
        out["_rel"] = (count, conf_sum, correct_sum)
        return out


def _validate(predictions, references, groups, threshold, n_bootstrap, n_bins, label_names, confidence):
    """Arrays from the inputs, or a ValueError that says what is wrong and how to fix it."""
    try:
        probs = np.asarray(predictions, dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise ValueError(f"predictions must be rows of {N_CLASSES} probabilities of equal length: {e}") from None
    if probs.ndim != 2 or probs.shape[1] != N_CLASSES:
        raise ValueError(
            f"predictions must have shape (n, {N_CLASSES}) (one probability per class: "
            f"{', '.join(LABEL_NAMES)}), got shape {probs.shape}"
        )
    n = probs.shape[0]
    if n == 0:
        raise ValueError("predictions and references are empty: nothing to evaluate")
    if not np.all(np.isfinite(probs)):
        raise ValueError("predictions contain NaN or infinite values")
    if probs.min() < -SUM_TOLERANCE or probs.max() > 1 + SUM_TOLERANCE:
        raise ValueError(
            f"predictions must be probabilities in [0, 1], got values in [{probs.min():.4g}, {probs.max():.4g}] "
            "(logits? apply softmax first)"
        )
    probs = np.clip(probs, 0.0, 1.0)
    sums = probs.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1) > SUM_TOLERANCE)
    if len(bad):
        raise ValueError(
            f"predictions rows must sum to 1 (within {SUM_TOLERANCE}); {len(bad)} rows do not, "
            f"e.g. row {bad[0]} sums to {sums[bad[0]]:.6g} (apply softmax first)"
        )
    labels = np.asarray(references)
    if labels.shape != (n,):
        raise ValueError(f"references must have one label per prediction row ({n}), got shape {labels.shape}")
    if labels.dtype.kind == "f" and np.all(labels == np.round(labels)):
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= N_CLASSES:
        raise ValueError(
            f"references must be integer labels in 0..{N_CLASSES - 1} ({', '.join(LABEL_NAMES)}), "
            f"got values {sorted(set(np.unique(labels).tolist()))[:10]}"
        )
    labels = labels.astype(np.int64)
    if groups is None:
        group_index, n_groups = np.arange(n), n
    else:
        groups = np.asarray(groups, dtype=object)
        if groups.shape != (n,):
            got = groups.shape[0] if groups.ndim else "a scalar"
            raise ValueError(f"groups must have one patient id per prediction row ({n}), got {got}")
        _, group_index = np.unique(groups.astype(str), return_inverse=True)
        group_index = group_index.reshape(-1)
        n_groups = int(group_index.max()) + 1
    if not (isinstance(threshold, numbers.Real) and 0 < threshold < 1):
        raise ValueError(f"threshold must be a number in (0, 1) (exclusive), got {threshold!r}")
    if not (isinstance(n_bootstrap, numbers.Integral) and n_bootstrap >= 0):
        raise ValueError(f"n_bootstrap must be an integer >= 0 (0 = no intervals), got {n_bootstrap!r}")
    if not (isinstance(n_bins, numbers.Integral) and n_bins >= 1):
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    if len(label_names) != N_CLASSES or len(set(label_names)) != N_CLASSES:
        raise ValueError(f"label_names must be {N_CLASSES} distinct names, got {label_names!r}")
    if not (isinstance(confidence, numbers.Real) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return probs, labels, group_index, n_groups


def _resample_weights(rng, group_index, n_groups, b):
    """b x n row weights of b cluster-bootstrap resamples: draw n_groups groups with replacement;
    a row's weight is how many times its group was drawn (all rows of a drawn group come along)."""
    draws = rng.integers(0, n_groups, size=(b, n_groups))
    offsets = (np.arange(b) * n_groups)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=b * n_groups).reshape(b, n_groups)
    return counts[:, group_index].astype(float)


def _bootstrap(ev, group_index, n_groups, n_bootstrap, seed):
    """Replicates of every scalar metric: resample the n_groups patient groups with replacement
    (n_groups draws), give each row the number of times its group was drawn."""
    rng = np.random.default_rng(seed)
    reps = {}
    for start in range(0, n_bootstrap, BATCH):
        stats = ev.stats(_resample_weights(rng, group_index, n_groups, min(BATCH, n_bootstrap - start)))
        for name, v in stats.items():
            if not name.startswith("_"):
                reps.setdefault(name, []).append(v)
    return {name: np.concatenate(v) for name, v in reps.items()}


def _nest(flat):
    """{"a.b.c": v} -> {"a": {"b": {"c": v}}}."""
    out = {}
    for key, v in flat.items():
        *parents, leaf = key.split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = v
    return out


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CxrMetric(evaluate.Metric):
    """Accuracy, per-class and macro P/R/F1, AUCs, calibration (ECE, Brier, NLL), the
    normal-vs-pneumonia operating point, and patient-grouped bootstrap intervals for each."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=[
                "https://arxiv.org/abs/1706.04599",
                "https://scikit-learn.org/stable/modules/model_evaluation.html",
            ],
        )

    def _compute(
        self,
        predictions,
        references,
        groups=None,
        threshold=0.5,
        n_bootstrap=1000,
        seed=0,
        n_bins=15,
        label_names=LABEL_NAMES,
        confidence=0.95,
    ):
        label_names = tuple(label_names)
        probs, labels, group_index, n_groups = _validate(
            predictions, references, groups, threshold, n_bootstrap, n_bins, label_names, confidence
        )
        ev = _Evaluator(probs, labels, float(threshold), int(n_bins), label_names)
        point = ev.stats(np.ones((1, len(labels))))
        flat = {name: _finite(v[0]) for name, v in point.items() if not name.startswith("_")}
        cm = point["_cm"][0].round().astype(int)
        count, conf_sum, correct_sum = (x[0] for x in point["_rel"])
        nested = _nest(flat)
        for c, name in enumerate(label_names):
            nested["per_class"][name]["support"] = int(cm[c].sum())
        result = {
            "n": int(len(labels)),
            "n_groups": int(n_groups),
            **{k: nested[k] for k in ("accuracy", "macro_precision", "macro_recall", "macro_f1")},
            "per_class": nested["per_class"],
            "confusion_matrix": cm.tolist(),
            "auc_ovr_macro": nested["auc_ovr_macro"],
            "auc_per_class": nested["auc_per_class"],
            "ece": nested["ece"],
            "brier": nested["brier"],
            "nll": nested["nll"],
            "reliability": {
                "bin_edges": ev.edges.tolist(),
                "count": count.round().astype(int).tolist(),
                "accuracy": [_finite(a) for a in _ratio_nan(correct_sum, count)],
                "confidence": [_finite(c) for c in _ratio_nan(conf_sum, count)],
            },
            "binary": {
                "threshold": float(threshold),
                **nested["binary"],
                "confusion_matrix": point["_bcm"][0].round().astype(int).tolist(),
            },
        }
        if n_bootstrap:
            reps = _bootstrap(ev, group_index, n_groups, int(n_bootstrap), seed)
            alpha = (1 - confidence) / 2
            ci, used = {}, {}
            for name, v in reps.items():
                ok = v[~np.isnan(v)]
                if len(ok) < len(v):
                    used[name] = int(len(ok))
                ci[name] = [float(q) for q in np.quantile(ok, [alpha, 1 - alpha])] if len(ok) else None
            if groups is not None:
                unit = f"patient group ({n_groups} groups)"
            else:
                unit = f"row ({n_groups} rows; no groups given)"
            result["ci"] = ci
            result["ci_method"] = (
                f"percentile bootstrap, {int(n_bootstrap)} resamples, resampling unit = {unit}, "
                f"{confidence:.0%} interval, seed {seed}"
            )
            result["ci_resamples_used"] = used
        return result

