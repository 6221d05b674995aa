"""A learned input gate beside the rules of :mod:`modeling.quality`: is the film upright, is it the right
way round in grey levels, and does it look like the films the model was trained on?

Why: the rules (colour, DICOM tags, geometry) let through a film rotated by 90 degrees (called "no
pneumonia" although upright it is 0.999 pneumonia), an inverted film, a grey portrait photograph and
a grey screenshot. The classifier answers one of its three classes for anything, so the gate has to
say when its answer means nothing.

How: on the model's own head features (:func:`modeling.features.head_inputs_and_layers`: the input of
the classification layer, captured in the same forward pass as the prediction, so the gate costs no
extra pass and no new dependency):

* orientation: a 4-way logistic regression (upright, or turned 90, 180, 270 degrees) trained on the
  training films turned each way;
* polarity: a 2-way logistic regression (as acquired, or grey levels inverted) trained on the films
  and their inverted copies;
* distance to the training distribution: the Mahalanobis distance of the features to those of the
  upright training films (Ledoit-Wolf shrunk covariance; scikit-learn), with two limits chosen on the
  validation films. Above ``caution_limit`` (a quantile of the plain validation films) the film is
  unusual: predicted, with a note. Above ``distance_limit`` it is refused; that limit is a margin
  (1.25) times the distance of the farthest real film of the fit (training and validation films as
  acquired), because distance alone should earn a caution: quantile limits refused real pediatric
  films of the official test split (limited on plain validation: 7 of 624; on validation under the
  robustness battery, release v3's gate: 3). Photographs, screenshots and other images lie far
  beyond both limits (``benchmarks/input_gate.py``).

A rotated or inverted film is turned upright (and its grey levels inverted back) when the gate is
confident (:attr:`InputGate.confidence`) and then predicted as such, with a note; a film far from the
training films is refused with the distance in the reason, an unusual one is predicted with a note.
Fit with ``cxr-gate`` (``python -m modeling gate``); saved beside the weights as ``input_gate.npz``,
which the predictor loads when present.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .paths import shown_path
from .probe import LinearHead, fit_probe

GATE_FILE = "input_gate.npz"
ROTATIONS = (0, 90, 180, 270)  # degrees the film was turned counter-clockwise (PIL's convention)


def turn(img: Image.Image, degrees: int) -> Image.Image:
    """``img`` turned ``degrees`` counter-clockwise (exact, no resampling)."""
    return img if degrees % 360 == 0 else img.rotate(degrees, expand=True)


def invert(img: Image.Image) -> Image.Image:
    return ImageOps.invert(img.convert("L"))


@dataclass
class GateVerdict:
    """What the gate says of one image. ``rotation``: degrees the film appears turned (0 = upright);
    ``inverted``: grey levels appear inverted; both only when the gate is confident. ``distance`` above
    ``distance_limit`` means out of distribution (refused), above ``caution_limit`` unusual (a note)."""

    rotation: int
    rotation_probability: float
    inverted: bool
    inverted_probability: float
    distance: float
    distance_limit: float
    caution_limit: float

    @property
    def out_of_distribution(self) -> bool:
        return self.distance > self.distance_limit

    @property
    def unusual(self) -> bool:
        return self.caution_limit < self.distance <= self.distance_limit

    @property
    def needs_correction(self) -> bool:
        return self.rotation != 0 or self.inverted

    def correct(self, img: Image.Image) -> Image.Image:
        """The film turned upright and its grey levels restored."""
        out = turn(img, -self.rotation) if self.rotation else img
        return invert(out) if self.inverted else out

    def notes(self) -> list[str]:
        out = []
        if self.rotation:
            out.append(f"the film appeared turned by {self.rotation} degrees (gate probability "
                       f"{self.rotation_probability:.2f}); it was turned upright before prediction")
        if self.inverted:
            out.append(f"the film's grey levels appeared inverted (gate probability {self.inverted_probability:.2f}); "
                       "they were inverted back before prediction")
        return out

    def caution(self) -> str | None:
        """The note for an unusual film (accepted, far from most validation films), else None."""
        if not self.unusual:
            return None
        return (f"the film is unusual for this model (distance {self.distance:.1f} to its training films; most "
                f"validation films lie within {self.caution_limit:.1f}): read the result with extra caution")

    def refusal(self) -> str | None:
        if not self.out_of_distribution:
            return None
        return (f"it is far from the chest X-rays the model was trained on (distance {self.distance:.1f}, limit "
                f"{self.distance_limit:.1f}): a photograph, a screenshot, another body part or view, or a very "
                "unusual film")

    def to_dict(self) -> dict:
        return {"rotation": self.rotation, "rotation_probability": round(self.rotation_probability, 4),
                "inverted": self.inverted, "inverted_probability": round(self.inverted_probability, 4),
                "distance": round(self.distance, 3), "distance_limit": round(self.distance_limit, 3),
                "caution_limit": round(self.caution_limit, 3),
                "out_of_distribution": self.out_of_distribution, "unusual": self.unusual}


@dataclass
class InputGate:
    orientation: LinearHead
    polarity: LinearHead
    mean: np.ndarray
    precision: np.ndarray
    distance_limit: float
    confidence: float = 0.9
    meta: dict = field(default_factory=dict)
    caution_limit: float | None = None  # None: no caution band (the refusal limit)

    def __post_init__(self) -> None:
        if self.caution_limit is None:
            self.caution_limit = self.distance_limit

    def distances(self, feats: np.ndarray) -> np.ndarray:
        d = np.asarray(feats, np.float64) - self.mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, self.precision, d), 0.0))

    def verdicts(self, feats: np.ndarray) -> list[GateVerdict]:
        from .calibration import softmax

        feats = np.asarray(feats, np.float64)
        po = softmax(self.orientation.logits(feats))
        pp = softmax(self.polarity.logits(feats))
        dist = self.distances(feats)
        out = []
        for o, p, d in zip(po, pp, dist):
            k = int(o.argmax())
            rot = ROTATIONS[k] if k and o[k] >= self.confidence else 0
            inv = bool(p[1] >= self.confidence)
            out.append(GateVerdict(rotation=rot, rotation_probability=float(o[k]), inverted=inv,
                                   inverted_probability=float(p[1]), distance=float(d),
                                   distance_limit=float(self.distance_limit),
                                   caution_limit=float(self.caution_limit)))
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        np.savez(path, orientation_weight=self.orientation.weight, orientation_bias=self.orientation.bias,
                 polarity_weight=self.polarity.weight, polarity_bias=self.polarity.bias, mean=self.mean,
                 precision=self.precision.astype(np.float32),
                 config=np.frombuffer(json.dumps({"distance_limit": self.distance_limit, "confidence": self.confidence,
                                                  "caution_limit": self.caution_limit, "meta": self.meta}).encode(), dtype=np.uint8))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "InputGate":
        with np.load(path) as z:
            cfg = json.loads(bytes(z["config"]).decode())
            return cls(orientation=LinearHead(z["orientation_weight"], z["orientation_bias"]),
                       polarity=LinearHead(z["polarity_weight"], z["polarity_bias"]), mean=z["mean"],
                       precision=z["precision"].astype(np.float64), distance_limit=float(cfg["distance_limit"]),
                       confidence=float(cfg["confidence"]), meta=cfg.get("meta", {}),
                       caution_limit=cfg.get("caution_limit"))


def fit_gate(upright: np.ndarray, turned: dict[int, np.ndarray], inverted: np.ndarray, validation: np.ndarray, *,
             shifted: np.ndarray | None = None, false_refusal: float = 0.005, C: float = 0.1,
             confidence: float = 0.9, meta: dict | None = None, refusal_margin: float | None = None) -> InputGate:
    """Fit the gate from head features: ``upright`` training films, the same films ``turned`` by each of
    90/180/270 degrees, ``inverted`` copies, and upright ``validation`` films. The ``1 - false_refusal``
    quantile of the validation distances is the caution limit. The refusal limit:

    * with ``refusal_margin`` (release v4 on): ``refusal_margin`` times the largest distance of any real
      film as acquired seen in the fit (the training and validation films; not ``shifted``, whose
      synthetic noise and zoom reach as far as some screenshots do). Distance alone earns a caution; a
      refusal is for what lies far beyond every real film. Quantile limits refused real pediatric films
      of the official test split (3 of 624 with v3's gate); a film is refused only when it is clearly
      not like any of them;
    * without it, the same quantile of ``shifted`` (never below the caution limit); without ``shifted``
      both are the plain-validation quantile."""
    from sklearn.covariance import LedoitWolf

    rot_x = np.concatenate([upright] + [turned[r] for r in ROTATIONS[1:]])
    rot_y = np.concatenate([np.full(len(upright), 0)] + [np.full(len(turned[r]), i) for i, r in
                                                          enumerate(ROTATIONS) if r])
    orientation = fit_probe(rot_x, rot_y, C=C, n_classes=len(ROTATIONS))
    polarity = fit_probe(np.concatenate([upright, inverted]),
                         np.concatenate([np.zeros(len(upright), int), np.ones(len(inverted), int)]), C=C, n_classes=2)
    lw = LedoitWolf().fit(np.asarray(upright, np.float64))
    gate = InputGate(orientation=orientation, polarity=polarity, mean=lw.location_, precision=lw.precision_,
                     distance_limit=float("inf"), confidence=confidence, meta=dict(meta or {}))
    gate.caution_limit = float(np.quantile(gate.distances(validation), 1 - false_refusal))
    if refusal_margin:
        farthest = max(float(gate.distances(x).max()) for x in (upright, validation))
        gate.distance_limit = max(gate.caution_limit, refusal_margin * farthest)
        gate.meta.update(refusal_margin=refusal_margin, farthest_real_film=farthest)
    else:
        gate.distance_limit = gate.caution_limit if shifted is None or not len(shifted) else max(
            gate.caution_limit, float(np.quantile(gate.distances(shifted), 1 - false_refusal)))
    gate.meta.update(false_refusal_target=false_refusal, shrinkage=float(lw.shrinkage_), n_upright=int(len(upright)))
    return gate


def file_beside(model_id_or_dir: str, filename: str, revision: str | None = None) -> Path | None:
    """A file saved beside a model's weights (a folder, or a Hub repo through the real client), or None
    when the model has none: the input gate, the scope check."""
    path = Path(model_id_or_dir)
    if path.is_dir():
        return path / filename if (path / filename).exists() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(model_id_or_dir, filename, revision=revision))
    except EntryNotFoundError:
        return None


def load_gate(model_id_or_dir: str, revision: str | None = None) -> InputGate | None:
    """The gate saved beside a model (folder or Hub repo), or None when it has none."""
    found = file_beside(model_id_or_dir, GATE_FILE, revision)
    return None if found is None else InputGate.load(found)


def gate_features(model, processor, images, *, batch_size: int = 32, precision: str = "bfloat16") -> np.ndarray:
    """Head features of PIL images (what :class:`InputGate` reads), in the Space's precision."""
    from .features import features_fn

    fn = features_fn(model, processor, n_layers=0, precision=precision)
    images = list(images)
    return np.concatenate([fn(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]) if images \
        else np.zeros((0, 0))


def fit_for_model(model_dir: str, dataset: str, *, n_fit: int = 1500, seed: int = 0, false_refusal: float = 0.005,
                  battery: bool = True, progress: bool = True, refusal_margin: float | None = 1.25
                  ) -> tuple[InputGate, dict]:
    """Fit the gate of a saved model: ``n_fit`` training films (stratified) upright, turned and
    inverted; the caution limit from all validation films; the refusal limit ``refusal_margin`` times the
    farthest training or validation film (``refusal_margin=None``: the quantile of the validation films
    under the robustness battery, or with ``battery=False`` of the plain ones). With ``battery`` the
    report also counts verdicts under the battery. Returns the gate and the validation numbers (false
    refusals, cautions, and how many turned / inverted films are caught)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .data import load_cxr_dataset, stratified_subset
    from .image_io import to_grayscale
    from .robustness import battery_logits, condition_names

    model = AutoModelForImageClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    ds = load_cxr_dataset(dataset)
    train = stratified_subset(ds["train"], n_fit, seed)
    films = [to_grayscale(r["image"]) for r in tqdm(train, desc="gate: training films", disable=not progress)]
    feats = lambda imgs: gate_features(model, processor, imgs)  # noqa: E731
    upright = feats(films)
    turned = {r: feats([turn(f, r) for f in films]) for r in ROTATIONS[1:]}
    inverted = feats([invert(f) for f in films])
    val_films = [to_grayscale(r["image"]) for r in ds["validation"]]
    val = feats(val_films)
    shifted = None
    if battery:
        with tqdm(total=len(val_films), desc="gate: validation under the battery", disable=not progress) as bar:
            shifted = np.concatenate(list(battery_logits(feats, val_films, names=condition_names()[1:],
                                                         progress=bar.update).values()))
    # meta["model"]: relative (shown_path), since the gate file ships with the model
    gate = fit_gate(upright, turned, inverted, val, shifted=shifted, false_refusal=false_refusal,
                    refusal_margin=refusal_margin,
                    meta={"model": shown_path(model_dir), "n_fit": len(films), "seed": seed, "precision": "bfloat16",
                          "refusal_limit_from": (f"{refusal_margin} x the farthest real film as acquired "
                                                 "(training and validation films)")
                          if refusal_margin else "validation under the robustness battery" if battery else
                          "plain validation"})
    report = {"validation_films": len(val_films), "validation": summarize(gate.verdicts(val), expect=None),
              "caution_limit": gate.caution_limit, "distance_limit": gate.distance_limit}
    if shifted is not None:
        report["validation_under_battery"] = summarize(gate.verdicts(shifted), expect=None)
    for r in ROTATIONS[1:]:
        report[f"validation_turned_{r}"] = summarize(gate.verdicts(feats([turn(f, r) for f in val_films])), expect=r)
    report["validation_inverted"] = summarize(gate.verdicts(feats([invert(f) for f in val_films])), expect="inverted")
    return gate, report


def summarize(verdicts: list[GateVerdict], expect: int | str | None) -> dict:
    """Counts over verdicts: refused (out of distribution), corrected as expected (``expect``: the
    rotation, or "inverted"), and, for upright films (``expect=None``), wrongly corrected."""
    n = len(verdicts)
    refused = sum(v.out_of_distribution for v in verdicts)
    out = {"n": n, "refused": refused, "refused_rate": refused / n if n else float("nan"),
           "unusual": sum(v.unusual for v in verdicts)}
    if expect is None:
        wrong = sum(v.needs_correction for v in verdicts)
        out.update(wrongly_corrected=wrong, false_refusal_or_change_rate=(sum(
            v.out_of_distribution or v.needs_correction for v in verdicts) / n if n else float("nan")))
    else:
        ok = sum((v.rotation == expect) if isinstance(expect, int) else v.inverted for v in verdicts)
        caught = sum(((v.rotation == expect) if isinstance(expect, int) else v.inverted) or v.out_of_distribution
                     for v in verdicts)
        out.update(corrected=ok, caught=caught, caught_rate=caught / n if n else float("nan"))
    return out
