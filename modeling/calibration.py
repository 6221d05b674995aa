"""Calibration: temperature scaling and the pneumonia decision threshold, fit on validation only.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar ``T`` fit by minimising the
validation negative log-likelihood. It keeps the argmax (accuracy, F1 unchanged) and makes the
probabilities honest. We *bake* ``T`` into the classification head (``W/T``, ``b/T``), so the saved
weights produce calibrated logits: ``from_pretrained`` + softmax, ``pipeline("image-classification")``
and our predictor all give the same calibrated probabilities, with no custom code in the loop.

The decision threshold on ``p(pneumonia) = p(bacterial) + p(viral)`` is chosen on validation for a
target sensitivity: in triage a missed pneumonia costs more than a false alarm, so we pick the
highest threshold whose validation sensitivity still meets the target (the "false negative fix").

Both are stored in the model config under ``cxr_calibration`` and read back by the predictor.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from .labels import pneumonia_probability
from .models import CALIBRATION_KEY, classifier_head

CONFIG_KEY = CALIBRATION_KEY


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / T)``."""
    z = _as_numpy(logits).astype(np.float64) / temperature
    y = _as_numpy(labels).astype(np.int64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def fit_temperature(logits, labels, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature minimising validation NLL (bounded scalar search over log T; the NLL is
    smooth and unimodal in T, so a 1-D bounded search is exact enough and cannot diverge)."""
    z = _as_numpy(logits).astype(np.float64)
    y = _as_numpy(labels).astype(np.int64)
    if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
        raise ValueError(f"need logits (N, C) and N labels, got {z.shape} and {y.shape}")
    res = minimize_scalar(lambda t: nll(z, y, math.exp(t)), bounds=(math.log(bounds[0]), math.log(bounds[1])),
                          method="bounded", options={"xatol": 1e-5})
    return float(math.exp(res.x))


def choose_threshold(p_pneumonia, is_pneumonia, target_sensitivity: float = 0.985) -> float:
    """A threshold ``t`` with ``mean(p >= t | pneumonia) >= target_sensitivity`` on the given
    (validation) data, as high as possible: between the score of the last positive that must be
    caught and the next lower score. A case is called pneumonia when ``p >= t``."""
    p = _as_numpy(p_pneumonia).astype(np.float64)
    pos = _as_numpy(is_pneumonia).astype(bool)
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    if pos.sum() == 0:
        raise ValueError("cannot choose a sensitivity threshold: no pneumonia case in the data")
    scores = np.sort(p[pos])[::-1]  # descending
    k = math.ceil(target_sensitivity * len(scores))  # need at least k positives at or above t
    kth = scores[k - 1]
    # Any t in (next lower score, kth] gives the same calls on this data; the midpoint keeps the
    # decision off a knife's edge (a float32 re-computation of kth's probability must not flip it).
    below = p[p < kth]
    mid = (kth + below.max()) / 2 if below.size else 0.0
    t = min(mid, np.nextafter(kth, -np.inf)) if below.size else np.nextafter(kth, -np.inf)
    return float(min(max(t, 1e-9), 1 - 1e-9))  # the metric module (and common sense) want 0 < t < 1


def binary_rates(p_pneumonia, is_pneumonia, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) of ``p >= threshold``."""
    p = _as_numpy(p_pneumonia)
    pos = _as_numpy(is_pneumonia).astype(bool)
    call = p >= threshold
    sens = float(call[pos].mean()) if pos.any() else float("nan")
    spec = float((~call[~pos]).mean()) if (~pos).any() else float("nan")
    return sens, spec


@dataclass
class Calibration:
    """What is stored in ``config.cxr_calibration``. ``temperature_applied`` says the head already
    includes ``1/T`` (so logits are calibrated as saved)."""

    temperature: float = 1.0
    temperature_applied: bool = False
    pneumonia_threshold: float = 0.5
    target_sensitivity: float | None = None
    fitted_on: str | None = None
    n_fit: int | None = None
    nll_before: float | None = None
    nll_after: float | None = None
    fit_sensitivity: float | None = None
    fit_specificity: float | None = None
    # release v4 on: the operating point fit under the robustness battery (modeling.robustness.
    # fit_battery_operating_point); None for a plain-validation fit
    condition_sensitivity: float | None = None
    fit_rule: str | None = None

    @classmethod
    def from_config(cls, config) -> "Calibration":
        data = getattr(config, CONFIG_KEY, None) or {}
        known = {k: v for k, v in dict(data).items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_config(self, config) -> None:
        setattr(config, CONFIG_KEY, asdict(self))


@torch.no_grad()
def apply_temperature(model, temperature: float) -> None:
    """Divide the classification head by ``temperature`` in place (logits become ``logits / T``)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    head = classifier_head(model)
    head.weight.div_(temperature)
    if head.bias is not None:
        head.bias.div_(temperature)


def calibrate_with(model, temperature: float, threshold: float, plain_logits, labels, **fields) -> Calibration:
    """Bake an operating point fit elsewhere (e.g. under the robustness battery) into ``model``: the
    temperature into the head, the threshold and ``fields`` (what it was fit on) into the config."""
    previous = Calibration.from_config(model.config)
    if previous.temperature_applied:
        raise ValueError("this model is already calibrated (config.cxr_calibration.temperature_applied)")
    z = _as_numpy(plain_logits).astype(np.float64)
    y = _as_numpy(labels).astype(np.int64)
    sens, spec = binary_rates(pneumonia_probability(softmax(z / temperature)), y != 0, threshold)
    apply_temperature(model, temperature)
    cal = Calibration(temperature=float(temperature), temperature_applied=True, pneumonia_threshold=float(threshold),
                      n_fit=int(len(y)), nll_before=nll(z, y), nll_after=nll(z, y, temperature),
                      fit_sensitivity=sens, fit_specificity=spec, **fields)
    cal.to_config(model.config)
    return cal


def calibrate(model, val_logits, val_labels, *, target_sensitivity: float = 0.985) -> Calibration:
    """Fit T on validation logits (of the *uncalibrated* model), bake it into ``model``'s head,
    choose the pneumonia threshold on the calibrated validation probabilities, and store both in
    ``model.config``. Returns the stored :class:`Calibration`."""
    previous = Calibration.from_config(model.config)
    if previous.temperature_applied:
        raise ValueError("this model is already calibrated (config.cxr_calibration.temperature_applied)")
    z = _as_numpy(val_logits).astype(np.float64)
    y = _as_numpy(val_labels).astype(np.int64)
    t = fit_temperature(z, y)
    probs = softmax(z / t)
    p_pneu = pneumonia_probability(probs)
    is_pneu = y != 0
    thr = choose_threshold(p_pneu, is_pneu, target_sensitivity)
    sens, spec = binary_rates(p_pneu, is_pneu, thr)
    apply_temperature(model, t)
    cal = Calibration(
        temperature=t, temperature_applied=True, pneumonia_threshold=thr, target_sensitivity=target_sensitivity,
        fitted_on="validation", n_fit=int(len(y)), nll_before=nll(z, y), nll_after=nll(z, y, t),
        fit_sensitivity=sens, fit_specificity=spec,
    )
    cal.to_config(model.config)
    return cal
