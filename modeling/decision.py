"""The triage decision on a calibrated pneumonia probability: one vocabulary for the Space's answer,
archive rows (:mod:`modeling.archive`) and the private page (its ``browser.json`` carries the band).
"""

from __future__ import annotations

DECISIONS = ("no_pneumonia", "uncertain", "pneumonia", "out_of_scope")


def decide(p_pneumonia: float, threshold: float, uncertain_high: float) -> tuple[str, str]:
    """Three-way triage on the calibrated pneumonia probability (the Space's answer and the archive's
    ``decision`` column; a film the scope check flags gets ``out_of_scope`` instead, by its caller).

    Below the stored threshold (chosen on validation for ~98.5% sensitivity) the model has nothing to
    flag. From the threshold to ``uncertain_high`` the film is flagged but the model is not confident:
    "uncertain, refer for review". At or above it: "pneumonia, refer"."""
    if p_pneumonia < threshold:
        return "no_pneumonia", (f"No pneumonia detected: P(pneumonia) = {p_pneumonia:.1%}, below the triage "
                                f"threshold {threshold:.1%}.")
    if p_pneumonia < uncertain_high:
        return "uncertain", (f"Uncertain, refer for review: P(pneumonia) = {p_pneumonia:.1%}, above the triage "
                             f"threshold {threshold:.1%} but below {uncertain_high:.0%}.")
    return "pneumonia", f"Pneumonia suspected, refer: P(pneumonia) = {p_pneumonia:.1%}."


def default_uncertain_high(threshold: float) -> float:
    """Upper end of the "uncertain, refer" band when none is set (``CXR_UNCERTAIN_HIGH`` in the Space)."""
    return max(0.5, (threshold + 1.0) / 2.0)
