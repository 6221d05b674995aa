"""How much does bfloat16 inference change the released model's outputs? Over a whole dataset split.

    python benchmarks/precision_agreement.py --model space/model --dataset data/cxr-pneumonia --split validation \
        --output benchmarks/results/precision_agreement.json

Compares ``Predictor(precision="bfloat16")`` with the float32 predictor image by image: max and
99th-percentile absolute probability difference, changed labels, changed pneumonia calls at the
stored threshold. Validation by default: this is a property of the arithmetic, not a test result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from modeling.paths import shown_path
from modeling.metrics import agreement

ROOT = Path(__file__).resolve().parents[1]

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "space" / "model"))
    ap.add_argument("--dataset", default=str(ROOT / "data" / "cxr-pneumonia"))
    ap.add_argument("--split", default="validation")
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
    print(json.dumps(report, indent=2))
    if args.output != "-":
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
