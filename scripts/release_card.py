"""Render the released model's card and the README's result blocks from the measured files.

    python scripts/release_card.py          # space/model -> space/model/README.md, model_card.md, README blocks

Every number comes from a file: ``eval/test/metrics.json`` and ``eval/validation/metrics.json``
(``cxr-evaluate``), ``training_runs.json`` (commands, the selection rule, the log of test evaluations),
``config.json`` (calibration), ``benchmarks/results/*.json`` (latency, precision, recipes, memory, input
gate). This script computes the values; the words are ``modeling/templates/release_card.md``, rendered
by the project's one card renderer (:mod:`modeling.card`). The same card is written twice:
``space/model/README.md`` (the Hub card, plots linked relative to the model folder) and
``model_card.md`` at the repository root (plots linked into ``space/model/``); ``tests/test_release.py``
checks that both and the README agree with the JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from huggingface_hub import ModelCardData

from modeling.card import eval_results, fmt, get, markdown_table, render_template, results_table
from modeling.cli import add_flag, parse
from modeling.robustness import PLAIN

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

ANCHOR = {  # kiselyovd/chest-xray-classifier, as published (official Kermany test, 624 images)
    "accuracy": 0.9135, "macro_f1": 0.903, "per_class.viral_pneumonia.f1": 0.830, "auc_ovr_macro": 0.975,
    "binary.accuracy": 0.960, "binary.specificity": 0.897,
}
# The release issue's targets, (label, metrics key, target, higher is better), unless training_runs.json
# names its own ("targets": [{"label", "key", "target", "higher"}, ...], "latency_target_ms"); the key
# "argmax_specificity" is read from the stored predictions.
TARGETS = [
    ("3-class macro-F1", "macro_f1", 0.90, True),
    ("viral F1", "per_class.viral_pneumonia.f1", 0.83, True),
    ("normal vs pneumonia sensitivity", "binary.sensitivity", 0.985, True),
    ("normal vs pneumonia specificity (at the same threshold)", "binary.specificity", 0.90, True),
    ("normal vs pneumonia AUC", "binary.auc", 0.985, True),
    ("ECE (15 bins, 3-class, after temperature scaling)", "ece", 0.03, False),
]
LATENCY_TARGET = ("CPU latency, predict (median ms, 2 threads, bf16)", "predictor_bf16", 60.0)


def release_targets(runs: dict) -> tuple[list[tuple], tuple]:
    if not runs.get("targets"):
        return TARGETS, LATENCY_TARGET
    return ([(t["label"], t["key"], t["target"], t["higher"]) for t in runs["targets"]],
            (LATENCY_TARGET[0], LATENCY_TARGET[1], runs.get("latency_target_ms", LATENCY_TARGET[2])))


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _n(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


# ---- tables -------------------------------------------------------------------------------------------

def targets_table(test: dict, latency: dict | None, runs: dict | None = None, model_dir: Path | None = None) -> str:
    targets, latency_target = release_targets(runs or {})
    rows = []
    for name, key, target, higher in targets:
        if key == "argmax_specificity":
            v = argmax_specificity(model_dir / "eval/test/predictions.csv")
            shown = f"{v:.4f}"
        else:
            v, shown = get(test, key), fmt(test, key)
        met = v is not None and (v >= target if higher else v <= target)
        gap = "" if met or v is None else f" (by {abs(v - target):.3f})"
        rows.append([name, f"{'>=' if higher else '<='} {target}", shown, ("yes" if met else "no") + gap,
                     _n(ANCHOR.get(key)) if key in ANCHOR else "not published"])
    if latency:
        name, key, target = latency_target
        v = latency["results"][key]["median_ms"]
        rows.append([name, f"<= {target:g}", f"{v:.1f} (float32: {latency['results']['predictor_fp32']['median_ms']:.1f})",
                     "yes" if v <= target else f"no (by {v - target:.1f})", "not published"])
        g = latency["results"].get("predictor_bf16_gradcam")
        g, which = (g, "bf16, one pass, as the Space runs it") if g else (
            latency["results"].get("predictor_fp32_gradcam"), "float32")
        if g:
            rows.append([f"CPU latency, predict + Grad-CAM (median ms, {which})", "-", f"{g['median_ms']:.1f}", "-",
                         "not published"])
    return markdown_table(["metric", "target", "ours, official test (95% CI)", "met", "kiselyovd (anchor)"], rows)


def latency_table(lat: dict) -> str:
    rows = [[f"`{name}`", f"{r['median_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['speedup_vs_pipeline']:.2f}x",
             f"{r['max_abs_prob_diff_vs_predictor_fp32']:.1e}", r["label_disagreements_vs_predictor_fp32"]]
            for name, r in lat["results"].items()]
    return markdown_table(["variant", "median ms", "p95 ms", "speed vs pipeline", "max abs prob. diff vs float32",
                           "label changes"], rows)


def confusion(m: dict) -> str:
    names = ["normal", "bacterial", "viral"]
    return markdown_table(["true \\ predicted", *names], [[n, *row] for n, row in zip(names, m["confusion_matrix"])])


def read_predictions(path: Path) -> list[dict]:
    """The rows of an evaluation's predictions.csv."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def argmax_specificity(predictions_csv: Path) -> float:
    """Specificity of 'predicted class != normal' as the pneumonia call (the anchor's operating point)."""
    rows = [r for r in read_predictions(predictions_csv) if r["label"] == "normal"]
    return sum(r["predicted"] == "normal" for r in rows) / len(rows)


def history_table(model_dir: Path, runs: dict) -> str:
    rows = []
    for e in runs["test_evaluations"]:
        m = json.loads((model_dir / e["metrics"]).read_text())
        b = m["binary"]
        rows.append([e["release"], e["date"], f"`{e['model_revision']}`", f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}",
                     f"{get(m, 'per_class.viral_pneumonia.f1'):.4f}", f"{b['sensitivity']:.4f} / {b['specificity']:.4f}",
                     f"{b['auc']:.4f}", f"{m['ece']:.4f}", f"`{e['command']}`", e["note"]])
    return markdown_table(["release", "date", "weights", "accuracy", "macro-F1", "viral F1", "sens. / spec.", "AUC",
                           "ECE", "command", "note"], rows)


def release_comparison(model_dir: Path, runs: dict) -> str:
    cols = [(e["release"], json.loads((model_dir / e["metrics"]).read_text())) for e in runs["test_evaluations"]]
    keys = [("3-class accuracy", "accuracy"), ("macro-F1", "macro_f1"), ("normal F1", "per_class.normal.f1"),
            ("bacterial F1", "per_class.bacterial_pneumonia.f1"), ("viral F1", "per_class.viral_pneumonia.f1"),
            ("normal vs pneumonia sensitivity", "binary.sensitivity"),
            ("normal vs pneumonia specificity", "binary.specificity"), ("normal vs pneumonia AUC", "binary.auc"),
            ("ECE", "ece")]
    rows = [[name, *(fmt(m, key) for _, m in cols)] for name, key in keys]
    rows.append(["misclassified normals called viral", *(
        f"{m['confusion_matrix'][0][2]} of {m['confusion_matrix'][0][1] + m['confusion_matrix'][0][2]}" for _, m in cols)])
    rows.append([f"{runs['release']} macro-F1 minus this release's (paired, 95% CI)",
                 *paired_test_deltas(model_dir, runs)])
    return markdown_table(["official test", *(n for n, _ in cols)], rows)


def paired_test_deltas(model_dir: Path, runs: dict) -> list[str]:
    """The current release's test macro-F1 minus each earlier release's, on the same films, with a
    patient-grouped paired bootstrap (``modeling.metrics.paired_bootstrap_macro_f1``): two separate CIs
    overlap far more than the interval of the difference. Read from the stored predictions; no model runs."""
    from modeling.labels import LABELS
    from modeling.metrics import paired_bootstrap_macro_f1

    def preds(e: dict) -> list[dict]:
        return read_predictions((model_dir / e["metrics"]).with_name("predictions.csv"))

    evals = runs["test_evaluations"]
    current = preds(next(e for e in evals if e["release"] == runs["release"]))
    y = [LABELS.index(r["label"]) for r in current]
    out = []
    for e in evals:
        if e["release"] == runs["release"]:
            out.append("-")
            continue
        old = preds(e)
        if [r["image_sha256"] for r in old] != [r["image_sha256"] for r in current]:
            out.append("n/a (different films)")
            continue
        d = paired_bootstrap_macro_f1([LABELS.index(r["predicted"]) for r in old],
                                      [LABELS.index(r["predicted"]) for r in current], y,
                                      [r["patient_id"] for r in current])
        out.append(f"{d['delta_macro_f1']:+.3f} ({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})")
    return out


def released_augmentation(runs: dict):
    """The training augmentation of the run that made the released weights (the last of ``runs``), as
    ``train.TrainConfig.augment_config()`` reads its logged command."""
    import shlex

    from transformers import HfArgumentParser

    import train

    (cfg,) = HfArgumentParser(train.TrainConfig).parse_args_into_dataclasses(shlex.split(runs["runs"][-1]["command"])[1:])
    return cfg.augment_config()


def training_coverage(aug) -> dict[str, tuple[str, str]]:
    """Per battery condition (modeling/robustness.py BATTERY): does the training augmentation ``aug``
    (a modeling.augment.AugmentConfig) apply the same kind of change at the battery's magnitude or beyond
    ("inside"), only a milder one ("milder"), or none ("outside"); with the training range in words. Each
    training change is drawn at random and applied to a share of the views, so "inside" is partly
    in distribution, the battery's magnitude at or near the edge of the range."""
    import inspect

    from modeling import robustness as rb

    def defaults(fn) -> dict:
        return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}

    tone = f"p {aug.tone_p:g}"
    lo, hi = aug.gamma_range or (1 - aug.gamma, 1 + aug.gamma)
    crop = (f"random crops of {aug.crop_scale[0]:.0%}-{aug.crop_scale[1]:.0%} of the area, aspect "
            f"{aug.crop_ratio[0]:.2f}-{aug.crop_ratio[1]:.2f}")
    out = {}
    for c in rb.BATTERY:
        fn = getattr(c.transform, "func", c.transform)
        kw = {**defaults(fn), **getattr(c.transform, "keywords", {})}
        kind = fn.__name__
        # (does training apply this kind of change, does it reach the battery's magnitude, its range in words)
        if kind == "gamma":
            has, ok, words = hi > lo, lo <= kw["g"] <= hi, f"gamma {lo:g}-{hi:g} ({tone})"
        elif kind == "contrast":
            has, ok = aug.contrast > 0, 1 - aug.contrast <= kw["factor"] <= 1 + aug.contrast
            words = f"contrast x{1 - aug.contrast:g}-{1 + aug.contrast:g} ({tone})"
        elif kind == "blur":
            has, ok, words = aug.blur > 0, kw["radius"] <= aug.blur, f"blur radius <= {aug.blur:g} px (p {aug.blur_p:g})"
        elif kind == "sharpen":
            has, ok = aug.sharpen > 0, kw["percent"] <= aug.sharpen and kw["radius"] == 2
            words = f"unsharp mask radius 2 px, <= {aug.sharpen:g}% (p {aug.sharpen_p:g})"
        elif kind == "noise":
            has, ok, words = aug.noise > 0, kw["sigma"] <= aug.noise, f"noise sigma <= {aug.noise:g} (p {aug.noise_p:g})"
        elif kind == "jpeg":
            has, ok = aug.jpeg_quality > 0, kw["quality"] >= aug.jpeg_quality
            words = f"JPEG quality {aug.jpeg_quality}-95 (p {aug.jpeg_p:g})"
        elif kind == "zoom" and kw["factor"] <= 1:
            has = aug.crop_scale[0] < 1
            ok, words = kw["factor"] ** 2 >= aug.crop_scale[0] and aug.crop_ratio[0] <= 1 <= aug.crop_ratio[1], crop
        elif kind == "zoom":
            has, ok = aug.zoom_out > 1 and aug.zoom_out_p > 0, kw["factor"] <= aug.zoom_out
            words = f"zoom out <= {aug.zoom_out:g} (p {aug.zoom_out_p:g})"
        elif kind == "aspect":
            w, h = kw["keep_width"], kw["keep_height"]
            has = aug.crop_scale[0] < 1
            ok, words = w * h >= aug.crop_scale[0] and aug.crop_ratio[0] <= w / h <= aug.crop_ratio[1], crop
        elif kind == "rotate":
            has, ok, words = aug.max_rotation > 0, abs(kw["degrees"]) <= aug.max_rotation, f"rotation +-{aug.max_rotation:g} deg"
        else:  # shift: crops and zoom out move the anatomy, nothing moves the whole film off the frame
            has, ok, words = False, False, ""
        out[c.name] = ("inside", words) if has and ok else ("milder", words) if has else ("outside", "no such change")
    return out


# The battery's reasons as modeling/robustness.py gives them, where a reason names a training range that later
# releases changed (the module's words were fixed with the battery, before v4).
WHY_NOW = {"rotate_+10": "patient rotation beyond what v1-v4 trained with (+-7 degrees; v4 +-9)"}


def battery_table(recipes: dict, runs: dict | None = None) -> str:
    if not runs:
        return markdown_table(["condition", "why it is there"],
                              [[f"`{c['name']}`", c["why"]] for c in recipes["battery"]])
    cover = training_coverage(released_augmentation(runs))
    label = {"inside": "yes", "milder": "milder only", "outside": "no"}
    rows = [[f"`{c['name']}`", WHY_NOW.get(c["name"], c["why"]),
             f"{label[cover[c['name']][0]]}: {cover[c['name']][1]}" if c["name"] in cover else "-"]
            for c in recipes["battery"]]
    return markdown_table(["condition", "why it is there", f"in {runs['release']}'s training augmentation"], rows)


def coverage_text(recipes: dict, runs: dict) -> str:
    """Which battery rows the released run's augmentation made partly in distribution (issue 20: the card
    says so), computed from its logged command."""
    cover = training_coverage(released_augmentation(runs))
    names = [c["name"] for c in recipes["battery"] if c["name"] in cover]

    def group(status: str) -> str:
        return ", ".join(f"`{n}`" for n in names if cover[n][0] == status) or "none"

    run = runs["runs"][-1]["name"]
    n_inside = sum(cover[n][0] == "inside" for n in names)
    return (f"Which rows training has seen: the run that made {runs['release']}'s weights ({run}, the last column's "
            f"flags) applies the change of {n_inside} of the {len(names)} rows at the battery's magnitude or beyond, "
            f"each on a random share of the training views, so these rows are partly in distribution: {group('inside')}. "
            f"It applies a milder change of the same kind for {group('milder')} (partly in distribution; the "
            f"battery's magnitude lies beyond the training range), and nothing like {group('outside')}.")


def recipe_rows(recipes: dict, released: dict[str, str]) -> list[list]:
    """One row per candidate, families together, the chosen one marked."""
    chosen = recipes["decision"]["chosen"]

    def family(name: str) -> tuple:
        order = ("ours", "full FT", "LP-FT", "WiSE", "probe", "ensemble", "TTA")
        return (next((i for i, f in enumerate(order) if name.startswith(f)), len(order)), name)

    rows = []
    for name in sorted(recipes["candidates"], key=family):
        c = recipes["candidates"][name]
        s, p, sel = c["summary"], c["conditions"][PLAIN], c["selection"]
        mark = (" **(chosen)**" if name == chosen else
                " (reference: the released folder, scored again beside these candidates)" if c["meta"].get("reference")
                else "")
        rows.append([name + mark, f"{p['macro_f1']:.3f}", f"{p['specificity']:.3f}",
                     f"{s['worst_macro_f1']:.3f} ({s['worst_condition_macro_f1']})", f"{s['mean_macro_f1']:.3f}",
                     f"{s['worst_specificity']:.3f} ({s['worst_condition_specificity']})", f"{s['mean_specificity']:.3f}",
                     "yes" if sel["eligible"] else "no: " + sel["why"], released.get(name, "-")])
    return rows


def recipe_table(recipes: dict, released: dict[str, str]) -> str:
    return markdown_table(["candidate (validation, 689 films, bf16)", "plain macro-F1", "plain spec.",
                           "worst macro-F1 (condition)", "mean macro-F1", "worst spec. (condition)", "mean spec.",
                           "eligible", "official test (released only)"], recipe_rows(recipes, released))


def release_robustness(recipes: dict) -> str:
    c = recipes["candidates"][recipes["decision"]["chosen"]]
    rows = [[f"`{n}`", f"{m['macro_f1']:.3f}", f"{m['viral_f1']:.3f}", f"{m['specificity']:.3f}", f"{m['sensitivity']:.3f}",
             f"{m['specificity_argmax']:.3f}", f"{m['binary_auc']:.4f}"] for n, m in c["conditions"].items()]
    return markdown_table(["condition", "macro-F1", "viral F1", "spec. at threshold", "sens. at threshold",
                           "spec. (argmax)", "binary AUC"], rows)


def recipe_tables(runs: dict, recipes: dict) -> dict[str, tuple[str | None, dict]]:
    """Every ``benchmarks/results/recipes*.json`` in the order they were written (recipes.json, then
    recipes_v4.json...), each with the release it chose (from ``recipes_results`` of the release and of
    its history); the current release's table is ``recipes`` itself."""
    chooser = {h.get("recipes_results"): key.removesuffix("_release")
               for key, h in runs.get("history", {}).items() if isinstance(h, dict) and h.get("recipes_results")}
    chooser[runs.get("recipes_results", "recipes.json")] = runs["release"]
    tables = {f.name: (chooser.get(f.name), json.loads(f.read_text())) for f in sorted(RESULTS.glob("recipes*.json"))}
    tables[runs.get("recipes_results", "recipes.json")] = (runs["release"], recipes)
    return tables


def operating_point_kind(table: dict) -> str:
    """The rule by which a recipe table fit each candidate's temperature and threshold."""
    return "battery" if "battery" in str(table.get("operating_point", "")) else "plain validation"


def battery_rows_of(e: dict, tables: dict) -> list[tuple[str, str | None, dict]]:
    """A test evaluation's rows in the recipe tables: (file, the release that table chose, row), the table
    that chose this release first (its candidate as chosen), then any later table that scored the
    released folder again as a reference row."""
    rel = e["release"]
    names = [n for n in (e.get(f"candidate_in_{rel}_table"), e.get("candidate"), rel) if n]
    found = [(f, chose, next(t["candidates"][n] for n in names if n in t.get("candidates", {})))
             for f, (chose, t) in tables.items() if any(n in t.get("candidates", {}) for n in names)]
    return sorted(found, key=lambda x: x[1] != rel)  # stable: the chooser's table first, then in order


def prediction_vs_test(model_dir: Path, runs: dict, recipes: dict) -> str:
    """Every test evaluation beside what the battery predicted for it: its candidate's row in the recipe
    table that chose it (v1 and v2: the first table, where they were scored beside v3's candidates), at
    that table's operating point (v1-v3: temperature and threshold fit on plain validation, as they were
    released; v4 on: fit under the battery). Later tables that scored a released folder again as a
    reference row are listed below the table."""
    tables = recipe_tables(runs, recipes)
    rows, again = [], []
    for e in runs["test_evaluations"]:
        m = json.loads((model_dir / e["metrics"]).read_text())
        found = battery_rows_of(e, tables)
        if not found:
            rows.append([e["release"], *["-"] * 6, f"{m['macro_f1']:.3f}", f"{m['binary']['specificity']:.3f}",
                         "not scored under the battery"])
            continue
        (file, chose, cand), *later = found
        s, p = cand["summary"], cand["conditions"][PLAIN]
        where = (f"`{file}`, the table that chose {e['release']}" if chose == e["release"] else
                 f"`{file}`, scored beside {chose}'s candidates" if chose else f"`{file}`")
        rows.append([e["release"], f"{operating_point_kind(tables[file][1])}, {cand['operating_point']['threshold']:.3f}",
                     f"{p['macro_f1']:.3f}", f"{s['worst_macro_f1']:.3f}", f"{s['mean_macro_f1']:.3f}",
                     f"{p['specificity']:.3f}", f"{s['worst_specificity']:.3f}", f"{m['macro_f1']:.3f}",
                     f"{m['binary']['specificity']:.3f}", where])
        for f, chose_later, c in later:
            sl, pl = c["summary"], c["conditions"][PLAIN]
            again.append(f"{e['release']} in `{f}` (beside {chose_later}'s candidates; {operating_point_kind(tables[f][1])} "
                         f"fit, threshold {c['operating_point']['threshold']:.3f}): validation macro-F1 "
                         f"{pl['macro_f1']:.3f}, battery worst {sl['worst_macro_f1']:.3f} and mean "
                         f"{sl['mean_macro_f1']:.3f}, validation spec. {pl['specificity']:.3f}, battery worst spec. "
                         f"{sl['worst_specificity']:.3f}")
    table = markdown_table(["release", "operating point (threshold)", "validation macro-F1", "battery worst macro-F1",
                            "battery mean macro-F1", "validation spec.", "battery worst spec.", "test macro-F1",
                            "test spec. (stored threshold)", "from"], rows)
    note = ("Each row is the release's candidate as the table that chose it scored it (validation, bfloat16 logits), "
            "at that table's operating point: temperature and threshold fit on plain validation (the v3 rule, as "
            "v1-v3 were calibrated) or under the battery (the v4 rule, v4 on). The test columns are the release's one "
            "test evaluation at its stored threshold.")
    if again:
        note += (" A later table scored the released folder again as a reference row (the float16-stored weights with "
                 "their temperature, the operating point refit by that table's rule), so the same release has a "
                 "second set of numbers there; these are the numbers its successor's recipe table and selection "
                 "compare against: " + "; ".join(again) + ".")
    return table + "\n\n" + note


SCOPE_ROWS = {  # benchmarks/scope.json keys -> what the row is
    "nih_held_out_no_finding": "NIH held-out patients, \"No Finding\" (adults)",
    "nih_held_out_pneumonia": "NIH held-out patients, \"Pneumonia\" (adults)",
    "nih_held_out_no_finding_without_scope_check": "... the same normal films without the scope check",
    "nih_held_out_pneumonia_without_scope_check": "... the same pneumonia films without the scope check",
    "validation": "in-scope validation films (the limit was set here)",
    "test_counted_only": "official test films (counted once, nothing chosen on them)",
    "space_examples": "the Space's pediatric examples",
    "space_example_adult_dicom": "the Space's adult DICOM example (SIIM CR chest PA)",
    "skytells_covid19_adult": "Skytells adult COVID-19 films (not used to fit)",
    "non_films": "photographs, screenshots, an MRI slice... (benchmarks/input_gate.py)",
}


def scope_table(scope: dict) -> str:
    rows = [[label, r["n"], r["refused"], r["flagged"], r["answered"],
             "-" if r["answered"] == 0 else f"{r['pneumonia_calls_among_answered']} ({r['pneumonia_call_rate_among_answered']:.2f})"]
            for key, label in SCOPE_ROWS.items() if (r := scope.get(key))]
    return markdown_table(["films", "n", "refused (rules, gate)", "flagged out of scope", "answered",
                           "pneumonia calls among answered (rate)"], rows)


def scope_text(scope: dict | None) -> str:
    if not scope:
        return "(run `python benchmarks/scope.py`)"
    m = scope["scope"]
    fit = _load(RESULTS / "scope_fit.json")
    return (f"A logistic regression on this model's head features (the same forward pass) tells the pediatric "
            f"training films from NIH ChestX-ray14 films ({m['patients']['fit']} fit patients; "
            f"{m['patients']['validation']} validation patients chose C = {m['C']:g}; the "
            f"{m['patients']['held_out']} held-out patients were never read by the fit). Its limit "
            f"({scope['limit']:.2f} on the out-of-scope log-odds) was set to flag at most "
            f"{m['flag_rate_target']:.0%} of the in-scope validation films"
            + (f" ({fit['in_scope_validation']['flagged']} of {fit['in_scope_validation']['n']} in the fit's batched "
               "bfloat16 passes; the Space's one-film passes flag the count in the table: a film or two near the "
               "limit, a difference not traced further)" if fit else "")
            + ". A flagged film gets no label and no pneumonia call. `python benchmarks/scope.py`, through the "
              "Space's own path:")


def private_mode_text(results_dir: Path = RESULTS) -> str:
    """The ONNX variants' agreement with PyTorch, the private page's times in Chromium and the
    heatmaps' faithfulness (ROAD), from their benchmark files."""
    out = []
    onnx = _load(results_dir / "onnx_agreement.json")
    if onnx:
        rows = [[v, a["file"], f"{a['bytes'] / 2**20:.0f}", a["n"], f"{a['max_abs_probability_diff']:.1e}",
                 f"{a['label_changes']} ({a['label_change_rate']:.1%})",
                 f"{a.get('scope_verdict_changes', '-')} / {a.get('gate_verdict_changes', '-')}",
                 f"<= {a['tolerance']['max_abs_probability_diff']:g}, <= {a['tolerance']['label_change_rate']:.0%}",
                 "shipped" if a["within_tolerance"] else "not shipped"]
                for v, a in onnx["agreement"].items()]
        out += [f"`{onnx['command']}`: each ONNX variant against the PyTorch float32 model on the validation "
                "films (the temperature is in the graph's weights; the threshold, the rule limits and the scope "
                "check are in `onnx/browser.json`, the learned input gate's numbers in `onnx/gate.bin`; the page "
                "runs both on the graph's `features`):", "",
                markdown_table(["variant", "file", "MB", "films", "max abs prob. diff", "label changes",
                                "scope / gate verdict changes", "tolerance", "outcome"], rows)]
        trials = _load(results_dir / "onnx_int8_trials.json")
        if trials:
            out += ["", "Other int8 quantizations tried on the same films (`python benchmarks/onnx_int8_trials.py`), none "
                        "within tolerance: " + "; ".join(
                            f"{k.replace('_', ' ')}: max abs prob. diff {t['max_abs_probability_diff']:.3f}, "
                            f"{t['label_changes']} label change(s)" for k, t in trials.items())
                    + ". The page therefore loads the float32 graph (float16-stored weights, 44 MB). A float16-compute "
                      "graph (`--variants float16`) would be no smaller: the released weights are float16 already, and "
                      "`model.onnx` stores them so."]
    page = _load(results_dir / "private_page.json")
    if page:
        t = page["targets"]
        rows = [[v, r["megabytes"], r["wasm_threads"], r["cold_load_ms"]["median"], r["film_to_probabilities_ms"]["median"],
                 r["film_to_heatmap_ms"]["median"]] for v, r in page["variants"].items()]
        out += ["", f"The private page (`/private/`: the model in the visitor's browser) in {page['browser']}, served "
                    f"locally, medians (`python benchmarks/private_page.py`; targets: cold load <= {t['cold_load_ms_smaller_variant']} "
                    f"ms for the smaller variant, film -> probabilities <= {t['film_to_probabilities_ms']} ms, film -> "
                    f"heatmap <= {t['film_to_heatmap_ms']} ms):", "",
                markdown_table(["variant", "MB", "WASM threads", "cold load ms", "film -> probabilities ms",
                                "film -> heatmap ms"], rows)]
    faith = _load(results_dir / "heatmap_faithfulness.json")
    if faith:
        rows = [[r["method"], f"{r['road_morf']:.3f}", f"{r['road_lerf']:.3f}",
                 f"{r['road_combined']:.3f} +- {r['road_combined_sem']:.3f}", f"{r['central_third_share']:.2f}",
                 f"{r['bottom_fifth_share']:.2f}"] for r in faith["rows"]]
        u = faith["rows"][0]["uniform_map_would_give"]
        out += ["", f"Heatmap faithfulness on {faith['films']} validation films (`python benchmarks/heatmap_faithfulness.py`; "
                    "pytorch-grad-cam's ROAD metrics, the predicted class's softmax score, removal percentiles "
                    f"{', '.join(map(str, faith['percentiles']))}: MoRF lower is better, LeRF and combined higher). No lung masks "
                    "are available here, so where the heat lies is given by two geometric proxies: the share of heat in the "
                    f"central third of the width (spine, mediastinum; a uniform map gives {u['central_third_share']:.2f}) and in the "
                    f"bottom fifth (mostly below the diaphragm; uniform {u['bottom_fifth_share']:.2f}).", "",
                markdown_table(["method", "ROAD MoRF", "ROAD LeRF", "ROAD combined (+- s.e.)", "heat in central third",
                                "heat in bottom fifth"], rows)]
        page_row = next((r for r in faith["rows"] if "private page" in r["method"]), None)
        server_row = next((r for r in faith["rows"] if "chosen by this table" in r["method"]), None)
        floor_row = next((r for r in faith["rows"] if "random" in r["method"]), None)
        if page_row and server_row:
            def vs_uniform(row) -> str:  # each share against a uniform map's, within 0.05 counted as about the same
                diffs = [row[k] - u[k] for k in ("central_third_share", "bottom_fifth_share")]
                if all(abs(d) < 0.05 for d in diffs):
                    return "about what a uniform map gives"
                return "less than a uniform map" if all(d < 0 for d in diffs) else (
                    "more than a uniform map" if all(d > 0 for d in diffs) else "against a uniform map")

            keys = ("central_third_share", "bottom_fifth_share")
            page_better = all(page_row[k] < server_row[k] for k in keys)
            page_worse = all(page_row[k] >= server_row[k] for k in keys)
            out += ["", f"Outside the lungs: the server's Grad-CAM puts {server_row['central_third_share']:.2f} of its heat on "
                        f"the central third and {server_row['bottom_fifth_share']:.2f} on the bottom fifth, {vs_uniform(server_row)} "
                        f"({u['central_third_share']:.2f} / {u['bottom_fifth_share']:.2f}); the page's map puts "
                        f"{page_row['central_third_share']:.2f} / {page_row['bottom_fifth_share']:.2f}, {vs_uniform(page_row)}: "
                        + ("it puts less heat there than Grad-CAM" if page_better else
                           "it does not do better than Grad-CAM on where the heat lies" if page_worse else
                           "neither map puts less heat there on both proxies")
                        + (f", and its ROAD combined ({page_row['road_combined']:.3f} +- {page_row['road_combined_sem']:.3f}) "
                           f"is within two standard errors of the random floor's ({floor_row['road_combined']:.3f})"
                           if floor_row and page_row["road_combined"] - floor_row["road_combined"]
                           < 2 * (page_row["road_combined_sem"] ** 2 + floor_row["road_combined_sem"] ** 2) ** 0.5 else "")
                        + "."]
        forward = [r for r in faith["rows"] if "forward-only" in r["method"]]
        if len(forward) > 1:
            best = max(forward, key=lambda r: r["road_combined"])
            page = next((r for r in forward if "private page" in r["method"]), None)
            out += ["", f"Of the {len(forward)} forward-only candidates for the page, the highest ROAD combined is "
                        f"{best['method'].split(' (')[0]}'s ({best['road_combined']:.3f}; the others "
                        + ", ".join(f"{r['road_combined']:.3f}" for r in forward if r is not best)
                        + (", each within two standard errors of it)" if all(
                            best["road_combined"] - r["road_combined"]
                            < 2 * (best["road_combined_sem"] ** 2 + r["road_combined_sem"] ** 2) ** 0.5
                            for r in forward if r is not best) else ")")
                        + ("; the page draws it." if best is page else
                           f"; the page draws {page['method'].split(' (')[0]} ({page['road_combined']:.3f})." if page else ".")
                        + (" Every forward-only map is less faithful than the server's Grad-CAM by more than two standard "
                           "errors, and the page's caption says it is a rougher guide." if server_row and all(
                               server_row["road_combined"] - r["road_combined"]
                               > 2 * (server_row["road_combined_sem"] ** 2 + r["road_combined_sem"] ** 2) ** 0.5
                               for r in forward) else "")]
    return "\n".join(out) if out else "(run `cxr-export --onnx`, `python benchmarks/private_page.py` and `python benchmarks/heatmap_faithfulness.py`)"


# ---- the card -----------------------------------------------------------------------------------------

def preprocessing_text(model_dir: Path) -> str:
    proc = json.loads((model_dir / "preprocessor_config.json").read_text())
    side = proc["size"]["height"]
    if proc.get("do_center_crop"):
        crop = proc["crop_size"]["height"]
        return (f"stretched to {side} x {side} px and the centre {crop} x {crop} px kept (crop_pct "
                f"{crop / side:.2f}: the film's outer {(1 - crop / side) / 2:.0%} on each side is not seen)")
    return f"stretched to {side} x {side} px (whole film)"


def target_sensitivity_text(cal: dict) -> str:
    """The threshold's sensitivity rule as fit: plain validation alone, or (fit under the battery) plain
    validation and every battery condition."""
    if cal.get("condition_sensitivity"):
        return f">= {cal['target_sensitivity']:.1%} plain and >= {cal['condition_sensitivity']:.0%} per-battery-condition"
    return f"{cal['target_sensitivity']:.1%}"


def rule_text(runs: dict) -> str:
    """The logged selection rule, and where the current release's plan (``<release>_plan``, logged before
    any of its candidates was scored) changed its reference rows."""
    import re

    text = (runs.get("selection_rule") or {}).get("text", "")
    plan = runs.get(f"{runs['release']}_plan") or {}
    refs = re.search(r"not a reference \(([^)]*)\)", text)
    for_release = re.search(r"any (v\d+) candidate", (runs.get("selection_rule") or {}).get("logged", ""))
    if not (plan.get("rule") and refs and for_release) or for_release.group(1) == runs["release"]:
        return text
    return (f"{text}. The reference rows it names ({refs.group(1)}) were {for_release.group(1)}'s; "
            f"{runs['release']}'s plan (`training_runs.json` `{runs['release']}_plan`, logged "
            f"{plan['logged'].split(',')[0]}) kept the rule with its own reference row: \"{plan['rule']}\"")


def values(model_dir: Path, latency_path: Path, plots_prefix: str) -> dict:
    test = json.loads((model_dir / "eval/test/metrics.json").read_text())
    val = json.loads((model_dir / "eval/validation/metrics.json").read_text())
    runs = json.loads((model_dir / "training_runs.json").read_text())
    cal = json.loads((model_dir / "config.json").read_text())["cxr_calibration"]
    latency = _load(latency_path)
    recipes = _load(RESULTS / runs.get("recipes_results", "recipes.json"))
    scope = _load(RESULTS / "scope.json")
    agree = _load(RESULTS / "precision_agreement.json")
    dedup = test.get("exact_dedup")
    b = test["binary"]
    released = {e["candidate"]: f"macro-F1 {json.loads((model_dir / e['metrics']).read_text())['macro_f1']:.3f}, "
                                f"spec. {json.loads((model_dir / e['metrics']).read_text())['binary']['specificity']:.3f} ({e['release']})"
                for e in runs["test_evaluations"] if e.get("candidate")}
    ex = runs["export"]
    first = runs["runs"][0]
    rel = runs["release"]
    lat_hw = ((f"{latency['cpu']}, {latency['threads']} threads, torch {latency['torch']}, {latency['images']} Kermany "
               f"test files x {latency['repeats']}, batch 1, {latency['date']}. `python benchmarks/latency.py` (file in, "
               "result out: decode + preprocessing + forward).") if latency else "(run `python benchmarks/latency.py`)")
    precision = ""
    if agree:
        precision = (f"bfloat16 against float32 over all {agree['n']} {agree['split']} images "
                     f"(`python benchmarks/precision_agreement.py`): max absolute probability difference "
                     f"{agree['max_abs_prob_diff']:.3f} (99th percentile {agree['p99_abs_prob_diff']:.3f}), "
                     f"{agree['label_changes']} label change(s), {agree['pneumonia_call_changes']} changed pneumonia "
                     "call(s). The Space and `Predictor(precision=\"auto\")` use bf16 on CPUs with native bf16, "
                     "Grad-CAM included (one pass gives the prediction, the input checks and the map). Elsewhere on "
                     "this card, float32: the test and validation metrics (`cxr-evaluate`) and the export check; "
                     "bfloat16 logits (the Space's precision): the robustness battery and recipe tables, the operating "
                     "point fit under the battery (temperature and threshold) and the scope check's limit.")
        c = agree.get("bfloat16_compiled", {})
        if c.get("n"):
            precision += (f" Compiled (`Predictor.compile()`, TorchInductor, the Space's `CXR_COMPILE`), against float32: "
                          f"max {c['max_abs_prob_diff']:.3f}, {c['label_changes']} label change(s), "
                          f"{c['pneumonia_call_changes']} changed call(s).")
        g = agree.get("gradcam_bfloat16_vs_float32")
        if g:
            precision += (f" Grad-CAM maps in bf16 against float32 on {g['films']} {agree['split']} films: Pearson "
                          f"correlation median {g['pearson_median']:.4f} (lowest {g['pearson_min']:.4f}); the hottest "
                          f"20% of pixels overlap {g['hottest_20pct_iou_median']:.2f} (IoU; lowest "
                          f"{g['hottest_20pct_iou_min']:.2f}).")
    stage_rows = [[r["name"], f"{r['image_size']} px", f"{r['epochs_run']} (best {r['best_epoch']})",
                   r.get("selection", "validation macro-F1"), f"{r['wall_seconds'] / 60:.0f} min", f"`{r['command']}`"]
                  for r in runs["runs"]]
    return dict(
        title=runs.get("title", "DINOv2-small for pediatric chest X-ray triage"), release=rel,
        summary=runs.get("summary", ""),
        threshold=f"{cal['pneumonia_threshold']:.4f}", target_sensitivity=target_sensitivity_text(cal),
        weights_mb=f"{sum(p.stat().st_size for p in model_dir.glob('*.safetensors')) / 2**20:.0f}",
        export_diff=f"{ex['max_abs_probability_diff']:.1e}", export_label_changes=ex["label_changes"],
        export_checked=ex["checked_images"], preprocessing=preprocessing_text(model_dir),
        dedup_removed=dedup["n_removed"] if dedup else 0,
        results_table=results_table([("official test", test)] + ([("test, exact duplicates removed", dedup)] if dedup else [])
                                    + [("validation (selection set)", val)]),
        confusion=confusion(test), test_sensitivity=fmt(test, "binary.sensitivity"),
        test_specificity=fmt(test, "binary.specificity"), test_ppv=f"{b['ppv']:.4f}", test_npv=f"{b['npv']:.4f}",
        argmax_specificity=f"{argmax_specificity(model_dir / 'eval/test/predictions.csv'):.3f}",
        plots_prefix=plots_prefix, targets_table=targets_table(test, latency, runs, model_dir), gaps=runs.get("gaps", ""),
        release_comparison=release_comparison(model_dir, runs), release_outcome=runs.get("release_outcome", ""),
        battery_table=(battery_table(recipes, runs) + "\n\n" + coverage_text(recipes, runs)) if recipes else
        "(run `python benchmarks/recipes.py table`)",
        rule=rule_text(runs),
        recipe_table=recipe_table(recipes, released) if recipes else "", recipe_notes=runs.get("recipe_notes", ""),
        release_robustness=release_robustness(recipes) if recipes else "",
        prediction_vs_test=prediction_vs_test(model_dir, runs, recipes) if recipes else "",
        n_train=first["n_train"], n_validation=first["n_validation"], recipe_text=runs.get("recipe", ""),
        stage_table=markdown_table(["run", "input", "epochs", "selection", "wall", "command"], stage_rows),
        hardware=first["hardware"], torch=first["versions"]["torch"], transformers=first["versions"]["transformers"],
        compute_note=runs.get("compute_note", ""),
        derivation="\n".join(f"{i}. {d['what']}: `{d['command']}`" for i, d in enumerate(runs.get("derivation", []), 1)),
        temperature=f"{cal['temperature']:.4f}", nll_before=f"{cal['nll_before']:.4f}", nll_after=f"{cal['nll_after']:.4f}",
        calibration_rule=(f"Fit under the robustness battery: {cal['fit_rule']}." if cal.get("fit_rule") else
                          "Fit on plain validation."),
        operating_point=(recipes or {}).get("operating_point", "temperature and threshold fit on plain validation"),
        scope_text=scope_text(scope), scope_table=scope_table(scope) if scope else "",
        fit_sensitivity=f"{cal['fit_sensitivity']:.4f}", fit_specificity=f"{cal['fit_specificity']:.4f}",
        latency_text=lat_hw, latency_table=latency_table(latency) if latency else "", precision_text=precision,
        history_table=history_table(model_dir, runs), private_mode=private_mode_text(),
    )


def render(model_dir: Path, latency_path: Path, plots_prefix: str) -> str:
    runs = json.loads((model_dir / "training_runs.json").read_text())
    test = json.loads((model_dir / "eval/test/metrics.json").read_text())
    data = ModelCardData(
        license="apache-2.0", library_name="transformers", pipeline_tag="image-classification",
        base_model="facebook/dinov2-small", tags=["medical-imaging", "chest-x-ray", "pneumonia", "dinov2", "grad-cam"],
        model_name=f"cxr-pneumonia DINOv2-small ({runs['release']})",
        eval_results=eval_results(test, "Kermany chest X-ray (official test split)", "kermany-chest-xray"),
    )
    return render_template("release_card.md", data, **values(model_dir, latency_path, plots_prefix))


# ---- the README's blocks ------------------------------------------------------------------------------

README_START = "<!-- results:start (written by scripts/release_card.py) -->"
README_END = "<!-- results:end -->"
SPACE_START = "<!-- space:start (written by scripts/release_card.py) -->"
SPACE_END = "<!-- space:end -->"
SCOPE_START = "<!-- scope:start (written by scripts/release_card.py) -->"
SCOPE_END = "<!-- scope:end -->"


def readme_results(model_dir: Path, latency_path: Path) -> str:
    """The README's results block: every release on the official test, then the targets against the
    current release and the anchor."""
    test = json.loads((model_dir / "eval/test/metrics.json").read_text())
    runs = json.loads((model_dir / "training_runs.json").read_text())
    return "\n\n".join([release_comparison(model_dir, runs), f"Targets ({runs['release']}):",
                         targets_table(test, _load(latency_path), runs, model_dir)])


def loader_summary(r: dict) -> str:
    """One space_memory case in a few words: its error, its refusal, the loader's last note, its rows."""
    if r.get("error"):
        return r["error"]
    if r.get("refused"):
        return "refused: " + r["refused"].split(":")[0]
    if r.get("notes"):
        return r["notes"][-1]
    return f"{r['rows']} rows" if "rows" in r else "decoded as is"


def readme_space(results_dir: Path = RESULTS) -> str:
    """The README's Space block: memory and time per request, and the input gate's figures."""
    out = []
    mem = _load(results_dir / "space_memory.json")
    if mem:
        rows = [[f"`{name}`", r.get("file_mb", "-"), r.get("seconds", "-"), r.get("peak_above_baseline_mb", "-"),
                 loader_summary(r)]
                for name, r in mem["results"].items()]
        out += [f"Memory and time per request (`python benchmarks/space_memory.py`; {mem['threads']} threads, "
                f"a fresh process per case; bound: {mem['bound']}):", "",
                markdown_table(["input", "file MB", "seconds", "peak MB above baseline", "what the loader did"], rows)]
    gate = _load(results_dir / "input_gate.json")
    if gate:
        label = {"validation_upright": "validation films", "test_upright": "official test films (counted once)",
                 "external_chest_covid19_adult": "adult COVID-19 films (another source)",
                 "validation_turned_90": "validation films turned 90 deg", "validation_turned_180": "... turned 180 deg",
                 "validation_turned_270": "... turned 270 deg", "validation_inverted": "... grey levels inverted",
                 "negatives_photographs": "photographs (grey)", "negatives_other_images": "MRI slice, map, logos",
                 "negatives_screenshots": "screenshots with text", "negatives_synthetic": "noise and gradients",
                 "negatives_non_chest_dicom": "non-chest DICOM"}
        rows = [[label.get(k, k), v["n"], v["accepted"], v.get("cautioned", "-"), v["corrected"], v["refused"]]
                for k, v in gate.items() if isinstance(v, dict) and "n" in v]
        out += ["", "The Space's input gate on real films and on what is not a frontal chest film "
                    "(`python benchmarks/input_gate.py`: the rules and the learned gate, through the Space's own path):",
                "", markdown_table(["images", "n", "accepted", "of which with a caution note",
                                                 "turned upright / inverted back", "refused"], rows)]
    lat = _load(results_dir / "space_latency.json")
    if lat:
        st = lat["stages_ms"]
        names = {"decode": "decode", "rules": "rules (modeling.quality)", "plain_pass_bf16": "plain pass (bf16)",
                 "gradcam_bf16_one_pass": "Grad-CAM pass, bf16 (the Space's one pass: prediction, checks, map)",
                 "gradcam_float32": "Grad-CAM pass, float32 (the Space's second pass before issue 21)",
                 "hash": "hash of the pixels", "staging_png": "staging PNG (after the answer)",
                 "store_write": "store write", "overlay_png_1024": "overlay PNG",
                 "service_analyze_whole": "CxrService.analyze, whole",
                 "predictor_predict_gradcam": f"Predictor predict + Grad-CAM ({st.get('precision', 'bf16')})",
                 "predictor_predict_gradcam_float32": "Predictor predict + Grad-CAM (float32)"}
        rows = [[names.get(k, k), v] for k, v in st.items() if isinstance(v, (int, float))]
        rt = [["client round trip (gradio_client, /predict)", lat["client_round_trip_ms"]],
              ["latency the Space reports", lat["server_latency_ms"]]]
        if "refused_call_round_trip_ms" in lat:
            rt.append(["the same call refused before any model work (Gradio's transport and the file's decode)",
                       lat["refused_call_round_trip_ms"]])
        if "client_upload_and_join_ms" in lat:
            rt.append(["... of which the client's upload and queue join, before the server starts",
                       lat["client_upload_and_join_ms"]])
        t = lat["targets"]
        out += ["", f"One Space request, stage by stage (`python benchmarks/space_latency.py`; {lat['threads']} threads, "
                    f"median of {lat['repeats']}, the normal example):", "",
                markdown_table(["stage", "median ms"], rows + rt), "",
                f"Round trip over the Predictor's own predict + Grad-CAM: {lat['round_trip_over_predictor']}x "
                f"(target <= {t['round_trip_over_predictor']}x); client round trip {lat['client_round_trip_ms']} ms "
                f"(target <= {t['client_round_trip_ms']} ms)."]
        if "httpx_client_construction_ms" in lat:
            floor = lat["refused_call_round_trip_ms"] / lat["stages_ms"]["predictor_predict_gradcam"]
            out += ["", f"The client sets a floor: gradio_client builds a new `httpx.Client` "
                        f"({lat['httpx_client_construction_ms']} ms each, most of it loading the CA bundle into a new SSL "
                        f"context) for the upload, the queue join and the answer's stream of every call, then polls for "
                        f"the answer every 50 ms, so a call refused before any model work already takes {floor:.1f}x the "
                        "Predictor's time."]
        if "shared_ssl_context" in lat:
            sh = lat["shared_ssl_context"]
            out += ["", "With one SSL context built once and given to the client (`Client(url, ssl_verify="
                        "ssl.create_default_context(cafile=certifi.where()))`: the same certificate checks; "
                        "docs/space.md shows it), measured in the same run: client round trip "
                        f"{sh['client_round_trip_ms']} ms ({sh['round_trip_over_predictor']}x the Predictor's time), "
                        f"latency the Space reports {sh['server_latency_ms']} ms (the client no longer builds contexts "
                        f"on the same cores during the pass), a refused call {sh['refused_call_round_trip_ms']} ms, "
                        f"upload and queue join {sh['client_upload_and_join_ms']} ms. What is left of the floor is the "
                        "client's 50 ms polling and Gradio's transport."]
    scope = _load(results_dir / "scope.json")
    if scope:
        out += ["", "The scope check (is this film like the pediatric films the model knows?) on adult films and "
                    "on real pediatric films (`python benchmarks/scope.py`, through the Space's own path):", "",
                scope_table(scope)]
    return "\n".join(out)


ARCHIVE_START = "<!-- archive:start (written by scripts/release_card.py) -->"
ARCHIVE_END = "<!-- archive:end -->"


def archive_table(results_dir: Path = RESULTS) -> str:
    """docs/benchmarks.md's archive block, from benchmarks/results/archive.json."""
    a = _load(results_dir / "archive.json")
    if not a:
        return "(run `python benchmarks/archive.py`)"
    loop = a["results"][0]["films_per_s"]
    rows = [[r["config"], f"{r['films_per_s']:.2f}", f"{r['films_per_s'] / loop:.2f}x", f"{r['peak_pss_mb']:.0f}",
             r["rows"], r["failed"]] for r in a["results"]]
    t = a["twice_the_archive"]
    return "\n".join([
        f"`python benchmarks/archive.py` on this machine ({a['cores']} cores): {a['films']} films ({a['sizes']}) and "
        f"{a['broken']} broken files, {a['precision']}, each setting in its own process, timed after the model is loaded:", "",
        markdown_table(["setting", "films/s", "vs the per-file loop", "peak memory MB (PSS)", "rows", "rows with a reason"], rows),
        "", f"The best setting ({t['config']}) on an archive twice the size ({t['films']} files): {t['films_per_s']:.2f} films/s, "
            f"peak {t['peak_pss_mb']:.0f} MB (against {t['peak_pss_mb_at_1x']:.0f} MB at 1x). Target: {a['target']}."]
        + ([] if "speedup_vs_todays_command" not in a["best"] else [
            "", f"The best setting is {a['best']['speedup_vs_loop']:.2f}x the first row (a per-file loop with the archive "
                f"mode's precision and decode size: the schedule alone) and {a['best']['speedup_vs_todays_command']:.2f}x "
                "today's `cxr-predict FILE...` as it runs (float32, films decoded at full size)"
                + ("." if not a.get("loop_the_issue_found") else
                   f"; against `cxr-predict FILE...` as the issue found it (commit `{a['loop_the_issue_found']['commit']}`, "
                   "its code and model: float32, full-size decode, pydicom's own RLE decoder; "
                   f"{a['loop_the_issue_found']['films_per_s']:.2f} films/s in the same run) it is "
                   f"{a['best']['speedup_vs_the_loop_the_issue_found']:.2f}x. Today's two loops decode and preprocess "
                   "as the archive mode does, which this work made faster (pylibjpeg-rle for RLE DICOM, the "
                   "processor's resize on one band), so the ratios against them leave that part out.")])
        + ([] if "bound" not in a else [
            "", f"What this machine allows: a readable film takes {a['bound']['decode_ms_per_film']} ms to decode (one core) "
                f"and {a['bound']['predict_ms_per_film_1_thread']} ms for the image processor and the compiled forward pass "
                f"on one thread, one film at a time ({a['bound']['predict_ms_per_film_2_threads']} ms on two threads), so "
                f"{a['bound']['cores']} cores finish at most {a['bound']['most_films_per_s']:.2f} films/s with this forward "
                f"pass, {a['bound']['most_speedup_vs_loop']:.2f}x the first row's readable films per second"
                + (f" ({a['bound']['loop_readable_films_per_s']:.2f})" if "loop_readable_films_per_s" in a["bound"] else "")
                + "; the best setting falls short of that by what the bound leaves out: the workers' other work on "
                "each film (file and pixel hashes, the rule checks), moving pixels between processes, and three "
                "processes sharing two cores. Beyond it, more cores (the same command scales across processes and "
                "machines under `accelerate launch`)."]))


def update_block(readme: Path, start: str, end: str, block: str) -> None:
    text = readme.read_text()
    i, j = text.index(start), text.index(end)
    readme.write_text(text[:i + len(start)] + "\n" + block + "\n" + text[j:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_flag(ap, "--model", old=("--model-dir",), default=str(ROOT / "space" / "model"))
    ap.add_argument("--latency", default=str(RESULTS / "latency.json"))
    args = parse(ap, argv)
    model_dir = Path(args.model)
    (model_dir / "README.md").write_text(render(model_dir, Path(args.latency), ""))
    rel = model_dir.resolve().relative_to(ROOT).as_posix() + "/"
    (ROOT / "model_card.md").write_text(render(model_dir, Path(args.latency), rel))
    readme = ROOT / "README.md"
    update_block(readme, README_START, README_END, readme_results(model_dir, Path(args.latency)))
    if SPACE_START in readme.read_text():
        update_block(readme, SPACE_START, SPACE_END, readme_space())
    scope = _load(RESULTS / "scope.json")
    space_doc = ROOT / "docs" / "space.md"
    if scope and SCOPE_START in space_doc.read_text():
        update_block(space_doc, SCOPE_START, SCOPE_END, scope_table(scope))
    bench_doc = ROOT / "docs" / "benchmarks.md"
    if ARCHIVE_START in bench_doc.read_text():
        update_block(bench_doc, ARCHIVE_START, ARCHIVE_END, archive_table())
    print(f"wrote {model_dir / 'README.md'}, {ROOT / 'model_card.md'} and the README's blocks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
