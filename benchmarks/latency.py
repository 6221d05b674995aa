"""CPU latency of one-image prediction: our Predictor (float32, bfloat16, bfloat16 compiled with
TorchInductor), Predictor + Grad-CAM (float32, and bfloat16 as the Space runs it), and
plain ``transformers.pipeline("image-classification")`` on the same model, same files, same run.

    python benchmarks/latency.py --model space/model --threads 2 --output benchmarks/results/latency.json

Each timing is one file path in, result out (decode + preprocessing + forward [+ Grad-CAM]), batch
size 1, after warm-up; the variants are interleaved image by image so that a change in machine load
hits all of them alike. Ratios are against the pipeline. Outputs are compared with the float32
Predictor: max absolute probability difference and label disagreements, so "faster" comes with
"and equal within X". Run it on a quiet machine: the numbers are only as good as the quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from modeling.image_io import IMAGE_EXTENSIONS
from modeling.labels import LABELS
from modeling.metrics import agreement

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "kermany" / "chest_xray" / "test"


def list_images(folder: Path, n: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SystemExit(f"no images under {folder}")
    step = max(1, len(files) // n)  # spread over classes (folders are sorted by class)
    return files[::step][:n]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def summarize(ms: list[float]) -> dict:
    s = sorted(ms)
    return {"median_ms": round(statistics.median(s), 2),
            "p95_ms": round(s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))], 2),
            "mean_ms": round(statistics.fmean(s), 2), "n": len(s)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "space" / "model"))
    ap.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of X-ray files")
    ap.add_argument("--n-images", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2, help="passes over the images")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "latency.json"),
                    help="write the results as JSON here (the card reads this file); '-' prints only")
    ap.add_argument("--no-onnx", action="store_true",
                    help="skip the onnxruntime backend rows (they run when MODEL/onnx exists: cxr-export --onnx)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    from modeling.paths import shown_path
    from modeling.predict import Predictor, bf16_fast

    files = list_images(Path(args.images), args.n_images)
    fp32 = Predictor.from_pretrained(args.model, precision="float32")
    bf16 = Predictor(fp32.model, fp32.processor, precision="bfloat16")  # a bf16 copy of the same weights
    compiled = Predictor(fp32.model, fp32.processor, precision="bfloat16")
    compilation = compiled.compile()  # Predictor.compile: TorchInductor, weights frozen (the Space's CXR_COMPILE)
    print(f"compilation: {compilation}")
    pipe = pipeline("image-classification",
                    model=AutoModelForImageClassification.from_pretrained(args.model),
                    image_processor=AutoImageProcessor.from_pretrained(args.model, backend="pil"),
                    device="cpu")

    from modeling.image_io import load_image
    from modeling.preprocessing import pixel_values

    # model-only rows: the forward pass on already-preprocessed input, to show where the time goes
    pv = {f: pixel_values(fp32.processor, [load_image(f)]) for f in files}

    def forward(f, bf16_weights: bool):
        with torch.inference_mode():
            if bf16_weights:
                return bf16._fast(pixel_values=pv[f].to(torch.bfloat16)).logits
            return fp32.model(pixel_values=pv[f]).logits

    variants = {}
    onnx_dir = Path(args.model) / "onnx"
    if not args.no_onnx and onnx_dir.is_dir():  # the Predictor's onnxruntime backend, each shipped variant
        from modeling.onnx_export import VARIANTS

        for variant, file in VARIANTS.items():
            if (onnx_dir / file).exists():
                p = Predictor.from_pretrained(args.model, backend="onnx", onnx_variant=variant)
                variants[f"predictor_onnx_{variant}"] = p.predict_one
    variants = {
        "pipeline_fp32": lambda f: pipe(str(f), top_k=None),
        "predictor_fp32": lambda f: fp32.predict_one(f),
        "predictor_bf16": lambda f: bf16.predict_one(f),
        **({"predictor_bf16_compiled": lambda f: compiled.predict_one(f)} if compilation["compiled"] else {}),
        "predictor_fp32_gradcam": lambda f: fp32.predict_one(f, heatmap=True),
        "predictor_bf16_gradcam": lambda f: bf16.predict_one(f, heatmap=True),
        "forward_only_fp32": lambda f: forward(f, False),
        "forward_only_bf16": lambda f: forward(f, True),
        **variants,
    }
    for f in files[: args.warmup]:
        for fn in variants.values():
            fn(f)

    times: dict[str, list[float]] = {k: [] for k in variants}
    outputs: dict[str, list] = {k: [] for k in variants}
    for rep in range(args.repeats):
        for f in files:
            for name, fn in variants.items():
                t0 = time.perf_counter()
                out = fn(f)
                times[name].append((time.perf_counter() - t0) * 1000)
                if rep == 0:
                    outputs[name].append(out)

    def probs(name: str, out) -> dict:
        if name.startswith("pipeline"):
            return {d["label"]: d["score"] for d in out}
        if name.startswith("forward"):
            names = [fp32.model.config.id2label[i] for i in range(fp32.model.config.num_labels)]
            return dict(zip(names, torch.softmax(torch.as_tensor(out).float(), -1)[0].tolist()))
        return out.probabilities

    ref = [probs("predictor_fp32", o) for o in outputs["predictor_fp32"]]
    results = {}
    base = statistics.median(times["pipeline_fp32"])
    for name in variants:
        r = summarize(times[name])
        r["speedup_vs_pipeline"] = round(base / r["median_ms"], 2)
        other = [probs(name, o) for o in outputs[name]]
        agree = agreement([[p[k] for k in LABELS] for p in ref], [[p[k] for k in LABELS] for p in other])
        r["max_abs_prob_diff_vs_predictor_fp32"] = agree["max_abs_prob_diff"]
        r["label_disagreements_vs_predictor_fp32"] = agree["label_changes"]
        results[name] = r

    report = {
        "model": shown_path(args.model),
        "model_revision": fp32.revision,
        "images": len(files), "repeats": args.repeats, "image_folder": shown_path(args.images),
        "threads": args.threads, "torch": torch.__version__, "cpu": cpu_name(),
        "cpu_native_bf16": bf16_fast(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "date": time.strftime("%Y-%m-%d"), "compilation": compilation,
        **({"onnxruntime": __import__("onnxruntime").__version__} if any(k.startswith("predictor_onnx") for k in results)
           else {}),
        "results": results,
    }
    print(f"{'variant':28s} {'median ms':>10s} {'p95 ms':>8s} {'x pipeline':>10s} {'max |dp|':>9s} {'labels !=':>9s}")
    for name, r in results.items():
        print(f"{name:28s} {r['median_ms']:10.1f} {r['p95_ms']:8.1f} {r['speedup_vs_pipeline']:10.2f} "
              f"{r['max_abs_prob_diff_vs_predictor_fp32']:9.2e} {r['label_disagreements_vs_predictor_fp32']:9d}")
    if args.output != "-":
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
