"""How much does bfloat16 inference change the released model's outputs? Over a whole dataset split.

    python benchmarks/precision_agreement.py --model space/model --dataset data/cxr-pneumonia --split validation \
        --output benchmarks/results/precision_agreement.json

Compares ``Predictor(precision="bfloat16")`` with the float32 predictor image by image: max and
99th-percentile absolute probability difference, changed labels, changed pneumonia calls at the
stored threshold. Validation by default: this is a property of the arithmetic, not a test result.

Also, since issue 21 (the Space's heatmap pass runs in the predictor's precision) and issue 18 (the
compiled fast path): the same comparison for ``Predictor.compile()`` (single films, as the Space calls
it), and Grad-CAM maps in bfloat16 against float32 on ``--heatmaps`` films (Pearson correlation per
map; overlap of the hottest 20% of pixels, as intersection over union).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from modeling.labels import LABELS
from modeling.metrics import agreement
from modeling.paths import shown_path

ROOT = Path(__file__).resolve().parents[1]

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "space" / "model"))
    ap.add_argument("--dataset", default=str(ROOT / "data" / "cxr-pneumonia"))
    ap.add_argument("--split", default="validation")
    ap.add_argument("--heatmaps", type=int, default=100, help="films whose Grad-CAM maps are compared (0: none)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled predictor")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "precision_agreement.json"),
                    help="write the report as JSON here (the card reads this file); '-' prints only")
    args = ap.parse_args(argv)

    import torch

    from modeling.data import load_cxr_dataset, require_split
    from modeling.image_io import to_grayscale
    from modeling.predict import Predictor

    split = require_split(load_cxr_dataset(args.dataset), args.split)
    fp32 = Predictor.from_pretrained(args.model, precision="float32")
    bf16 = Predictor(fp32.model, fp32.processor, precision="bfloat16")
    a, b = [], []
    for start in range(0, len(split), 32):
        images = [to_grayscale(im) for im in split[start:start + 32]["image"]]
        a.append(torch.softmax(fp32.logits(images), -1).numpy())
        b.append(torch.softmax(bf16.logits(images), -1).numpy())
    report = {"model": shown_path(args.model), "model_revision": fp32.revision, "split": args.split,
              **agreement(np.concatenate(a), np.concatenate(b), threshold=fp32.threshold)}
    if not args.no_compile:
        compiled = Predictor(fp32.model, fp32.processor, precision="bfloat16")
        info = compiled.compile()
        if info["compiled"]:
            c = np.array([[p.probabilities[k] for k in LABELS] for p in
                          compiled.predict((to_grayscale(im) for im in split["image"]), batch_size=1)])
            report["bfloat16_compiled"] = {"compilation": info,
                                           **agreement(np.concatenate(a), c, threshold=fp32.threshold)}
        else:
            report["bfloat16_compiled"] = {"compilation": info}
    if args.heatmaps:
        step = max(1, len(split) // args.heatmaps)
        r, iou = [], []
        for i in range(0, len(split), step)[: args.heatmaps]:
            im = to_grayscale(split[i]["image"])
            m32, m16 = fp32.predict_one(im, heatmap=True).heatmap.ravel(), bf16.predict_one(im, heatmap=True).heatmap.ravel()
            r.append(float(np.corrcoef(m32, m16)[0, 1]) if m32.std() > 0 and m16.std() > 0 else float(np.array_equal(m32, m16)))
            k = max(1, int(0.2 * m32.size))
            hot32, hot16 = set(np.argsort(m32)[-k:].tolist()), set(np.argsort(m16)[-k:].tolist())
            iou.append(len(hot32 & hot16) / len(hot32 | hot16))
        report["gradcam_bfloat16_vs_float32"] = {
            "films": len(r), "pearson_median": float(np.median(r)), "pearson_p5": float(np.percentile(r, 5)),
            "pearson_min": float(np.min(r)), "hottest_20pct_iou_median": float(np.median(iou)),
            "hottest_20pct_iou_min": float(np.min(iou))}
    print(json.dumps(report, indent=2))
    if args.output != "-":
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
