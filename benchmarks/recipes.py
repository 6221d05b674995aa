"""The recipe comparison behind releases v3-v6: every candidate scored on plain validation and under the
robustness battery (modeling/robustness.py), one table, the selection rule of training_runs.json.

The official test split is never read here. Steps (each caches its results under ``--work``, default
``outputs/recipes``, so a rerun only computes what is missing; long steps resume where they stopped):

    python benchmarks/recipes.py features     # frozen DINOv2-small features: 8 augmented + 1 plain view of
                                              # each training film, and the validation films under the battery
    python benchmarks/recipes.py probes       # logistic-regression probes on them (features x views x class
                                              # weights x C); saves the best stock-head probe for LP-FT
    python benchmarks/recipes.py score --name NAME --model DIR [--tta hflip]   # a saved model under the battery
    python benchmarks/recipes.py wise --name NAME --start PROBE_DIR --end FT_DIR --alphas 0.25 0.5 0.75
    python benchmarks/recipes.py ensemble --name NAME --members A B           # mean logits (several passes)
    python benchmarks/recipes.py soup --name NAME --members CKPT... --like FOLDER   # a weight average (one pass)
    python benchmarks/recipes.py table        # score every candidate, apply the rule, write the results JSON
    python benchmarks/recipes.py --work outputs/recipes-v6 table --rule v4 --output benchmarks/results/recipes_v6.json
    python benchmarks/recipes.py save-wise --start PROBE_DIR --end FT_DIR --alpha A --output-dir DIR

Every candidate's logits are bfloat16 forward passes (the Space's precision), plain and under each
condition; its temperature and threshold are fit on the plain validation logits (``--rule v3``, the
default: recipes.json) or under the battery (``--rule v4``: recipes_v4.json, recipes_v5.json,
recipes_v6.json) and held fixed under the conditions (``modeling.robustness.score``). ``table`` copies the
rule's text into the results' "rule" from training_runs.json (:func:`rule_text`; recipes_v5.json and
recipes_v6.json, written while it still looked up a renamed key, hold null there: their rule is v4's, as
their "decision" ("objective") and "operating_point" say). Each release's exact scoring commands are in
training_runs.json ("derivation", and "history" for earlier releases).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from modeling import robustness as rb
from modeling.cli import add_flag, parse
from modeling.paths import shown_path
from modeling.augment import AugmentConfig
from modeling.data import groups_of, load_cxr_dataset
from modeling.features import ViewSpec, extract, features_fn
from modeling.probe import LinearHead, embed, fit_probe, probe_model

ROOT = Path(__file__).resolve().parents[1]

# The anchor recipe's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) and flip, plus our mild rotation
# and intensity jitter: the training views of the augmented probes and of the fine-tuning runs.
ANCHOR_AUG = AugmentConfig(crop_scale=(0.08, 1.0), crop_ratio=(0.75, 4 / 3), max_rotation=7.0, brightness=0.15,
                           contrast=0.15, gamma=0.15, hflip=True)
# selection rule -> the objective it maximises (modeling.robustness.objective_value)
RULES = {"v3": "worst_macro_f1", "v4": "worst_f1_and_specificity"}
N_LAYERS = 4  # DINOv2 linear evaluation: CLS of the last 4 blocks + mean patch token


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def base_model_and_processor(base: str, size: int):
    """The pretrained base with a (random) 3-class head, and the plain-resize processor with the base's
    normalisation: what a probe sees, and the processor a probe model is saved with."""
    from transformers import AutoImageProcessor

    from modeling.models import build_model
    from modeling.preprocessing import PreprocessConfig, build_image_processor

    own = AutoImageProcessor.from_pretrained(base, backend="pil")
    cfg = PreprocessConfig(size=size, image_mean=tuple(own.image_mean), image_std=tuple(own.image_std))
    return build_model(base).eval(), build_image_processor(cfg)


# ---- features -----------------------------------------------------------------------------------------

def cmd_features(args) -> None:
    ds = load_cxr_dataset(args.dataset)
    model, processor = base_model_and_processor(args.base_model, args.image_size)
    work = Path(args.work)
    spec = ViewSpec(n_augmented=args.views, plain=True, aug=ANCHOR_AUG, seed=0)
    train = ds["train"]
    t0 = time.perf_counter()
    done = [0]

    def tick(n):
        done[0] += n
        log(f"train features: {done[0]}/{len(train)} images ({time.perf_counter() - t0:.0f} s)")

    extract(model, processor, train["image"], train["label"], work / "features" / "train", spec=spec, n_layers=N_LAYERS,
            chunk=args.chunk, meta={"base_model": args.base_model, "split": "train"}, progress=tick)
    out = work / "features" / "validation_battery.npz"
    if not out.exists():
        val = ds["validation"]
        t1 = time.perf_counter()
        feats = rb.battery_logits(features_fn(model, processor, n_layers=N_LAYERS), (r["image"] for r in val),
                                  progress=lambda n: None)
        np.savez(out, **{k: v.astype(np.float16) for k, v in feats.items()})
        log(f"validation battery features: {time.perf_counter() - t1:.0f} s")
    log("features done")


# ---- probes -------------------------------------------------------------------------------------------

def feature_sets(hidden: int) -> dict[str, tuple[slice, bool]]:
    """name -> (columns of the cached rows, releasable as the stock DINOv2 head). Rows are
    ``[CLS, mean patch, CLS of the last N_LAYERS blocks]`` (modeling.features.features_fn)."""
    return {
        "cls": (slice(0, hidden), True),
        "cls+patch": (slice(0, 2 * hidden), True),
        "lineval": (slice(hidden, (2 + N_LAYERS) * hidden), False),  # mean patch + 4 layer CLS (incl. the last)
    }


def probe_rows(train: dict, views: str) -> np.ndarray:
    return train["view"] == 0 if views == "plain" else train["view"] > 0


def cmd_probes(args) -> None:
    work = Path(args.work)
    ds = load_cxr_dataset(args.dataset)
    train = extract_cached(work / "features" / "train", np.asarray(ds["train"]["label"]))
    val = {k: v.astype(np.float32) for k, v in np.load(work / "features" / "validation_battery.npz").items()}
    labels = np.asarray(ds["validation"]["label"])
    hidden = train["features"].shape[1] // (2 + N_LAYERS)
    (work / "logits").mkdir(parents=True, exist_ok=True)
    (work / "probes").mkdir(parents=True, exist_ok=True)
    for fs, (cols, releasable) in feature_sets(hidden).items():
        for views in ("plain", "aug"):
            rows = probe_rows(train, views)
            for balanced in (False, True):
                for C in args.C:
                    name = f"probe[{fs},{views},{'balanced' if balanced else 'plain-CE'},C={C:g}]"
                    out = work / "logits" / f"{safe(name)}.npz"
                    if out.exists():
                        continue
                    t0 = time.perf_counter()
                    head = fit_probe(train["features"][rows][:, cols], train["labels"][rows], C=C, balanced=balanced)
                    if fs == "cls":
                        head = embed(head, cols, 2 * hidden)
                        cols_used = slice(0, 2 * hidden)
                    else:
                        cols_used = cols
                    np.savez(work / "probes" / f"{safe(name)}.npz", weight=head.weight, bias=head.bias)
                    logits = {k: head.logits(v[:, cols_used]).astype(np.float32) for k, v in val.items()}
                    save_candidate(out, logits, {
                        "name": name, "recipe": "frozen DINOv2-small + logistic-regression probe",
                        "features": fs, "views": "8 anchor-augmented views per film" if views == "aug" else "plain film",
                        "class_weights": "balanced" if balanced else "none", "C": C, "single_pass": releasable,
                        "stock_head": releasable, "train_rows": int(rows.sum())})
                    s = rb.score(logits, labels)["summary"]
                    log(f"{name}: fit {time.perf_counter() - t0:.0f} s; plain macro-F1 "
                        f"{rb.score({rb.PLAIN: logits[rb.PLAIN]}, labels)['conditions'][rb.PLAIN]['macro_f1']:.4f}, "
                        f"worst {s['worst_macro_f1']:.4f} ({s['worst_condition_macro_f1']}), worst spec "
                        f"{s['worst_specificity']:.3f}")


def extract_cached(cache: Path, labels: np.ndarray) -> dict:
    """The cached training features (modeling.features.extract's layout) without the model."""
    parts = []
    for p in sorted(cache.glob("chunk-*.npz")):
        with np.load(p) as z:
            parts.append({k: z[k] for k in z.files})
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("features", "image", "view")}
    out["features"] = out["features"].astype(np.float32)
    meta = json.loads((cache / "meta.json").read_text())
    if len(np.unique(out["image"])) != meta["n_images"]:
        raise SystemExit(f"{cache} is incomplete: run `python benchmarks/recipes.py features` first")
    out["labels"] = labels[out["image"]]
    return out


def safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in name)


def save_candidate(path: Path, logits: dict[str, np.ndarray], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # a soup or WiSE-FT may be the first candidate scored
    np.savez(path, **logits)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def cmd_save_probe(args) -> None:
    """Write one fitted probe as a stock model folder (uncalibrated): LP-FT's start, WiSE-FT's end point 0."""
    z = np.load(Path(args.work) / "probes" / f"{safe(args.name)}.npz")
    _, processor = base_model_and_processor(args.base_model, args.image_size)
    m = probe_model(args.base_model, LinearHead(weight=z["weight"], bias=z["bias"]))
    out = Path(args.output_dir)
    m.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "probe.json").write_text(json.dumps({"probe": args.name, "base_model": args.base_model}, indent=2) + "\n")
    log(f"wrote {out}")


# ---- fine-tuned models, WiSE-FT, ensembles ---------------------------------------------------------------

def load_folder(path: str):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    return (AutoModelForImageClassification.from_pretrained(path, dtype=torch.float32).eval(),
            AutoImageProcessor.from_pretrained(path, backend="pil"))


def battery_of(model, processor, val, tta: str | None = None) -> dict[str, np.ndarray]:
    fn = rb.model_logits_fn(model, processor, "bfloat16")
    if tta == "hflip":
        from PIL import Image

        plain_fn = fn

        def fn(images):  # noqa: F811 - mean logits of the film and its mirror image
            flipped = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]
            return (plain_fn(images) + plain_fn(flipped)) / 2
    t0 = time.perf_counter()
    done = [0]

    def tick(n):
        done[0] += n
        if done[0] % 160 == 0 or done[0] == len(val):
            log(f"  battery {done[0]}/{len(val)} ({time.perf_counter() - t0:.0f} s)")

    return rb.battery_logits(fn, (r["image"] for r in val), progress=tick)


def cmd_score(args) -> None:
    out = Path(args.work) / "logits" / f"{safe(args.name)}.npz"
    if out.exists():
        log(f"{args.name}: already scored ({out})")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    val = load_cxr_dataset(args.dataset)["validation"]
    model, processor = load_folder(args.model)
    logits = battery_of(model, processor, val, args.tta)
    save_candidate(out, logits, {"name": args.name, "recipe": args.recipe or "", "model": shown_path(args.model),
                                 "tta": args.tta, "single_pass": args.tta is None and not args.not_single_pass,
                                 "reference": args.reference})


def cmd_wise(args) -> None:
    from modeling.models import interpolate_weights

    val = load_cxr_dataset(args.dataset)["validation"]
    start, processor = load_folder(args.start)
    end, _ = load_folder(args.end)
    sa = {k: v.clone() for k, v in start.state_dict().items()}
    sb = {k: v.clone() for k, v in end.state_dict().items()}
    for alpha in args.alphas:
        name = f"{args.name}[alpha={alpha:g}]"
        out = Path(args.work) / "logits" / f"{safe(name)}.npz"
        if out.exists():
            continue
        log(f"{name}")
        model = interpolate_weights(start, sa, sb, alpha)
        save_candidate(out, battery_of(model, processor, val), {
            "name": name, "recipe": f"WiSE-FT: (1 - {alpha:g}) x start + {alpha:g} x end", "start": shown_path(args.start),
            "end": shown_path(args.end), "alpha": alpha, "single_pass": True})


def cmd_save_wise(args) -> None:
    from modeling.models import interpolate_weights

    start, processor = load_folder(args.start)
    end, _ = load_folder(args.end)
    model = interpolate_weights(start, {k: v.clone() for k, v in start.state_dict().items()},
                                {k: v.clone() for k, v in end.state_dict().items()}, args.alpha)
    out = Path(args.output_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    log(f"wrote {out}")


def cmd_soup(args) -> None:
    """The uniform weight average of checkpoints of one run, scored as a candidate (one forward pass)."""
    from modeling.models import average_weights

    out = Path(args.work) / "logits" / f"{safe(args.name)}.npz"
    if out.exists():
        return
    val = load_cxr_dataset(args.dataset)["validation"]
    model, processor = load_folder(args.like)
    average_weights(model, args.members)
    members = [shown_path(m) for m in args.members]
    save_candidate(out, battery_of(model, processor, val), {
        "name": args.name, "recipe": "weight average (soup) of " + ", ".join(members), "members": members,
        "single_pass": True})


def cmd_ensemble(args) -> None:
    work = Path(args.work) / "logits"
    members = [dict(np.load(work / f"{safe(m)}.npz")) for m in args.members]
    logits = {k: np.mean([m[k] for m in members], axis=0) for k in members[0]}
    save_candidate(work / f"{safe(args.name)}.npz", logits, {
        "name": args.name, "recipe": "mean logits of " + ", ".join(args.members), "single_pass": False,
        "members": list(args.members)})  # candidate names, not paths


# ---- the table and the rule ---------------------------------------------------------------------------

def rule_text(runs: dict, rule: str):
    """The selection rule's text as training_runs.json keeps it: v4's (used for v4-v6) is the release's
    ``selection_rule``; v3's moved to ``history.v3_release`` when v4 was released."""
    return runs["selection_rule"] if rule == "v4" else runs["history"]["v3_release"]["selection_rule"]


def cmd_table(args) -> None:
    val = load_cxr_dataset(args.dataset)["validation"]
    labels = np.asarray(val["label"])
    groups = groups_of(val)
    cands, rows = [], {}
    for meta_file in sorted((Path(args.work) / "logits").glob("*.json")):
        meta = json.loads(meta_file.read_text())
        logits = dict(np.load(meta_file.with_suffix(".npz")))
        op = rb.fit_battery_operating_point(logits, labels) if args.rule == "v4" else None
        report = rb.score(logits, labels, op)
        for key in ("model", "start", "end"):  # caches written before shown_path recorded absolute paths
            if key in meta:
                meta[key] = shown_path(meta[key])
        rows[meta["name"]] = {"meta": meta, **report}
        cands.append(rb.Candidate(meta["name"], logits[rb.PLAIN].argmax(1), report["summary"], bool(meta["single_pass"]),
                                  reference=bool(meta.get("reference"))))
    objective = RULES[args.rule]
    decision = rb.select(cands, labels, groups, objective=objective)
    # what the rule would have picked had the references (released, tested checkpoints) been candidates
    as_candidates = [rb.Candidate(c.name, c.plain_pred, c.summary, c.single_pass) for c in cands]
    with_references = (rb.select(as_candidates, labels, groups, objective=objective)
                       if any(c.reference for c in cands) else None)
    runs = json.loads((ROOT / "space" / "model" / "training_runs.json").read_text())
    result = {
        "split": "validation", "n": int(len(labels)), "precision": "bfloat16",
        "battery": rb.battery_description(),
        "rule": rule_text(runs, args.rule),
        "operating_point": ("temperature on the pooled plain + battery logits, threshold for sensitivity >= 0.985 "
                            "plain and >= 0.97 under every condition" if args.rule == "v4" else
                            "temperature and threshold (sensitivity 0.985) on plain validation"),
        "decision": {k: v for k, v in decision.items() if k != "candidates"},
        "decision_with_references_as_candidates": (None if with_references is None else
                                                    {k: v for k, v in with_references.items() if k != "candidates"}),
        "candidates": {name: {**row, "selection": decision["candidates"][name]} for name, row in rows.items()},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    order = sorted(rows, key=lambda n: -decision["candidates"][n]["objective"])
    print(f"{'candidate':56s} {'plainF1':>7s} {'spec':>5s} {'worstF1':>7s} {'meanF1':>6s} {'wSpec':>5s} {'mSpec':>5s} "
          f"{'obj':>5s} elig")
    for n in order:
        r, s, d = rows[n], rows[n]["summary"], decision["candidates"][n]
        p = r["conditions"][rb.PLAIN]
        print(f"{n[:56]:56s} {p['macro_f1']:7.4f} {p['specificity']:5.3f} {s['worst_macro_f1']:7.4f} "
              f"{s['mean_macro_f1']:6.4f} {s['worst_specificity']:5.3f} {s['mean_specificity']:5.3f} "
              f"{d['objective']:5.3f} {'yes' if d['eligible'] else 'no '} {s['worst_condition_macro_f1']}/"
              f"{s['worst_condition_specificity']}")
    print(f"chosen: {decision['chosen']} (best plain: {decision['best_plain']})")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="data/cxr-pneumonia")
    ap.add_argument("--base-model", default="../shared/models/dinov2-small")
    ap.add_argument("--work", default="outputs/recipes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=224, help="probe input size (plain resize)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("features")
    f.add_argument("--views", type=int, default=8)
    f.add_argument("--chunk", type=int, default=128)
    p = sub.add_parser("probes")
    p.add_argument("--C", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    sp = sub.add_parser("save-probe")
    sp.add_argument("--name", required=True)
    sp.add_argument("--output-dir", required=True)
    s = sub.add_parser("score")
    s.add_argument("--name", required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--recipe", default="")
    s.add_argument("--tta", choices=["hflip"], default=None)
    s.add_argument("--not-single-pass", action="store_true")
    s.add_argument("--reference", action="store_true",
                   help="a checkpoint already released and evaluated on test: a row to compare with, not a candidate")
    w = sub.add_parser("wise")
    w.add_argument("--name", required=True)
    w.add_argument("--start", required=True)
    w.add_argument("--end", required=True)
    w.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    sw = sub.add_parser("save-wise")
    sw.add_argument("--start", required=True)
    sw.add_argument("--end", required=True)
    sw.add_argument("--alpha", type=float, required=True)
    sw.add_argument("--output-dir", required=True)
    so = sub.add_parser("soup")
    so.add_argument("--name", required=True)
    so.add_argument("--members", nargs="+", required=True, help="save_pretrained folders or epoch checkpoints")
    so.add_argument("--like", required=True, help="a save_pretrained folder of the same architecture (and its processor)")
    e = sub.add_parser("ensemble")
    e.add_argument("--name", required=True)
    e.add_argument("--members", nargs="+", required=True)
    t = sub.add_parser("table")
    t.add_argument("--rule", choices=sorted(RULES), default="v3",
                   help="v3: plain-validation operating point, worst-case macro-F1; v4: the battery operating point, "
                        "worst-case macro-F1 and specificity (training_runs.json selection_rule)")
    add_flag(t, "--output", old=("--out",), default=str(ROOT / "benchmarks" / "results" / "recipes.json"))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    torch.set_num_threads(args.threads)
    {"features": cmd_features, "probes": cmd_probes, "save-probe": cmd_save_probe, "score": cmd_score,
     "wise": cmd_wise, "save-wise": cmd_save_wise, "soup": cmd_soup, "ensemble": cmd_ensemble,
     "table": cmd_table}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
