"""The scope check: is this film like the pediatric films the model was trained on?

Why: the classifier was trained on frontal films of children aged 1-5 from one hospital (Guangzhou
Women and Children's Medical Center, the Kermany dataset). Shown a normal adult film it calls it
pneumonia almost every time (467 of 473 normal NIH ChestX-ray14 films that the input gate let
through, issue 22), and the input gate (:mod:`modeling.gate`) does not stop them: an adult chest
film is still a frontal chest X-ray, only outside what this model knows. A public Space must say so
instead of answering.

How: a logistic regression on the model's own head features (the input of its classification layer,
captured in the same forward pass as the prediction and the gate, so it costs nothing at run time),
fit to tell the pediatric training films (in scope) from NIH ChestX-ray14 films (out of scope), each
also seen once through the training augmentation (tone, noise, crops: so that a darker or noisier
pediatric film is not flagged for its tone alone); Skytells' adult COVID-19 films, which the dataset
also holds, are in neither class. NIH is split by patient id (the prefix of its
file names) into fit / validation / held-out parts; the held-out part is never used to fit or
choose anything. The flag limit on the out-of-scope log-odds is the ``1 - flag_rate`` quantile of the
in-scope validation films (<= 1% of them flagged); the regularisation is chosen on the NIH
validation patients at that limit.

What the flag means, honestly: NIH and Kermany differ by age, and also by hospital, country,
device, processing and projection (many NIH films are portable AP films with lines and electrodes).
The check learns all of that at once, so it may flag pediatric films from another hospital too; no
such films are available here to measure it. A flagged film is "outside what this model was trained
and tested on", not "an adult" for certain.

Fit with ``cxr-scope`` (``python -m modeling scope``); saved beside the weights as
``scope_check.npz``, which the predictor loads when present.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .image_io import IMAGE_EXTENSIONS
from .probe import LinearHead, fit_probe

SCOPE_FILE = "scope_check.npz"
# What the model was trained on, in the words the Space and the docs use.
TRAINED_ON = "frontal chest X-rays of children aged 1-5 from one hospital"


@dataclass
class ScopeVerdict:
    """``score``: log-odds that the film is out of scope; above ``limit`` it is flagged."""

    score: float
    limit: float

    @property
    def out_of_scope(self) -> bool:
        return self.score > self.limit

    def message(self) -> str | None:
        if not self.out_of_scope:
            return None
        return (f"This model is for {TRAINED_ON}, and this film looks outside that (an adult, or a film from "
                f"another kind of hospital or device; scope score {self.score:.1f}, limit {self.limit:.1f}). "
                "Its answer would not be reliable, so none is given.")

    def to_dict(self) -> dict:
        return {"score": round(self.score, 3), "limit": round(self.limit, 3), "out_of_scope": self.out_of_scope}


@dataclass
class ScopeCheck:
    head: LinearHead  # 2 rows: in scope, out of scope (standardisation folded in)
    limit: float
    meta: dict = field(default_factory=dict)

    def scores(self, feats: np.ndarray) -> np.ndarray:
        z = self.head.logits(np.asarray(feats, np.float64))
        return z[:, 1] - z[:, 0]

    def verdicts(self, feats: np.ndarray) -> list[ScopeVerdict]:
        return [ScopeVerdict(score=float(s), limit=float(self.limit)) for s in self.scores(feats)]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        np.savez(path, weight=self.head.weight, bias=self.head.bias,
                 config=np.frombuffer(json.dumps({"limit": self.limit, "meta": self.meta}).encode(), dtype=np.uint8))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ScopeCheck":
        with np.load(path) as z:
            cfg = json.loads(bytes(z["config"]).decode())
            return cls(head=LinearHead(z["weight"], z["bias"]), limit=float(cfg["limit"]), meta=cfg.get("meta", {}))


def fit_scope(in_fit: np.ndarray, out_fit: np.ndarray, in_val: np.ndarray, out_val: np.ndarray, *,
              flag_rate: float = 0.01, Cs: tuple[float, ...] = (0.01, 0.1, 1.0), meta: dict | None = None,
              in_val_conditions: dict[str, np.ndarray] | None = None) -> tuple[ScopeCheck, dict]:
    """Fit on head features of in-scope and out-of-scope films; for each ``C`` the limit flags at most
    ``flag_rate`` of the ``in_val`` films, and the ``C`` that flags the most of ``out_val`` at its limit
    is kept. With ``in_val_conditions`` (the same validation films under the robustness battery's
    conditions) the limit flags at most that share under every condition too: a pediatric film with
    another tone or noise level is not "out of scope" for that alone (the lesson of v3's threshold).
    Returns the check and, per C, the validation numbers."""
    x = np.concatenate([in_fit, out_fit])
    y = np.concatenate([np.zeros(len(in_fit), int), np.ones(len(out_fit), int)])
    best, tried = None, {}
    for C in Cs:
        check = ScopeCheck(head=fit_probe(x, y, C=C, balanced=True, n_classes=2), limit=float("inf"))
        limits = {"plain": limit_for(check.scores(in_val), flag_rate),
                  **{name: limit_for(check.scores(f), flag_rate) for name, f in (in_val_conditions or {}).items()}}
        by = max(limits, key=limits.get)
        check.limit = limits[by]
        row = {"limit": check.limit, "limit_set_by": by,
               "in_scope_validation_flagged": float((check.scores(in_val) > check.limit).mean()),
               "out_of_scope_validation_flagged": float((check.scores(out_val) > check.limit).mean())}
        if in_val_conditions:
            row["in_scope_validation_flagged_worst_condition"] = max(
                float((check.scores(f) > check.limit).mean()) for f in in_val_conditions.values())
        tried[f"C={C:g}"] = row
        if best is None or row["out_of_scope_validation_flagged"] > best[1]["out_of_scope_validation_flagged"]:
            best = (check, row, C)
    check, _, C = best
    check.meta = {**(meta or {}), "C": C, "flag_rate_target": flag_rate, "n_in_fit": int(len(in_fit)),
                  "n_out_fit": int(len(out_fit)), "limit_conditions": ["plain", *(in_val_conditions or {})]}
    return check, tried


def limit_for(scores: np.ndarray, flag_rate: float) -> float:
    """The lowest limit that flags at most ``floor(flag_rate * n)`` of these scores (strictly above it). A
    plain quantile interpolates and can flag one film more (7 of 680 at 1%: 1.03%)."""
    s = np.sort(np.asarray(scores, np.float64))[::-1]
    k = int(np.floor(flag_rate * len(s)))
    return float(s[min(k, len(s) - 1)])


def patient_of(path: str | Path) -> str:
    """NIH ChestX-ray14's patient id: the file name's prefix before the first underscore."""
    return Path(path).name.split("_")[0]


def patient_split(paths: list[Path], *, fractions: tuple[float, float] = (0.6, 0.2)) -> dict[str, list[Path]]:
    """``fit`` / ``validation`` / ``held_out`` by patient, by a hash of the patient id (stable across
    machines and file orders; all films of one patient land in one part)."""
    parts: dict[str, list[Path]] = {"fit": [], "validation": [], "held_out": []}
    for p in sorted(paths):
        u = int(hashlib.sha256(patient_of(p).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        part = "fit" if u < fractions[0] else "validation" if u < fractions[0] + fractions[1] else "held_out"
        parts[part].append(p)
    return parts


def out_of_scope_films(root: str | Path) -> list[Path]:
    """Every image under ``root`` (the NIH sample's ``no_finding/`` and ``pneumonia/``)."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def load_scope(model_id_or_dir: str, revision: str | None = None) -> ScopeCheck | None:
    """The scope check saved beside a model (folder or Hub repo), or None when it has none."""
    from .gate import file_beside

    found = file_beside(model_id_or_dir, SCOPE_FILE, revision)
    return None if found is None else ScopeCheck.load(found)


IN_SCOPE_SOURCES = ("kermany",)  # the pediatric source; Skytells' COVID-19 films in the dataset are adults


def fit_for_model(model_dir: str, dataset: str, out_of_scope_dir: str, *, n_fit: int = 1500, seed: int = 0,
                  flag_rate: float = 0.01, progress: bool = True,
                  in_scope_sources: tuple[str, ...] = IN_SCOPE_SOURCES, battery: bool = False) -> tuple[ScopeCheck, dict]:
    """Fit the scope check of a saved model. In scope: ``n_fit`` training films (stratified), each
    plain and once through the v4 training augmentation; the limit from all validation films. Out of
    scope: the films under ``out_of_scope_dir`` split by patient; the fit part plain and augmented,
    the validation part to choose C; the held-out part is not even read (``benchmarks/scope.py``
    measures it). ``battery``: the limit also holds under each robustness battery condition applied
    to the validation films (:func:`fit_scope`'s ``in_val_conditions``). Returns the check and the
    validation numbers."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .augment import AugmentConfig, augment
    from .data import load_cxr_dataset, stratified_subset
    from .gate import gate_features
    from .image_io import load_image, to_grayscale
    from .paths import shown_path

    model = AutoModelForImageClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    feats = lambda imgs: gate_features(model, processor, imgs)  # noqa: E731
    aug = AugmentConfig(crop_scale=(0.5, 1.0), max_rotation=9, brightness=0.3, contrast=0.3, gamma_range=(0.6, 1.6),
                        tone_p=0.8, noise=12, blur=1.2, blur_p=0.2, sharpen=120, sharpen_p=0.2, jpeg_quality=30,
                        jpeg_p=0.2)
    rng = random.Random(seed)

    def with_views(films):
        return np.concatenate([feats(films), feats([augment(f, aug, rng) for f in films])])

    ds = load_cxr_dataset(dataset)
    if "source" in ds["train"].column_names:  # in scope: the pediatric films only, never the adult COVID-19 ones
        ds = {k: ds[k].filter(lambda s: s in in_scope_sources, input_columns="source") for k in ("train", "validation")}
    train = stratified_subset(ds["train"], n_fit, seed)
    in_films = [to_grayscale(r["image"]) for r in tqdm(train, desc="scope: training films", disable=not progress)]
    in_fit = with_views(in_films)
    val_films = [to_grayscale(r["image"]) for r in ds["validation"]]
    in_val = feats(val_films)
    conditions = None
    if battery:
        from .robustness import BATTERY, apply

        conditions = {c.name: feats([apply(c.name, f) for f in val_films])
                      for c in tqdm(BATTERY, desc="scope: validation under the battery", disable=not progress)}
    parts = patient_split(out_of_scope_films(out_of_scope_dir))
    out = {k: [load_image(str(p)) for p in parts[k]] for k in ("fit", "validation")}  # never the held-out part
    out_fit = with_views(out["fit"])
    out_val = feats(out["validation"])
    check, tried = fit_scope(in_fit, out_fit, in_val, out_val, flag_rate=flag_rate, in_val_conditions=conditions, meta={
        "model": shown_path(model_dir), "out_of_scope": shown_path(out_of_scope_dir), "n_fit": len(in_films),
        "in_scope_sources": list(in_scope_sources),
        "seed": seed, "precision": "bfloat16", "trained_on": TRAINED_ON,
        "patients": {k: len({patient_of(p) for p in v}) for k, v in parts.items()}})
    report = {"choice_of_C": tried, "limit": check.limit, "C": check.meta["C"],
              "in_scope_validation": {"n": int(len(in_val)), "flagged": int((check.scores(in_val) > check.limit).sum())},
              "out_of_scope_parts": {k: {"films": len(v), "patients": check.meta["patients"][k]}
                                     for k, v in parts.items()},
              "held_out": "not read here: benchmarks/scope.py measures it"}
    return check, report
