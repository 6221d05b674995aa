"""Reproduce the released model's official-test numbers independently of this project's code.

    python benchmarks/reproduce_test.py --model space/model \
        --test-dir ../shared/data/kermany/chest_xray/test --expected space/model/eval/test/metrics.json

Uses only transformers (``AutoModelForImageClassification`` + the saved image processor), Pillow,
NumPy and scikit-learn: no ``modeling`` import, no dataset build. Labels come from Kermany's layout
(``NORMAL/`` -> normal; ``PNEUMONIA/*bacteria*`` / ``*virus*``). Prints each metric next to the
model card's value and exits 1 if any differs by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from transformers import AutoImageProcessor, AutoModelForImageClassification

LABELS = ["normal", "bacterial_pneumonia", "viral_pneumonia"]


def kermany_label(path: Path) -> int:
    if path.parent.name == "NORMAL":
        return 0
    name = path.name.lower()
    if "bacteria" in name:
        return 1
    if "virus" in name:
        return 2
    raise ValueError(f"cannot tell the class of {path}")


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label expected calibration error, equal-width bins on (0, 1]."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="space/model")
    ap.add_argument("--test-dir", default=str(Path(__file__).resolve().parents[2] / "shared/data/kermany/chest_xray/test"))
    ap.add_argument("--expected", default=None, help="metrics.json to compare with (default: MODEL/eval/test)")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)

    model = AutoModelForImageClassification.from_pretrained(args.model).eval()
    processor = AutoImageProcessor.from_pretrained(args.model, backend="pil")
    assert [model.config.id2label[i] for i in range(3)] == LABELS
    threshold = model.config.cxr_calibration["pneumonia_threshold"]
    files = sorted(p for p in Path(args.test_dir).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    labels = np.array([kermany_label(p) for p in files])
    probs = []
    with torch.inference_mode():
        for i in range(0, len(files), args.batch_size):
            images = [Image.open(p).convert("L").convert("RGB") for p in files[i:i + args.batch_size]]
            logits = model(**processor(images=images, return_tensors="pt")).logits
            probs.append(torch.softmax(logits.double(), -1).numpy())
    probs = np.concatenate(probs)
    pred = probs.argmax(1)
    p_pneu = probs[:, 1] + probs[:, 2]
    call, truth = p_pneu >= threshold, labels > 0
    got = {
        "n": len(labels),
        "accuracy": accuracy_score(labels, pred),
        "macro_f1": f1_score(labels, pred, average="macro"),
        **{f"per_class.{n}.f1": f for n, f in zip(LABELS, f1_score(labels, pred, average=None))},
        "auc_ovr_macro": roc_auc_score(labels, probs, multi_class="ovr", average="macro"),
        "binary.accuracy": float((call == truth).mean()),
        "binary.sensitivity": float(call[truth].mean()),
        "binary.specificity": float((~call[~truth]).mean()),
        "binary.auc": roc_auc_score(truth, p_pneu),
        "ece": ece(probs, labels),
    }
    expected_path = Path(args.expected) if args.expected else Path(args.model) / "eval" / "test" / "metrics.json"
    expected = json.loads(expected_path.read_text())

    def lookup(d, key):
        for part in key.split("."):
            d = d[part]
        return d

    bad = 0
    print(f"{'metric':32s} {'reproduced':>11s} {'card':>11s}")
    for key, value in got.items():
        want = lookup(expected, key)
        ok = abs(float(value) - float(want)) <= args.tolerance
        bad += not ok
        print(f"{key:32s} {float(value):11.4f} {float(want):11.4f} {'' if ok else '  <-- differs'}")
    print(json.dumps({"reproduced": True, "mismatches": bad, "n": len(labels)}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
