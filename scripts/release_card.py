"""Render the released model's card from its measured numbers.

    python scripts/release_card.py                # space/model -> space/model/README.md and model_card.md

Every number comes from a file beside the weights: ``eval/test/metrics.json`` and
``eval/validation/metrics.json`` (``modeling.evaluate``), ``training_runs.json`` (commands, seeds,
wall times, export check, the log of test evaluations), ``config.json`` (calibration) and
``benchmarks/results/latency.json``. The YAML header (license, base model, ``model-index``) is
built with huggingface_hub's ``ModelCardData`` so the Hub parses it. The same text is written twice:
``space/model/README.md`` (Hub card, plots linked relative to the model folder) and ``model_card.md``
at the repository root (plots linked into ``space/model/``); a test checks they agree with the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from modeling.cli import add_flag, parse
from modeling.card import eval_results, fmt, get, results_table

ROOT = Path(__file__).resolve().parents[1]

ANCHOR = {  # kiselyovd/chest-xray-classifier, as published (official Kermany test, 624 images)
    "accuracy": 0.9135, "macro_f1": 0.903, "per_class.viral_pneumonia.f1": 0.830, "auc_ovr_macro": 0.975,
    "binary.accuracy": 0.960, "binary.specificity": 0.897,
}
# (label, metrics key, target, higher is better)
TARGETS = [
    ("3-class macro-F1", "macro_f1", 0.93, True),
    ("viral F1", "per_class.viral_pneumonia.f1", 0.88, True),
    ("3-class accuracy", "accuracy", 0.935, True),
    ("normal vs pneumonia accuracy", "binary.accuracy", 0.97, True),
    ("normal vs pneumonia sensitivity", "binary.sensitivity", 0.985, True),
    ("normal vs pneumonia specificity", "binary.specificity", 0.94, True),
    ("normal vs pneumonia AUC", "binary.auc", 0.99, True),
    ("ECE (15 bins, 3-class, after temperature scaling)", "ece", 0.02, False),
]


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def targets_table(test: dict, latency: dict | None) -> str:
    lines = ["| metric | target | ours, official test (95% CI) | met | kiselyovd (anchor) |", "|---|---|---|---|---|"]
    for name, key, target, higher in TARGETS:
        v = get(test, key)
        met = (v >= target) if higher else (v <= target)
        lines.append(f"| {name} | {'>=' if higher else '<='} {target} | {fmt(test, key)} | "
                     f"{'yes' if met else 'no'} | {_pct(ANCHOR.get(key)) if key in ANCHOR else 'not published'} |")
    if latency:
        r = latency["results"]
        for name, key, target in [("CPU latency, predict (median ms, 2 threads, 224 px)", "predictor_bf16", 60),
                                  ("CPU latency, predict + Grad-CAM (median ms)", "predictor_fp32_gradcam", 200)]:
            v = r[key]["median_ms"]
            extra = f" (float32: {r['predictor_fp32']['median_ms']:.1f})" if key == "predictor_bf16" else ""
            lines.append(f"| {name} | <= {target} | {v:.1f}{extra} | {'yes' if v <= target else 'no'} | not published |")
    return "\n".join(lines)


def latency_table(lat: dict) -> str:
    lines = ["| variant | median ms | p95 ms | speed vs pipeline | max abs prob. diff vs float32 | label changes |",
             "|---|---|---|---|---|---|"]
    for name, r in lat["results"].items():
        lines.append(f"| `{name}` | {r['median_ms']:.1f} | {r['p95_ms']:.1f} | {r['speedup_vs_pipeline']:.2f}x | "
                     f"{r['max_abs_prob_diff_vs_predictor_fp32']:.1e} | {r['label_disagreements_vs_predictor_fp32']} |")
    return "\n".join(lines)


def confusion(m: dict) -> str:
    cm = m["confusion_matrix"]
    names = ["normal", "bacterial", "viral"]
    lines = ["| true \\ predicted | " + " | ".join(names) + " |", "|---|---|---|---|"]
    for n, row in zip(names, cm):
        lines.append(f"| {n} | " + " | ".join(str(x) for x in row) + " |")
    return "\n".join(lines)


def _argmax_specificity(predictions_csv: Path) -> float:
    """Specificity of 'predicted class != normal' as the pneumonia call (the anchor's operating point)."""
    import csv

    rows = [r for r in csv.DictReader(predictions_csv.open()) if r["label"] == "normal"]
    return sum(r["predicted"] == "normal" for r in rows) / len(rows)


def preprocessing_text(model_dir: Path) -> str:
    """What the saved image processor does, in words (read from preprocessor_config.json)."""
    proc = json.loads((model_dir / "preprocessor_config.json").read_text())
    side = proc["size"]["height"]
    if proc.get("do_center_crop"):
        crop = proc["crop_size"]["height"]
        return (f"stretched to {side} x {side} px and the centre {crop} x {crop} px kept (crop_pct "
                f"{crop / side:.2f}: the film's outer {(1 - crop / side) / 2:.0%} on each side is not seen)")
    return f"stretched to {side} x {side} px (whole film)"


def history_rows(model_dir: Path, runs: dict) -> str:
    """Every test evaluation of a released checkpoint, with its headline numbers."""
    rows = []
    for e in runs["test_evaluations"]:
        m = json.loads((model_dir / e["metrics"]).read_text())
        b = m["binary"]
        rows.append(f"| {e['release']} | {e['date']} | `{e['model_revision']}` | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | "
                    f"{get(m, 'per_class.viral_pneumonia.f1'):.4f} | {b['sensitivity']:.4f} / {b['specificity']:.4f} | "
                    f"{b['auc']:.4f} | {m['ece']:.4f} | `{e['command']}` | {e['note']} |")
    return "\n".join(rows)


def _variant_label(name: str) -> str:
    """Readable row names for benchmarks/checkpoint_variants.py's keys."""
    import re

    if name == "reference[identity]":
        return "v1 as released (whole film)"
    if m := re.fullmatch(r"reference\[zoom([\d.]+)\]", name):
        return f"one TTA view: centre {float(m[1]):.0%} of the 224 px input, enlarged back"
    if m := re.fullmatch(r"reference\[scale(\d+)\]", name):
        return f"one TTA view: {m[1]} px input"
    if name.startswith("reference+tta"):
        return "TTA: mean logits of the three views above"
    if m := re.fullmatch(r"checkpoint\[epoch-0*(\d+)\]", name):
        return f"224 px epoch {m[1]} checkpoint (v1 is epoch 2)"
    if m := re.fullmatch(r"logit-ensemble\[(\d+) checkpoints\]", name):
        return f"logit ensemble of the {m[1]} checkpoints"
    if m := re.fullmatch(r"weight-average\[(\d+) checkpoints\]", name):
        return f"weight average (soup) of the {m[1]} checkpoints"
    if m := re.fullmatch(r"reference\[crop_pct=([\d.]+)\]", name):
        return f"evaluation centre crop {m[1]}" + (" (**v2**)" if m[1] == "0.9" else "")
    return name


def variants_table(path: Path) -> str:
    """Validation-only comparison of TTA, checkpoint ensembles, weight averages and evaluation crops
    (benchmarks/checkpoint_variants.py)."""
    if not path.exists():
        return "(run `python benchmarks/checkpoint_variants.py`)"
    v = json.loads(path.read_text())
    lines = ["| variant (validation, 689 images) | macro-F1 | viral F1 | NLL after T | binary AUC | macro-F1 change vs v1 (95% CI, paired, patients resampled) | forward passes |",
             "|---|---|---|---|---|---|---|"]
    for name, r in v["results"].items():
        d = r["vs_reference"]
        cost = ("3" if "tta" in name or "logit-ensemble" in name else "1")
        label = _variant_label(name)
        lines.append(f"| {label} | {r['macro_f1']:.4f} | {r['viral_f1']:.4f} | {r['nll_calibrated']:.4f} | "
                     f"{r['binary_auc']:.4f} | {d['delta_macro_f1']:+.4f} ({d['ci95'][0]:+.4f} to {d['ci95'][1]:+.4f}) | {cost} |")
    return "\n".join(lines)


def release_comparison(model_dir: Path, runs: dict, test: dict, val: dict) -> str:
    """The current release against every earlier one on the official test split (each evaluated once)."""
    earlier = [e for e in runs["test_evaluations"] if e["release"] != runs["release"]]
    if not earlier:
        return ""
    cols = [(e["release"], json.loads((model_dir / e["metrics"]).read_text())) for e in earlier]
    cols.append((runs["release"], test))
    keys = [("3-class accuracy", "accuracy"), ("macro-F1", "macro_f1"), ("normal F1", "per_class.normal.f1"),
            ("bacterial F1", "per_class.bacterial_pneumonia.f1"), ("viral F1", "per_class.viral_pneumonia.f1"),
            ("normal vs pneumonia sensitivity", "binary.sensitivity"), ("normal vs pneumonia specificity", "binary.specificity"),
            ("normal vs pneumonia AUC", "binary.auc"), ("ECE", "ece")]
    lines = ["| official test | " + " | ".join(n for n, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(fmt(m, key) for _, m in cols) + " |" for name, key in keys]
    lines.append("| misclassified normals called viral | " + " | ".join(
        f"{m['confusion_matrix'][0][2]} of {m['confusion_matrix'][0][1] + m['confusion_matrix'][0][2]}" for _, m in cols) + " |")
    prev_name, prev = cols[-2]
    worse = test["macro_f1"] < prev["macro_f1"]
    text = runs.get("release_outcome", "")
    return (f"\n### {runs['release']} against earlier releases (official test, each evaluated once)\n\n"
            + "\n".join(lines) + "\n\n"
            + (f"{runs['release']} is **worse** than {prev_name} on the official test split (macro-F1 "
               f"{test['macro_f1']:.3f} vs {prev['macro_f1']:.3f}) although it was better on validation. " if worse else "")
            + text + "\n")


def render(model_dir: Path, latency_path: Path, plots_prefix: str) -> str:
    test = json.loads((model_dir / "eval/test/metrics.json").read_text())
    val = json.loads((model_dir / "eval/validation/metrics.json").read_text())
    runs = json.loads((model_dir / "training_runs.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    cal = config["cxr_calibration"]
    latency = json.loads(latency_path.read_text()) if latency_path.exists() else None
    dedup = test.get("exact_dedup")
    data = ModelCardData(
        license="apache-2.0", library_name="transformers", pipeline_tag="image-classification",
        base_model="facebook/dinov2-small", tags=["medical-imaging", "chest-x-ray", "pneumonia", "dinov2", "grad-cam"],
        model_name=f"cxr-pneumonia DINOv2-small ({runs['release']})",
        eval_results=eval_results(test, "Kermany chest X-ray (official test split)", "kermany-chest-xray"),
    )
    b = test["binary"]
    argmax_spec = _argmax_specificity(model_dir / "eval/test/predictions.csv")
    met = [name for name, key, target, higher in TARGETS
           if (get(test, key) >= target if higher else get(test, key) <= target)]
    if latency:
        met += [n for n, k, t in (("predict latency", "predictor_bf16", 60), ("predict + Grad-CAM latency",
                                                                             "predictor_fp32_gradcam", 200))
                if latency["results"][k]["median_ms"] <= t]
    resumed = [r["name"] for r in runs["runs"] if r.get("resumed")]
    stage_rows = "\n".join(
        f"| {r['name']} | {r['image_size']} px | {r['epochs_run']} (best {r['best_epoch']}) | "
        f"{r['best_val_macro_f1_uncalibrated']:.3f} | {r['wall_seconds'] / 60:.0f} min | `{r['command']}` |"
        for r in runs["runs"])
    total_min = sum(r["wall_seconds"] for r in runs["runs"]) / 60
    evals = history_rows(model_dir, runs)
    release = runs["release"]
    derivation = "\n".join(f"{i}. {d['what']}: `{d['command']}`" for i, d in enumerate(runs.get("derivation", []), 1))
    ex = runs["export"]
    lat_md = latency_table(latency) if latency else "(run `python benchmarks/latency.py`)"
    agree_path = latency_path.parent / "precision_agreement.json"
    if agree_path.exists():
        ag = json.loads(agree_path.read_text())
        lat_md += (f"\n\nbfloat16 against float32 over all {ag['n']} {ag['split']} images "
                   f"(`python benchmarks/precision_agreement.py`): max absolute probability difference "
                   f"{ag['max_abs_prob_diff']:.3f} (99th percentile {ag['p99_abs_prob_diff']:.3f}), {ag['label_changes']} "
                   f"label change(s), {ag['pneumonia_call_changes']} changed pneumonia call(s). The stated tolerance "
                   "of the fast path is therefore 0.02 in probability. `Predictor(precision=\"auto\")` uses it on CPUs "
                   "with native bf16 (the Space does, for predictions without a heatmap); Grad-CAM and every number "
                   "in this card are float32.")
    onnx = (latency or {}).get("results", {}).get("onnx_forward_only_fp32")
    onnx_text = ("ONNX Runtime was not measured." if not onnx else
                 f"ONNX Runtime ({latency.get('onnxruntime', '')}, float32, same threads) runs the forward pass in "
                 f"{onnx['median_ms']:.0f} ms against {latency['results']['forward_only_fp32']['median_ms']:.0f} ms for "
                 f"torch float32 and {latency['results']['forward_only_bf16']['median_ms']:.0f} ms for torch bfloat16 "
                 f"(max |dp| {onnx['max_abs_prob_diff_vs_predictor_fp32']:.1e}); "
                 + ("it is slower than the bf16 path and would add a second inference stack without Grad-CAM: not adopted."
                    if onnx["median_ms"] >= latency["results"]["forward_only_bf16"]["median_ms"] else
                    "it beats the bf16 path; see the latency table."))
    lat_hw = (f"{latency['cpu']}, {latency['threads']} threads, torch {latency['torch']}, {latency['images']} Kermany "
              f"test files x {latency['repeats']}, batch 1, {latency['date']}") if latency else ""
    body = f"""
# cxr-pneumonia: DINOv2-small fine-tuned for pediatric chest X-ray triage ({release})

Classifies a frontal pediatric chest X-ray as **normal**, **bacterial pneumonia** or **viral pneumonia**,
with temperature-calibrated probabilities and a pneumonia call (P(bacterial) + P(viral) >= {cal['pneumonia_threshold']:.4f},
chosen on validation for {cal['target_sensitivity']:.1%} sensitivity). Trained on CPU only.

**Not a medical device.** Research and education only; not cleared for clinical use. It was trained and
tested on one hospital's pediatric (age 1-5) films; it has not been validated on adults, other sites,
devices, lateral views or other diseases.

## Use

```python
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
clf = pipeline("image-classification", model="space/model",
               image_processor=AutoImageProcessor.from_pretrained("space/model", backend="pil"))
clf("chest.jpeg")   # calibrated: the temperature is in the weights

from modeling.predict import Predictor           # this repository: DICOM/16-bit loading, threshold, Grad-CAM
p = Predictor.from_pretrained("space/model", precision="auto")
p.predict_one("chest.dcm", heatmap=True)
```

Weights are stored in float16 (44 MB) and load as float32 (`config.dtype`); the rounding changes
probabilities by at most {ex['max_abs_probability_diff']:.1e} and {ex['label_changes']} label(s) on the {ex['checked_images']} validation images.
Input: {preprocessing_text(model_dir)}, grayscale replicated to 3 channels, ImageNet normalisation; all
in `preprocessor_config.json`, which `pipeline()`, the predictor and the Space load.

## Results on the official Kermany test split

624 images (234 normal / 242 bacterial / 148 viral), evaluated **once** for this checkpoint (log below).
95% CIs: percentile bootstrap, 1,000 resamples of **patients**. The second column removes the
{dedup['n_removed'] if dedup else 0} byte-identical duplicate films of the test split (one copy kept).

{results_table([("official test", test)] + ([("test, exact duplicates removed", dedup)] if dedup else []) + [("validation (selection set)", val)])}

Confusion matrix (official test):

{confusion(test)}

Normal vs pneumonia at the stored threshold {b['threshold']:.4f}: sensitivity {fmt(test, 'binary.sensitivity')},
specificity {fmt(test, 'binary.specificity')}, PPV {b['ppv']:.4f}, NPV {b['npv']:.4f}.

![confusion matrix]({plots_prefix}eval/test/plots/confusion_matrix.png) ![ROC]({plots_prefix}eval/test/plots/roc.png) ![reliability]({plots_prefix}eval/test/plots/reliability.png)

### Targets (project issue) and where we stand

{targets_table(test, latency)}

**Gaps, with evidence.** Met: {", ".join(met) or "none"}; every other target is missed.
1. *Specificity on test* ({b['specificity']:.3f}) is far below validation ({val['binary']['specificity']:.3f} at the
   same threshold), and the normal-vs-pneumonia AUC drops from {val['binary']['auc']:.4f} (validation) to {b['auc']:.4f}
   (test): the official test normals are over-called. Validation is patient-grouped from Kermany's *train*
   split, so it does not show the train/test shift of this dataset, and the threshold chosen there for
   98.5% sensitivity is too low for test. Even at the argmax operating point (not our decision rule,
   reported for comparison with the anchor) test specificity is {argmax_spec:.3f} (from `eval/test/predictions.csv`).
   Most errors on test normals are calls of *viral* pneumonia ({test['confusion_matrix'][0][2]} of
   {test['confusion_matrix'][0][1] + test['confusion_matrix'][0][2]} misclassified normals).
2. *Bacterial vs viral* (viral F1 {get(test, 'per_class.viral_pneumonia.f1'):.3f}) is the 3-class bottleneck, as on
   validation ({get(val, 'per_class.viral_pneumonia.f1'):.3f}); fine-tuning moved validation macro-F1 only from 0.79
   (112 px) to 0.80 (224 px), close to a frozen DINOv2-small + logistic regression (0.80 on test, per the issue).
3. *Calibration*: temperature scaling on validation gives ECE {val['ece']:.3f} there, {test['ece']:.3f} on test: the
   same shift.
4. *Latency*: float32 predict is ~{latency['results']['predictor_fp32']['median_ms']:.0f} ms; a bfloat16 copy of the weights
   (CPUs with native bf16) gives {latency['results']['predictor_bf16']['median_ms']:.0f} ms, of which the forward pass is
   {latency['results'].get('forward_only_bf16', {}).get('median_ms', float('nan')):.0f} ms: loading and preprocessing are not the cost.
   bf16 *autocast* was slower (~75 ms: it re-casts the weights on every call). torch.compile on top of bf16
   gave ~8% in a quick A/B (50 vs 55 ms forward) for ~30 s of compilation at start-up: not adopted.
   {onnx_text}

What would close them: a stronger ImageNet-22k / larger backbone (the anchor uses ConvNeXt-V2-Tiny; DINOv2-B/L),
training at the original resolution (the shared Kermany copies are 224x224 resizes), longer schedules
and ensembles (GPU time: this model had {total_min:.0f} CPU minutes), and more varied *normal* films
from other sites so that validation resembles deployment.

### What else was tried (validation only)

`python benchmarks/checkpoint_variants.py` scores cheap variants of the v1 weights on the validation
split (the test split is not read), with temperature and threshold refit per row. Checkpoint weight
averages ("soups") and logit ensembles of the last three 224 px epochs change nothing; test-time
augmentation helps a little at 3x the compute; an evaluation centre crop helps as much at no cost, on
validation: on the official test split the crop made things worse (next section).

{variants_table(ROOT / "benchmarks" / "results" / "checkpoint_variants.json")}

{runs.get("selection_note", "")}

{release_comparison(model_dir, runs, test, val)}
### Comparable published numbers

| model | test set | 3-class acc. | macro-F1 | viral F1 | normal vs pneumonia | comparable? |
|---|---|---|---|---|---|---|
| **this model ({release})** | official Kermany test, 624 | {test['accuracy']:.4f} | {test['macro_f1']:.4f} | {get(test, 'per_class.viral_pneumonia.f1'):.4f} | acc {b['accuracy']:.4f}, sens {b['sensitivity']:.4f}, spec {b['specificity']:.4f}, AUC {b['auc']:.4f} | - |
| kiselyovd/chest-xray-classifier (ConvNeXt-V2-Tiny IN-22k, GPU) | official test, 624 | 0.9135 | 0.903 | 0.830 | acc 0.960, spec 0.897 | yes: same split. Trained on the official train split, which shares 170 patients with test (our build drops them) |
| frozen DINOv2-small + logistic regression (project issue) | official test, 624 | 0.81 | 0.80 | - | - | yes |
| Kermany et al., Cell 2018 (Inception-v3 transfer) | official test, 624 | - | - | - | binary as reported: acc 0.928, sens 0.932, spec 0.901, AUC 0.968 | yes for the binary task |
| popular Hub ViTs claiming ~97% | random re-splits | - | - | - | - | no: patients shared between their train and test |

## Training

Data: the merged, deduplicated, patient-grouped dataset of this repository (`dataset_scripts.build`:
Kermany train + Skytells COVID-19 images, exact/near duplicates and test-patient films removed),
{runs['runs'][0]['n_train']} training / {runs['runs'][0]['n_validation']} validation images. Base: `facebook/dinov2-small`.
{runs.get("recipe", "")}

| stage | input | epochs | best val macro-F1 | wall | command |
|---|---|---|---|---|---|
{stage_rows}

Hardware: {runs['runs'][0]['hardware']}; torch {runs['runs'][0]['versions']['torch']}, transformers
{runs['runs'][0]['versions']['transformers']}. Total {total_min:.0f} minutes of training.{" Resumed from an epoch checkpoint after an interruption (`--resume`, bit-identical to an uninterrupted run): " + ", ".join(resumed) + "." if resumed else ""}

From the training output to this folder:

{derivation}

Calibration (validation only): temperature T = {cal['temperature']:.4f} baked into the head (validation NLL
{cal['nll_before']:.4f} -> {cal['nll_after']:.4f}); threshold {cal['pneumonia_threshold']:.4f} for target sensitivity
{cal['target_sensitivity']} (validation sensitivity {cal['fit_sensitivity']:.4f}, specificity {cal['fit_specificity']:.4f}).

## CPU latency

{lat_hw}. `python benchmarks/latency.py` (file in, result out: decode + preprocessing + forward).

{lat_md}

## Test-set evaluations of released checkpoints

Every evaluation of a released checkpoint on the official test split, in order (each checkpoint
once; the current release's full numbers are above):

| release | date | weights | accuracy | macro-F1 | viral F1 | sens. / spec. | AUC | ECE | command | note |
|---|---|---|---|---|---|---|---|---|---|---|
{evals}

Reproduce independently (transformers + Pillow + scikit-learn only):
`python benchmarks/reproduce_test.py --model space/model --test-dir ../shared/data/kermany/chest_xray/test`.

## Limitations and bias

Single-centre pediatric data (Guangzhou Women and Children's Medical Center), labels from the
original dataset (graders' reading, not microbiology); bacterial vs viral is hard even for
radiologists. Adult COVID-19 films in training come without patient ids. Grad-CAM shows where the
score came from, not why; it can highlight text markers or borders. The input gate of the Space
(colour, DICOM tags, geometry) is a set of rules, not a detector.

## Citation

Kermany, Zhang, Goldbaum et al., "Identifying Medical Diagnoses and Treatable Diseases by Image-Based
Deep Learning", Cell 172(5), 2018; data: doi:10.17632/rscbjbr9sj.2 (CC BY 4.0).
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").content


README_START = "<!-- results:start (written by scripts/release_card.py) -->"
README_END = "<!-- results:end -->"


def readme_results(model_dir: Path, latency_path: Path) -> str:
    """The README's results block: targets vs ours vs the anchor, and the latency benchmark."""
    test = json.loads((model_dir / "eval/test/metrics.json").read_text())
    latency = json.loads(latency_path.read_text()) if latency_path.exists() else None
    out = [targets_table(test, latency)]
    if latency:
        out += ["", f"Latency (`python benchmarks/latency.py`; {latency['cpu']}, {latency['threads']} threads, "
                    f"batch 1, file in, result out):", "", latency_table(latency)]
    return "\n".join(out)


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    start, end = text.index(README_START), text.index(README_END)
    readme.write_text(text[:start + len(README_START)] + "\n" + block + "\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_flag(ap, "--model", old=("--model-dir",), default=str(ROOT / "space" / "model"))
    ap.add_argument("--latency", default=str(ROOT / "benchmarks" / "results" / "latency.json"))
    args = parse(ap, argv)
    model_dir = Path(args.model)
    (model_dir / "README.md").write_text(render(model_dir, Path(args.latency), ""))
    rel = model_dir.resolve().relative_to(ROOT).as_posix() + "/"
    (ROOT / "model_card.md").write_text(render(model_dir, Path(args.latency), rel))
    update_readme(ROOT / "README.md", readme_results(model_dir, Path(args.latency)))
    print(f"wrote {model_dir / 'README.md'}, {ROOT / 'model_card.md'} and the README's results block")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
