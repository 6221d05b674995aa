"""The project's evaluation API: one call from model probabilities to every reported number.

The definitions live in the ``evaluate`` module ``modeling/cxr_metric/cxr_metric.py`` (see its
docstring for every metric, convention and the patient-grouped bootstrap). This file only loads it
*by absolute path* (``evaluate.load("accuracy")``-style names go to the Hub, which is unreachable here;
a relative path would depend on the working directory), converts arrays and tensors, and formats the
result for logs and the README, so training, the model card and the Space all report the same numbers.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from modeling.labels import LABELS

METRIC_PATH = Path(__file__).resolve().parent / "cxr_metric" / "cxr_metric.py"


@functools.lru_cache(maxsize=1)
def load_metric():
    """The ``cxr_metric`` evaluate module, loaded once per process from its file path.

    ``keep_in_memory=True``: the rows of one ``compute`` are not written to evaluate's on-disk cache
    (nothing to lock or clean up). The instance is shared, so do not call ``compute`` on it from
    several threads at once.
    """
    import evaluate

    return evaluate.load(str(METRIC_PATH), keep_in_memory=True)


def _to_numpy(x: Any) -> np.ndarray:
    """numpy array from a numpy array, a list, or a torch tensor (on any device, with grad)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def compute_metrics(
    probs: Any,
    labels: Any,
    groups: Any = None,
    *,
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
    n_bins: int = 15,
) -> dict:
    """Every evaluation metric of (n, 3) class probabilities against labels 0..2, with patient-grouped
    bootstrap intervals when ``n_bootstrap > 0``.

    ``groups`` are patient ids (one per row): pass them whenever a patient can have several images,
    otherwise the intervals are too narrow. Returns the module's JSON-serialisable dict (keys listed in
    ``modeling/cxr_metric/cxr_metric.py``); ``format_summary`` renders it.
    """
    p = _to_numpy(probs).astype(np.float64)
    y = _to_numpy(labels)
    if p.ndim != 2 or p.shape[1] != len(LABELS):
        # Checked here too: evaluate's own message for a 1-D input does not say what shape is wanted.
        raise ValueError(f"probs must have shape (n, {len(LABELS)}) ({', '.join(LABELS)}), got shape {p.shape}")
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (one class id per row), got shape {y.shape}")
    g = None if groups is None else [str(v) for v in _to_numpy(groups).reshape(-1).tolist()]
    return load_metric().compute(
        predictions=p,
        references=y.astype(np.int64) if y.dtype.kind in "iub" else y,
        groups=g,
        threshold=threshold,
        n_bootstrap=n_bootstrap,
        seed=seed,
        n_bins=n_bins,
        label_names=LABELS,
    )


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def format_summary(metrics: dict) -> str:
    """A short text table (metric, value, CI) of the headline numbers, for logs and the README.

    Without intervals (``n_bootstrap=0``) the CI column is left empty.
    """
    ci = metrics.get("ci", {})
    b = metrics["binary"]
    rows = [
        ("accuracy", "accuracy"),
        ("macro F1", "macro_f1"),
        *[(f"F1 {name}", f"per_class.{name}.f1") for name in metrics["per_class"]],
        ("AUC one-vs-rest (macro)", "auc_ovr_macro"),
        (f"sensitivity @ {b['threshold']:g}", "binary.sensitivity"),
        (f"specificity @ {b['threshold']:g}", "binary.specificity"),
        ("AUC normal vs pneumonia", "binary.auc"),
        ("ECE (lower is better)", "ece"),
        ("Brier (multiclass, 0-2)", "brier"),
        ("NLL", "nll"),
    ]
    level = "CI"
    if "ci_method" in metrics:
        level = next((w for w in metrics["ci_method"].split(", ") if w.endswith("interval")), "CI")
        level = level.replace(" interval", " CI")
    lines = [f"{'metric':<28} {'value':>7}  {level}"]
    for label, key in rows:
        value: Any = metrics
        for part in key.split("."):
            value = value[part]
        interval = ci.get(key)
        text = f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""
        lines.append(f"{label:<28} {_fmt(value):>7}  {text}".rstrip())
    footer = f"n = {metrics['n']} images, {metrics['n_groups']} groups"
    if "ci_method" in metrics:
        footer += f"; {metrics['ci_method']}"
    lines.append(footer)
    return "\n".join(lines)


def paired_bootstrap_macro_f1(ref_pred: Any, new_pred: Any, labels: Any, groups: Any = None, *, n: int = 2000,
                              seed: int = 0) -> dict:
    """Macro-F1(new) - macro-F1(ref) on the same rows, with a 95% percentile interval from resampling
    whole patient groups (both models see the same resample, so the interval is for the difference,
    much narrower than comparing two separate intervals). ``p_not_better``: share of resamples where
    the new predictions are not better. Rows without a group count as their own patient."""
    from sklearn.metrics import f1_score

    ref, new, y = (_to_numpy(v).astype(np.int64) for v in (ref_pred, new_pred, labels))
    g = np.arange(len(y)).astype(str) if groups is None else np.asarray([str(v) for v in groups])
    rng = np.random.default_rng(seed)
    uniq, inv = np.unique(g, return_inverse=True)
    members = [np.flatnonzero(inv == k) for k in range(len(uniq))]
    classes = list(range(len(LABELS)))
    diffs = np.empty(n)
    for i in range(n):
        idx = np.concatenate([members[k] for k in rng.integers(0, len(uniq), len(uniq))])
        diffs[i] = (f1_score(y[idx], new[idx], average="macro", labels=classes, zero_division=0)
                    - f1_score(y[idx], ref[idx], average="macro", labels=classes, zero_division=0))
    d = (f1_score(y, new, average="macro", labels=classes, zero_division=0)
         - f1_score(y, ref, average="macro", labels=classes, zero_division=0))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"delta_macro_f1": float(d), "ci95": [float(lo), float(hi)], "p_not_better": float(np.mean(diffs <= 0))}


def agreement(reference: Any, other: Any, threshold: float | None = None) -> dict:
    """How far two sets of (N, 3) class probabilities of the same images are apart: the largest
    absolute probability difference (and its 99th percentile), changed labels and, with a
    ``threshold``, changed pneumonia calls. Used wherever a faster or smaller copy of a model (bf16,
    float16 weights, ONNX) is compared with the float32 reference."""
    from modeling.labels import pneumonia_probability

    a, b = _to_numpy(reference).astype(np.float64), _to_numpy(other).astype(np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two (N, {len(LABELS)}) arrays of the same shape, got {a.shape} and {b.shape}")
    d = np.abs(a - b).max(1) if len(a) else np.zeros(0)
    out = {"n": int(len(a)), "max_abs_prob_diff": float(d.max()) if len(d) else 0.0,
           "p99_abs_prob_diff": float(np.percentile(d, 99)) if len(d) else 0.0,
           "label_changes": int((a.argmax(1) != b.argmax(1)).sum())}
    if threshold is not None:
        out["pneumonia_call_changes"] = int(((pneumonia_probability(a) >= threshold)
                                             != (pneumonia_probability(b) >= threshold)).sum())
    return out

