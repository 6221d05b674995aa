"""Validation-only comparison of cheap variants of a trained model: checkpoint weight averages
("model soups", Wortsman et al. 2022), logit ensembles of checkpoints and test-time augmentation.

Why this exists: issue 5 lists TTA and checkpoint ensembles among the fair CPU tricks. This script
measures them on the *validation* split only (the official test split is never read here), with a
patient-grouped paired bootstrap of the macro-F1 difference against the reference model, so a
release decision can be made before any test evaluation.

    python benchmarks/checkpoint_variants.py --dataset data/cxr-pneumonia \\
        --model outputs/stageB-224/checkpoints/best \\
        --soup outputs/stageB-224/checkpoints/best outputs/stageB-224/checkpoints/epoch-003 \\
               outputs/stageB-224/checkpoints/epoch-004 \\
        --out benchmarks/results/checkpoint_variants.json

A weight average is one model (same latency as the reference); a logit ensemble of k checkpoints and
TTA with v views cost k or v forward passes per image; an evaluation centre crop (``--crop-pcts``)
costs nothing at inference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, roc_auc_score
from transformers import AutoImageProcessor, AutoModelForImageClassification

from modeling.cli import add_flag, parse
from modeling.calibration import choose_threshold, fit_temperature, nll, softmax
from modeling.data import groups_of, load_cxr_dataset
from modeling.labels import pneumonia_probability
from modeling.metrics import paired_bootstrap_macro_f1
from modeling.models import average_weights, state_dict_of
from modeling.preprocessing import build_image_processor, config_from_processor, pixel_values

ROOT = Path(__file__).resolve().parents[1]

def views(pv: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
    """Test-time views of a batch of processed images (N, 3, S, S)."""
    s = pv.shape[-1]
    out = []
    for name in names:
        if name == "identity":
            out.append(pv)
        elif name.startswith("zoom"):  # centre crop of a fraction of the side, resized back
            f = float(name[4:])
            c = round(s * f)
            o = (s - c) // 2
            out.append(F.interpolate(pv[..., o:o + c, o:o + c], size=(s, s), mode="bicubic", align_corners=False))
        elif name.startswith("scale"):  # the whole image at another input size (ViT interpolates positions)
            t = int(name[5:])
            out.append(F.interpolate(pv, size=(t, t), mode="bicubic", align_corners=False))
        else:
            raise ValueError(f"unknown view {name!r}")
    return out


def val_logits(model, processor, split, view_names: list[str], batch_size: int = 32) -> np.ndarray:
    """(V, N, 3) logits for each view."""
    model.eval()
    per_view: list[list[np.ndarray]] = [[] for _ in view_names]
    with torch.inference_mode():
        for start in range(0, len(split), batch_size):
            pv = pixel_values(processor, split[start:start + batch_size]["image"])
            for i, v in enumerate(views(pv, view_names)):
                per_view[i].append(model(pixel_values=v).logits.float().numpy())
    return np.stack([np.concatenate(v) for v in per_view])


def summary(logits: np.ndarray, labels: np.ndarray, target_sensitivity: float) -> dict:
    t = fit_temperature(logits, labels)
    p = softmax(logits / t)
    pneu = pneumonia_probability(p)
    is_p = labels > 0
    thr = choose_threshold(pneu, is_p, target_sensitivity)
    pred = p.argmax(1)
    return {
        "macro_f1": float(f1_score(labels, pred, average="macro")),
        "viral_f1": float(f1_score(labels, pred, labels=[2], average="macro")),
        "accuracy": float((pred == labels).mean()),
        "nll_calibrated": nll(logits, labels, t),
        "temperature": t,
        "binary_auc": float(roc_auc_score(is_p, pneu)),
        "specificity_at_threshold": float((pneu[~is_p] < thr).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="data/cxr-pneumonia")
    add_flag(ap, "--model", old=("--reference",), required=True, type=Path,
             help="the reference: a save_pretrained folder (has config.json)")
    ap.add_argument("--soup", nargs="*", type=Path, default=[], help="checkpoints to weight-average (and logit-ensemble)")
    ap.add_argument("--candidates", nargs="*", type=Path, default=[], help="other save_pretrained folders to compare")
    ap.add_argument("--views", nargs="*", default=["identity", "zoom0.9", "scale252"])
    ap.add_argument("--crop-pcts", nargs="*", type=float, default=[],
                    help="evaluate the reference with the saved processor's centre-crop variant at these fractions")
    ap.add_argument("--target-sensitivity", type=float, default=0.985)
    ap.add_argument("--threads", type=int, default=2)
    add_flag(ap, "--output", old=("--out",), type=Path, default=ROOT / "benchmarks/results/checkpoint_variants.json")
    args = parse(ap, argv)
    torch.set_num_threads(args.threads)

    split = load_cxr_dataset(args.dataset)["validation"]
    labels = np.asarray(split["label"])
    groups = groups_of(split) or [str(i) for i in range(len(split))]
    processor = AutoImageProcessor.from_pretrained(args.model, backend="pil")  # as the predictor loads it
    model = AutoModelForImageClassification.from_pretrained(args.model)
    reference_weights = {k: v.clone() for k, v in model.state_dict().items()}  # the soup rows overwrite them

    logits: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    cache_file = ROOT / "outputs" / "checkpoint_variants.cache.npz"  # reruns skip already-computed logits
    cache = dict(np.load(cache_file)) if cache_file.exists() else {}

    def cached(key: str, fn):
        if key not in cache:
            cache[key] = fn()
            cache_file.parent.mkdir(exist_ok=True)
            np.savez_compressed(cache_file, **cache)
        return cache[key]

    ref_views = cached(f"{args.model.resolve()}|{','.join(args.views)}",
                       lambda: val_logits(model, processor, split, args.views))
    for name, lv in zip(args.views, ref_views):
        logits[f"reference[{name}]"] = lv
    logits["reference+tta[mean logits of " + ",".join(args.views) + "]"] = ref_views.mean(0)
    print(f"reference and {len(args.views)} views: {time.perf_counter() - t0:.0f} s", flush=True)

    if args.soup:
        singles = []
        for p in args.soup:
            if p.resolve() == args.model.resolve():
                singles.append(ref_views[0])
                continue
            def one(p=p):
                model.load_state_dict(state_dict_of(p), strict=True)
                return val_logits(model, processor, split, ["identity"])[0]
            singles.append(cached(f"{p.resolve()}|identity", one))
            logits[f"checkpoint[{p.name}]"] = singles[-1]
        logits[f"logit-ensemble[{len(singles)} checkpoints]"] = np.mean(singles, 0)
        logits[f"weight-average[{len(args.soup)} checkpoints]"] = cached(
            "soup:" + ",".join(str(p.resolve()) for p in args.soup),
            lambda: val_logits(average_weights(model, list(args.soup)), processor, split, ["identity"])[0])
        print(f"soup: {time.perf_counter() - t0:.0f} s", flush=True)

    base_cfg = config_from_processor(processor)
    for f in args.crop_pcts:
        cp = build_image_processor(replace(base_cfg, crop_pct=f))
        def with_crop(cp=cp):
            model.load_state_dict(reference_weights)
            return val_logits(model, cp, split, ["identity"])[0]
        logits[f"reference[crop_pct={f}]"] = cached(f"{args.model.resolve()}|crop{f}", with_crop)
        print(f"crop {f}: {time.perf_counter() - t0:.0f} s", flush=True)

    for c in args.candidates:
        logits[f"candidate[{c}]"] = cached(f"{c.resolve()}|identity", lambda c=c: val_logits(
            AutoModelForImageClassification.from_pretrained(c), AutoImageProcessor.from_pretrained(c, backend="pil"), split, ["identity"])[0])

    ref_pred = logits[f"reference[{args.views[0]}]"].argmax(1)
    rows = {}
    for name, lg in logits.items():
        rows[name] = summary(lg, labels, args.target_sensitivity)
        rows[name]["vs_reference"] = paired_bootstrap_macro_f1(ref_pred, lg.argmax(1), labels, groups)
        r = rows[name]
        print(f"{name:70s} F1 {r['macro_f1']:.4f} viral {r['viral_f1']:.4f} acc {r['accuracy']:.4f} "
              f"NLL {r['nll_calibrated']:.4f} AUC {r['binary_auc']:.4f} spec {r['specificity_at_threshold']:.3f} "
              f"dF1 {r['vs_reference']['delta_macro_f1']:+.4f} {r['vs_reference']['ci95']}", flush=True)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "split": "validation", "n": int(len(labels)), "reference": str(args.model),
        "soup": [str(p) for p in args.soup], "views": args.views,
        "note": "threshold and temperature are fit and scored on validation itself (in-sample, same for every row)",
        "results": rows,
    }, indent=2) + "\n")
    (ROOT / "outputs").mkdir(exist_ok=True)
    np.savez_compressed(ROOT / "outputs" / (args.output.stem + ".logits.npz"), labels=labels, **{k: v for k, v in logits.items()})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
