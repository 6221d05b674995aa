"""The project's labels, in one place.

Three classes, in this order (the order is the model's output order and the dataset's ClassLabel
order, so it must never change): ``normal``, ``bacterial_pneumonia``, ``viral_pneumonia``.
The clinically common normal-vs-pneumonia view is derived: pneumonia = bacterial + viral.

Public datasets spell the classes many ways (``BacterialPneumonia``, ``PNEUMONIA``, ``COVID-19``...).
:data:`LABEL_ALIASES` is the single, documented table that maps those spellings to ours; every reader
(dataset folders, manifests, contributions, Space feedback) goes through :func:`parse_label`.
"""

from __future__ import annotations

import re

LABELS: tuple[str, ...] = ("normal", "bacterial_pneumonia", "viral_pneumonia")
NORMAL, BACTERIAL, VIRAL = LABELS
PNEUMONIA_LABELS: tuple[str, ...] = (BACTERIAL, VIRAL)

LABEL2ID: dict[str, int] = {name: i for i, name in enumerate(LABELS)}
ID2LABEL: dict[int, str] = dict(enumerate(LABELS))

# Spelling (normalised by _normalise: lower case, letters and digits only) -> our label.
# COVID-19 is a viral pneumonia; SARS and MERS likewise. "pneumonia" alone is NOT here: it does not
# say bacterial or viral, so a folder called PNEUMONIA is ambiguous for a 3-class dataset.
LABEL_ALIASES: dict[str, str] = {
    "normal": NORMAL,
    "nofinding": NORMAL,
    "healthy": NORMAL,
    "bacterial": BACTERIAL,
    "bacteria": BACTERIAL,
    "bacterialpneumonia": BACTERIAL,
    "pneumoniabacterial": BACTERIAL,
    "viral": VIRAL,
    "virus": VIRAL,
    "viralpneumonia": VIRAL,
    "pneumoniaviral": VIRAL,
    "covid": VIRAL,
    "covid19": VIRAL,
    "sarscov2": VIRAL,
    "sars": VIRAL,
    "mers": VIRAL,
}


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def parse_label(name: str) -> str | None:
    """Map any accepted spelling (``"ViralPneumonia"``, ``"COVID-19"``, ``"viral_pneumonia"``) to a
    label, or ``None`` when the spelling is unknown. Callers decide how to report unknown names."""
    return LABEL_ALIASES.get(_normalise(name))


def accepted_label_names() -> list[str]:
    """Human-readable list of the accepted spellings, for error messages."""
    return sorted(set(LABEL_ALIASES) | set(LABELS))


def is_pneumonia(label: str) -> bool:
    return label in PNEUMONIA_LABELS


#: How each label is shown to people (the Space, cards, plots).
DISPLAY_NAMES: dict[str, str] = {NORMAL: "Normal", BACTERIAL: "Bacterial pneumonia", VIRAL: "Viral pneumonia"}


def pneumonia_probability(probs):
    """P(pneumonia) = P(bacterial) + P(viral): of one probability vector (a float) or of an (N, 3)
    array (an (N,) array). The normal-vs-pneumonia view every threshold and AUC is computed on."""
    import numpy as np

    p = np.asarray(probs, dtype=np.float64)
    if p.shape[-1] != len(LABELS):
        raise ValueError(f"expected {len(LABELS)} class probabilities ({', '.join(LABELS)}), got shape {p.shape}")
    out = p[..., LABELS.index(BACTERIAL)] + p[..., LABELS.index(VIRAL)]
    return float(out) if out.ndim == 0 else out
