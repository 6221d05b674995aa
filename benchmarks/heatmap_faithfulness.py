"""How faithful each heatmap is, on validation films (a measurement, not a test).

Methods: Grad-CAM at the last block's ``norm1`` (the server's layer until v5) and one block earlier
(the server's layer from v5: this measurement chose it), the private page's forward-only map (the head's contribution per
patch token, :mod:`modeling.onnx_export`), two other forward-only candidates for the page (the last
block's CLS attention, attention rollout), and a smooth random map as the floor. Faithfulness is
pytorch-grad-cam's own ROAD metrics (Rong et al. 2022): the predicted class's softmax score after
removing (noisy linear imputation) the most relevant pixels first (MoRF, lower is better) or the least
relevant first (LeRF, higher is better), averaged over removal percentiles, and ROADCombined
((LeRF - MoRF) / 2, higher is better).

Where the heat lies: no lung masks are available here, so two geometric proxies are reported, the
share of each map's heat in the central third of the width (spine and mediastinum on a frontal film)
and in the bottom fifth of the height (mostly below the diaphragm on these films); they are proxies,
not anatomy.

    python benchmarks/heatmap_faithfulness.py [--films 48] [--model space/model]

Writes ``benchmarks/results/heatmap_faithfulness.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PERCENTILES = [20, 40, 60, 80]


def smooth_random(rng, n: int, size: int) -> np.ndarray:
    from PIL import Image

    maps = []
    for _ in range(n):
        small = Image.fromarray(rng.random((16, 16)).astype(np.float32), mode="F")
        m = np.asarray(small.resize((size, size), Image.Resampling.BILINEAR), np.float32)
        maps.append((m - m.min()) / (m.max() - m.min()))
    return np.stack(maps)


def head_maps(model, pv: torch.Tensor, classes: list[int]) -> np.ndarray:
    from modeling.onnx_export import HeadDecomposition

    with torch.inference_mode():
        _, _, contrib = HeadDecomposition(model)(pv)
    size = pv.shape[-1]
    out = []
    for c, k in zip(contrib, classes):
        m = torch.relu(c[k])[None, None]
        m = torch.nn.functional.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
        out.append(m / m.max() if m.max() > 0 else m)
    return np.stack(out).astype(np.float32)


def attention_maps(model_dir: str, pv: torch.Tensor, rollout: bool) -> np.ndarray:
    """Forward-only, class-agnostic candidates for the page: the CLS token's attention to each patch
    in the last block (mean over heads), or attention rollout (Abnar & Zuidema 2020: per block the
    head-mean attention plus the identity for the residual, row-normalised, multiplied through the
    blocks; the CLS row). Eager attention, as the SDPA kernel returns no weights."""
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.inference_mode():
        att = model(pixel_values=pv, output_attentions=True).attentions  # blocks x (B, heads, N, N)
    n = att[0].shape[-1]
    if rollout:
        eye = torch.eye(n)
        r = eye.expand(pv.shape[0], n, n).clone()
        for a in att:
            a = 0.5 * a.float().mean(1) + 0.5 * eye
            r = (a / a.sum(-1, keepdim=True)) @ r
        cls = r[:, 0, 1:]
    else:
        cls = att[-1].float().mean(1)[:, 0, 1:]
    g = int(round((n - 1) ** 0.5))
    size = pv.shape[-1]
    m = torch.nn.functional.interpolate(cls.reshape(-1, 1, g, g), size=(size, size), mode="bilinear",
                                        align_corners=False)[:, 0]
    lo, hi = m.amin((1, 2), keepdim=True), m.amax((1, 2), keepdim=True)
    return ((m - lo) / (hi - lo).clamp_min(1e-12)).numpy().astype(np.float32)


def gradcam_maps(model, pv: torch.Tensor, classes: list[int], block: int) -> np.ndarray:
    from modeling.gradcam import GradCam, _transformer_blocks

    cam = GradCam(model)
    cam._target_layers = [_transformer_blocks(model.dinov2)[block].norm1]  # the layer asked for, whatever the default
    return cam.explain(pv, classes).maps


def heat_shares(maps: np.ndarray) -> dict:
    h, w = maps.shape[-2:]
    total = maps.sum((1, 2)) + 1e-12
    centre = maps[:, :, w // 3: w - w // 3].sum((1, 2)) / total
    bottom = maps[:, h - h // 5:, :].sum((1, 2)) / total
    return {"central_third_share": float(centre.mean()), "bottom_fifth_share": float(bottom.mean()),
            "uniform_map_would_give": {"central_third_share": (w - 2 * (w // 3)) / w, "bottom_fifth_share": (h // 5) / h}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--films", type=int, default=48)
    ap.add_argument("--model", default=str(ROOT / "space" / "model"))
    ap.add_argument("--dataset", default=str(ROOT / "data" / "cxr-pneumonia"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "heatmap_faithfulness.json"))
    ap.add_argument("--only", nargs="+", metavar="WORD",
                    help="run only the methods whose name contains one of these words, and replace or add their "
                         "rows in an existing --output (same films, same seeds: each method's row does not depend "
                         "on the others, except the random floor's, which needs a full run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from modeling.data import load_cxr_dataset, require_split
    from modeling.grad_cam_import import import_pytorch_grad_cam
    from modeling.gradcam import ClassifierLogits
    from modeling.predict import Predictor
    from modeling.preprocessing import pixel_values

    import_pytorch_grad_cam("metrics.road")
    from pytorch_grad_cam.metrics.road import (ROADCombined, ROADLeastRelevantFirstAverage,
                                               ROADMostRelevantFirstAverage)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    predictor = Predictor.from_pretrained(args.model)
    model = predictor.model
    split = require_split(load_cxr_dataset(args.dataset), "validation")
    rng = np.random.default_rng(0)
    idx = sorted(rng.choice(len(split), size=min(args.films, len(split)), replace=False).tolist())
    films = [split[i]["image"] for i in idx]
    pv = pixel_values(predictor.processor, films)
    with torch.inference_mode():
        classes = model(pixel_values=pv).logits.argmax(-1).tolist()
    methods = {
        "Grad-CAM, last block norm1 (the server's layer until v5)": lambda: gradcam_maps(model, pv, classes, -1),
        "Grad-CAM, second-to-last block norm1 (the server's layer from v5, chosen by this table)":
            lambda: gradcam_maps(model, pv, classes, -2),
        "head contribution per patch (the private page's, forward-only)": lambda: head_maps(model, pv, classes),
        "CLS attention, last block (forward-only, class-agnostic)": lambda: attention_maps(args.model, pv, False),
        "attention rollout (forward-only, class-agnostic)": lambda: attention_maps(args.model, pv, True),
        "smooth random map (floor)": lambda: smooth_random(rng, len(films), pv.shape[-1]),
    }
    order = list(methods)  # the table's row order
    if args.only:
        methods = {k: v for k, v in methods.items() if any(w.lower() in k.lower() for w in args.only)}
    wrapper = ClassifierLogits(model).eval()
    targets = [ClassifierOutputSoftmaxTarget(c) for c in classes]
    rows = []
    for name, make in methods.items():
        t0 = time.perf_counter()
        maps = make()
        t_map = time.perf_counter() - t0
        scores = {"morf": [], "lerf": [], "combined": []}
        torch.manual_seed(0)
        for start in range(0, len(films), 8):
            sl = slice(start, start + 8)
            x, m, tg = pv[sl], maps[sl], targets[sl]
            with torch.no_grad():
                scores["morf"] += ROADMostRelevantFirstAverage(PERCENTILES)(x, m, tg, wrapper).tolist()
                scores["lerf"] += ROADLeastRelevantFirstAverage(PERCENTILES)(x, m, tg, wrapper).tolist()
                scores["combined"] += ROADCombined(PERCENTILES)(x, m, tg, wrapper).tolist()
        rows.append({"method": name, "films": len(films),
                     "road_morf": float(np.mean(scores["morf"])), "road_lerf": float(np.mean(scores["lerf"])),
                     "road_combined": float(np.mean(scores["combined"])),
                     "road_combined_sem": float(np.std(scores["combined"]) / np.sqrt(len(films))),
                     **heat_shares(maps), "map_seconds_per_film": t_map / len(films)})
        print(json.dumps(rows[-1]), flush=True)
    if args.only and Path(args.output).exists():
        before = json.loads(Path(args.output).read_text())
        same = {"films": len(films), "seed": 0, "percentiles": PERCENTILES, "model": args.model}
        if any(before.get(k) != v for k, v in same.items()):
            raise SystemExit(f"{args.output} holds another run ({ {k: before.get(k) for k in same} }): "
                             "run every method (no --only) or write elsewhere (--output)")
        previous = before["rows"]
        fresh = {r["method"]: r for r in rows}
        rows = [fresh.pop(r["method"], r) for r in previous] + list(fresh.values())
        rows.sort(key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
    out = {"split": "validation", "films": len(films), "seed": 0, "percentiles": PERCENTILES,
           "target": "ClassifierOutputSoftmaxTarget(predicted class)", "model": args.model,
           "metric_source": "pytorch_grad_cam.metrics.road (ROADMostRelevantFirstAverage, "
                            "ROADLeastRelevantFirstAverage, ROADCombined)",
           "rows": rows, "cpu": platform.processor() or platform.machine(), "threads": args.threads}
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
