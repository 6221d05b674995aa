"""Evaluation plots as PNG files: confusion matrix, ROC curves, reliability diagram.

Why ``matplotlib.figure.Figure`` and not ``pyplot``: figures made this way are not registered in
pyplot's global figure list, so nothing leaks when many are drawn (training loops, the Space), no
display is needed, and the process's pyplot backend is left alone. The Agg canvas renders the PNG.

The numbers drawn (AUCs, ECE, reliability bins, the operating point) come from
:func:`modeling.metrics.compute_metrics`, so a plot can never disagree with the reported metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from modeling.labels import LABELS, pneumonia_probability
from modeling.metrics import _to_numpy, compute_metrics

DPI = 120


def _inputs(probs, labels, metrics, threshold):
    p = _to_numpy(probs).astype(np.float64)
    y = _to_numpy(labels).astype(np.int64)
    if metrics is None:
        metrics = compute_metrics(p, y, threshold=threshold, n_bootstrap=0)
    return p, y, metrics


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    fig.clear()
    return path


def _title(prefix: str, text: str) -> str:
    return f"{prefix.strip()} {text}".strip()


def plot_confusion_matrix(probs, labels, path, *, title_prefix: str = "", metrics: dict | None = None) -> Path:
    """3x3 counts (rows = true class, columns = argmax prediction); the shading is the row-normalised
    rate (recall on the diagonal), so classes of different sizes read on one scale."""
    p, y, metrics = _inputs(probs, labels, metrics, 0.5)
    cm = np.asarray(metrics["confusion_matrix"], dtype=float)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(5.2, 4.4))
    ax = fig.add_subplot()
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    for i in range(len(LABELS)):
        for j in range(len(LABELS)):
            ax.text(j, i, f"{int(cm[i, j])}\n{rates[i, j]:.0%}", ha="center", va="center",
                    color="white" if rates[i, j] > 0.6 else "black", fontsize=9)
    names = [n.replace("_", "\n") for n in LABELS]
    ax.set_xticks(range(len(LABELS)), names, fontsize=8)
    ax.set_yticks(range(len(LABELS)), names, fontsize=8)
    ax.set_xlabel("predicted (argmax)")
    ax.set_ylabel("true")
    text = f"confusion matrix (n={metrics['n']}, acc={metrics['accuracy']:.3f})"
    ax.set_title(_title(title_prefix, text), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _auc_text(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def plot_roc(probs, labels, path, *, threshold: float = 0.5, title_prefix: str = "",
             metrics: dict | None = None) -> Path:
    """One-vs-rest ROC per class and normal-vs-pneumonia (p1 + p2), AUCs in the legend, with the
    threshold's operating point marked on the pneumonia curve (what the triage decision does)."""
    p, y, metrics = _inputs(probs, labels, metrics, threshold)
    fig = Figure(figsize=(5.2, 5.0))
    ax = fig.add_subplot()
    for c, name in enumerate(LABELS):
        positive = y == c
        if positive.all() or not positive.any():
            continue  # undefined curve; the legend would be misleading
        fpr, tpr, _ = roc_curve(positive, p[:, c])
        ax.plot(fpr, tpr, lw=1.2, label=f"{name} vs rest (AUC {_auc_text(metrics['auc_per_class'][name])})")
    b = metrics["binary"]
    pneumonia = y != 0
    if pneumonia.any() and not pneumonia.all():
        fpr, tpr, _ = roc_curve(pneumonia, pneumonia_probability(p))
        ax.plot(fpr, tpr, lw=2.2, color="black", label=f"normal vs pneumonia (AUC {_auc_text(b['auc'])})")
        ax.plot([1 - b["specificity"]], [b["sensitivity"]], "o", color="red", ms=7,
                label=f"threshold {b['threshold']:g}: sens {b['sensitivity']:.2f}, spec {b['specificity']:.2f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(_title(title_prefix, "ROC curves"), fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability(probs, labels, path, *, n_bins: int = 15, title_prefix: str = "",
                     metrics: dict | None = None) -> Path:
    """Reliability diagram of the top-label confidence (accuracy vs mean confidence per equal-width
    bin, the bins of the ECE) above a histogram of the confidences, ECE in the title: a calibrated
    model's bars sit on the diagonal, and the histogram shows which bins carry weight."""
    if metrics is None:
        metrics = compute_metrics(_to_numpy(probs), _to_numpy(labels), n_bootstrap=0, n_bins=n_bins)
    rel = metrics["reliability"]
    edges = np.asarray(rel["bin_edges"])
    width = np.diff(edges)
    count = np.asarray(rel["count"])
    acc = np.array([np.nan if a is None else a for a in rel["accuracy"]])
    conf = np.array([np.nan if c is None else c for c in rel["confidence"]])
    fig = Figure(figsize=(5.2, 6.0))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = count > 0
    top.bar(edges[:-1][filled], acc[filled], width=width[filled], align="edge", edgecolor="black",
            color="tab:blue", alpha=0.8, label="accuracy")
    top.bar(edges[:-1][filled], (conf - acc)[filled], bottom=acc[filled], width=width[filled], align="edge",
            edgecolor="red", color="red", alpha=0.25, hatch="//", label="gap to mean confidence")
    top.plot([0, 1], [0, 1], ls="--", color="black", lw=0.9, zorder=3, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=7)
    top.set_title(_title(title_prefix, f"reliability (top-label), ECE = {metrics['ece']:.3f}, "
                                       f"{len(count)} bins"), fontsize=10)
    bottom.bar(edges[:-1], count, width=width, align="edge", edgecolor="black", color="grey")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (max class probability)")
    bottom.set_ylabel("images")
    fig.tight_layout()
    return _save(fig, path)


def save_plots(probs: Any, labels: Any, out_dir, *, threshold: float = 0.5, title_prefix: str = "") -> dict[str, Path]:
    """Write confusion_matrix.png, roc.png and reliability.png into ``out_dir`` (created); returns
    {name: path}. The metrics are computed once (no bootstrap) and shared by the three plots."""
    out = Path(out_dir)
    p = _to_numpy(probs).astype(np.float64)
    y = _to_numpy(labels).astype(np.int64)
    metrics = compute_metrics(p, y, threshold=threshold, n_bootstrap=0)
    return {
        "confusion_matrix": plot_confusion_matrix(p, y, out / "confusion_matrix.png", title_prefix=title_prefix,
                                                  metrics=metrics),
        "roc": plot_roc(p, y, out / "roc.png", threshold=threshold, title_prefix=title_prefix, metrics=metrics),
        "reliability": plot_reliability(p, y, out / "reliability.png", title_prefix=title_prefix, metrics=metrics),
    }
