"""Linear probes on frozen backbone features, saved as ordinary transformers classifiers.

A probe is a multinomial logistic regression (scikit-learn: a well-kept, exact solver; no reason to
hand-write a training loop for a convex problem) on cached features (:mod:`modeling.features`). The
feature standardisation is folded into the weights, so the probe is one ``(classes x D)`` matrix and a
bias in the raw feature space. When the features are the input of the model's own head (``head``
features), :func:`probe_model` writes that matrix into the head of the pretrained model: the result is
a stock ``AutoModelForImageClassification`` (frozen pretrained backbone + fitted head) that
``pipeline()``, the Predictor, calibration, export and LP-FT (``train.py --base-model PROBE_DIR``
keeps the head of an uncalibrated model with our labels) all take as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .labels import LABELS
from .models import build_model, classifier_head


@dataclass
class LinearHead:
    """``logits = features @ weight.T + bias`` in the raw (unstandardised) feature space."""

    weight: np.ndarray  # (classes, D)
    bias: np.ndarray  # (classes,)

    def logits(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, np.float64) @ self.weight.T + self.bias


def fit_probe(features: np.ndarray, labels: np.ndarray, *, C: float = 1.0, balanced: bool = False,
              max_iter: int = 3000, n_classes: int = len(LABELS)) -> LinearHead:
    """Multinomial logistic regression on standardised features (L2 penalty ``1/C``; ``balanced``
    weights classes by inverse frequency), returned with the standardisation folded in. The head has
    one row per class id ``0..n_classes-1``; a class absent from ``labels`` gets a bias of -30 (never
    predicted) rather than a silently shifted row order."""
    from sklearn.linear_model import LogisticRegression

    X = np.asarray(features, np.float64)
    y = np.asarray(labels, np.int64)
    mu = X.mean(0)
    sd = X.std(0)
    sd[sd < 1e-8] = 1.0
    clf = LogisticRegression(C=C, class_weight="balanced" if balanced else None, max_iter=max_iter)
    clf.fit((X - mu) / sd, y)
    coef, intercept = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:  # scikit-learn stores one row for two classes: logit(b) - logit(a)
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    weight = np.zeros((n_classes, X.shape[1]))
    bias = np.full(n_classes, -30.0)
    weight[clf.classes_] = coef / sd
    bias[clf.classes_] = intercept - (coef / sd) @ mu
    return LinearHead(weight=weight, bias=bias)


def embed(head: LinearHead, columns: slice, total_dim: int) -> LinearHead:
    """A head fit on ``features[:, columns]`` as a head on all ``total_dim`` columns (zeros elsewhere):
    a CLS-only probe is a stock DINOv2 head whose patch-token half is zero."""
    w = np.zeros((head.weight.shape[0], total_dim))
    w[:, columns] = head.weight
    return LinearHead(weight=w, bias=head.bias.copy())


def probe_model(base: str, head: LinearHead, *, revision: str | None = None):
    """The pretrained ``base`` as our 3-class classifier with ``head`` as its classification layer
    (uncalibrated: calibrate it on validation like any checkpoint)."""
    model = build_model(base, revision=revision)
    layer = classifier_head(model)
    if tuple(layer.weight.shape) != tuple(head.weight.shape):
        raise ValueError(f"the probe has shape {head.weight.shape}; {type(model).__name__}'s head takes "
                         f"{tuple(layer.weight.shape)} (fit it on the model's head features)")
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(head.weight, dtype=layer.weight.dtype))
        layer.bias.copy_(torch.as_tensor(head.bias, dtype=layer.bias.dtype))
    return model.eval()
