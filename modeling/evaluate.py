"""Evaluate a saved model on a dataset split: metrics with patient-grouped bootstrap CIs, plots,
per-image predictions; and calibrate a saved checkpoint on validation (:func:`calibrate_saved`).

    cxr-evaluate --model DIR_OR_HUB_ID --dataset DIR_OR_HUB_ID --split test --output-dir DIR

``train.py`` calls :func:`evaluate_model` for its final test evaluation, so the numbers in a model
card and the numbers this command prints for the same model are computed by the same code.

When the split has an ``image_sha256`` column (datasets built by ``dataset_scripts.build``), the
metrics are also reported with exact duplicates collapsed to one image each
(``metrics["exact_dedup"]``): Kermany's official test split contains a few byte-identical films,
which count twice in the usual numbers.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .calibration import Calibration, calibrate, softmax
from .data import groups_of, load_cxr_dataset, require_split
from .labels import LABELS, pneumonia_probability
from .preprocessing import pixel_values


def predict_logits(model, processor, split, *, batch_size: int = 32, progress: bool = True,
                   desc: str = "predict") -> np.ndarray:
    """Logits (N, 3) of ``model`` over the rows of a ``datasets`` split (its ``image`` column)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(split), batch_size), desc=desc, disable=not progress, unit="batch"):
            images = split[start:start + batch_size]["image"]
            pv = pixel_values(processor, images).to(device)
            out.append(model(pixel_values=pv).logits.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(LABELS)), dtype=np.float32)


def exact_dedup_index(split) -> np.ndarray | None:
    """Row indices keeping the first row of each ``image_sha256`` (None without that column)."""
    if "image_sha256" not in split.column_names:
        return None
    seen: set[str] = set()
    keep = []
    for i, h in enumerate(split["image_sha256"]):
        if h not in seen:
            seen.add(h)
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def evaluate_probs(probs: np.ndarray, labels: np.ndarray, groups: list[str] | None, *, threshold: float,
                   n_bootstrap: int = 1000, seed: int = 0, dedup_index: np.ndarray | None = None) -> dict:
    """Metrics (with CIs), plus ``exact_dedup`` metrics over ``dedup_index`` when given."""
    from .metrics import compute_metrics

    metrics = compute_metrics(probs, labels, groups, threshold=threshold, n_bootstrap=n_bootstrap, seed=seed)
    if dedup_index is not None and len(dedup_index) < len(labels):
        g = None if groups is None else [groups[i] for i in dedup_index]
        metrics["exact_dedup"] = compute_metrics(probs[dedup_index], labels[dedup_index], g, threshold=threshold,
                                                 n_bootstrap=n_bootstrap, seed=seed)
        metrics["exact_dedup"]["n_removed"] = int(len(labels) - len(dedup_index))
    return metrics


def evaluate_model(model, processor, split, output_dir: Path | None, *, threshold: float, split_name: str = "test",
                   batch_size: int = 32, n_bootstrap: int = 1000, seed: int = 0, progress: bool = True,
                   extra: dict | None = None) -> dict:
    """Predict ``split``, compute metrics; with ``output_dir`` write ``metrics.json``,
    ``predictions.csv`` and the plots. Returns the metrics dict."""
    t0 = time.perf_counter()
    logits = predict_logits(model, processor, split, batch_size=batch_size, progress=progress, desc=f"eval {split_name}")
    seconds = time.perf_counter() - t0
    probs = softmax(logits.astype(np.float64))
    labels = np.asarray(split["label"], dtype=np.int64)
    groups = groups_of(split)
    metrics = evaluate_probs(probs, labels, groups, threshold=threshold, n_bootstrap=n_bootstrap, seed=seed,
                             dedup_index=exact_dedup_index(split))
    metrics["split"] = split_name
    metrics["seconds"] = round(seconds, 2)
    metrics["images_per_second"] = round(len(labels) / seconds, 2) if seconds > 0 else None
    metrics.update(extra or {})
    if output_dir is not None:
        from .plots import save_plots

        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_predictions(output_dir / "predictions.csv", split, probs, threshold)
        save_plots(probs, labels, output_dir / "plots", threshold=threshold, title_prefix=f"{split_name}: ")
    return metrics


def write_predictions(path: Path, split, probs: np.ndarray, threshold: float) -> None:
    """One row per image: identifiers (no pixels), truth, probabilities, decision."""
    ids = {c: split[c] for c in ("source_path", "patient_id", "image_sha256") if c in split.column_names}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", *ids, "label", "predicted", *[f"p_{n}" for n in LABELS], "p_pneumonia", "pneumonia_call"])
        for i, (p, y) in enumerate(zip(probs, split["label"])):
            pp = pneumonia_probability(p)
            w.writerow([i, *(ids[c][i] for c in ids), LABELS[y], LABELS[int(p.argmax())],
                        *(f"{v:.6f}" for v in p), f"{pp:.6f}", int(pp >= threshold)])


def calibrate_on(model, processor, split, *, target_sensitivity: float = 0.985, batch_size: int = 32,
                 progress: bool = True) -> tuple[Calibration, np.ndarray]:
    """Predict ``split`` (validation: never test) with the uncalibrated ``model``, fit the temperature
    and the pneumonia threshold on it and bake them into ``model`` (:func:`modeling.calibration.calibrate`).
    Returns the calibration and the uncalibrated logits. The one step both ``train.py`` and
    :func:`calibrate_saved` run."""
    logits = predict_logits(model, processor, split, batch_size=batch_size, progress=progress, desc="calibrate")
    return calibrate(model, logits, np.asarray(split["label"]), target_sensitivity=target_sensitivity), logits


def calibrate_under_battery(model, processor, split, *, target_sensitivity: float = 0.985,
                            condition_sensitivity: float = 0.97, battery_logits: dict | None = None,
                            progress: bool = True) -> Calibration:
    """The v4 operating point (:func:`modeling.robustness.fit_battery_operating_point`): the temperature
    on the pooled logits of plain validation and every battery condition, the threshold that keeps
    ``target_sensitivity`` plain and ``condition_sensitivity`` under each condition; baked into
    ``model``. The logits are bfloat16 passes, as the candidates were scored (``battery_logits``: those
    of ``benchmarks/recipes.py score``, reused after checking that their plain row is this model's)."""
    from . import robustness as rb
    from .calibration import calibrate_with

    labels = np.asarray(split["label"])
    fn = rb.model_logits_fn(model, processor, "bfloat16")
    images = [row["image"] for row in split]
    if battery_logits is not None:
        plain = np.concatenate([fn(images[i:i + 32]) for i in range(0, len(images), 32)])
        if np.asarray(battery_logits[rb.PLAIN]).shape != plain.shape or \
                np.abs(np.asarray(battery_logits[rb.PLAIN]) - plain).max() > 0.05:
            raise ValueError("the battery logits given are not this model's on this split (plain rows differ)")
    else:
        from tqdm.auto import tqdm

        with tqdm(total=len(images), desc="calibrate: battery", disable=not progress) as bar:
            battery_logits = rb.battery_logits(fn, images, progress=bar.update)
    op = rb.fit_battery_operating_point(battery_logits, labels, plain_sensitivity=target_sensitivity,
                                        condition_sensitivity=condition_sensitivity)
    return calibrate_with(model, op.temperature, op.threshold, battery_logits[rb.PLAIN], labels,
                          target_sensitivity=target_sensitivity, condition_sensitivity=condition_sensitivity,
                          fitted_on="validation + robustness battery (bfloat16 logits)",
                          fit_rule=f"temperature on the pooled plain + {len(battery_logits) - 1}-condition logits; "
                                   "threshold the highest "
                                   f"keeping sensitivity >= {target_sensitivity} plain and >= {condition_sensitivity} "
                                   "under every condition")


def calibrate_saved(model_dir: str, dataset: str, output_dir: str, *, crop_pct: float | None = None,
                    target_sensitivity: float = 0.985, split: str = "validation", batch_size: int = 32,
                    progress: bool = True, battery: bool = False, battery_logits: str | None = None,
                    condition_sensitivity: float = 0.97) -> Calibration:
    """Calibrate an uncalibrated ``save_pretrained`` folder (a ``train.py`` ``checkpoints/best``) on the
    dataset's validation split and save the result (weights with T baked in, config, processor) to
    ``output_dir``. ``crop_pct`` replaces the processor's evaluation centre crop first, so the
    temperature and threshold are fit for the preprocessing that is saved: the way to adopt a crop
    chosen on validation (``benchmarks/checkpoint_variants.py``) without retraining."""
    from dataclasses import replace

    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .preprocessing import build_image_processor, config_from_processor

    if split == "test":
        raise ValueError("calibration is fit on validation only; the official test split is for reporting")
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    model = AutoModelForImageClassification.from_pretrained(model_dir, dtype=torch.float32)
    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    if crop_pct is not None:
        processor = build_image_processor(replace(config_from_processor(processor), crop_pct=crop_pct))
    val = require_split(load_cxr_dataset(dataset), split)
    if battery or battery_logits:
        given = dict(np.load(battery_logits)) if battery_logits else None
        cal = calibrate_under_battery(model, processor, val, target_sensitivity=target_sensitivity,
                                      condition_sensitivity=condition_sensitivity, battery_logits=given,
                                      progress=progress)
    else:
        cal, _ = calibrate_on(model, processor, val, target_sensitivity=target_sensitivity, batch_size=batch_size,
                              progress=progress)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return cal
