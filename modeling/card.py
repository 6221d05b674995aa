"""The project's one card renderer: model cards (a training run's, a release's) and the dataset card.

Every card is a Jinja template in ``modeling/templates/`` rendered by huggingface_hub's
``ModelCard.from_template`` / ``DatasetCard.from_template`` (the YAML header comes from
``ModelCardData`` / ``DatasetCardData``, so the Hub parses it, ``model-index`` included). The callers
compute the values from measured files (``metrics.json``, ``training_runs.json``, the build report)
and pass them in; the templates hold the words. Tables are built with :func:`markdown_table` and
:func:`results_table`, numbers read with :func:`get` and :func:`fmt`.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

from .labels import LABELS

TEMPLATES = Path(__file__).with_name("templates")
TEMPLATE = TEMPLATES / "model_card.md"
PROJECT_URL = "https://github.com/cxr-pneumonia/cxr-pneumonia"

# (row name, dotted key in the metrics dict, model-index metric type or None)
ROWS = [
    ("3-class accuracy", "accuracy", "accuracy"),
    ("3-class macro-F1", "macro_f1", "f1"),
    *[(f"F1 {name.replace('_', ' ')}", f"per_class.{name}.f1", None) for name in LABELS],
    ("macro AUROC (one-vs-rest)", "auc_ovr_macro", "roc_auc"),
    ("normal vs pneumonia: accuracy", "binary.accuracy", None),
    ("normal vs pneumonia: sensitivity", "binary.sensitivity", "recall"),
    ("normal vs pneumonia: specificity", "binary.specificity", None),
    ("normal vs pneumonia: AUROC", "binary.auc", None),
    ("ECE (15 bins, 3-class)", "ece", None),
    ("Brier score (3-class)", "brier", None),
]


def get(d: dict, dotted: str):
    """``d["a"]["b"]`` for ``"a.b"``; None when a part is missing."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def fmt(metrics: dict, key: str) -> str:
    v = get(metrics, key)
    if v is None:
        return "n/a"
    ci = (metrics.get("ci") or {}).get(key)
    return f"{v:.4f} ({ci[0]:.4f}-{ci[1]:.4f})" if ci and None not in ci else f"{v:.4f}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (cells converted with ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_dataset_card(meta: dict, **values) -> str:
    """The dataset card: ``meta`` is its YAML header (``DatasetCardData`` fields), ``values`` what
    ``templates/dataset_card.md`` shows."""
    text = DatasetCard.from_template(DatasetCardData(**meta), template_path=str(TEMPLATES / "dataset_card.md"),
                                     **values).content
    return text if text.endswith("\n") else text + "\n"


def render_template(name: str, card_data: ModelCardData, **values) -> str:
    """A model card from ``templates/NAME`` (``card_data`` is its YAML header), ending in a newline."""
    text = ModelCard.from_template(card_data, template_path=str(TEMPLATES / name), **values).content
    return text if text.endswith("\n") else text + "\n"


def results_table(columns: list[tuple[str, dict]]) -> str:
    head = "| metric | " + " | ".join(name for name, _ in columns) + " |"
    sep = "|---|" + "---|" * len(columns)
    lines = [head, sep]
    for name, key, _ in ROWS:
        lines.append(f"| {name} | " + " | ".join(fmt(m, key) for _, m in columns) + " |")
    return "\n".join(lines)


def eval_results(test: dict, dataset_name: str, dataset_type: str) -> list[EvalResult]:
    res = []
    for name, key, mtype in ROWS:
        v = get(test, key)
        if mtype and v is not None:
            res.append(EvalResult(task_type="image-classification", dataset_type=dataset_type,
                                  dataset_name=dataset_name, dataset_split="test", metric_type=mtype,
                                  metric_name=f"{name} (test split)", metric_value=round(float(v), 4)))
    return res


def _data_text(info: dict) -> str:
    cfg = info.get("config", {})
    return (f"Dataset: `{cfg.get('dataset')}` (built by `dataset_scripts.build`: Kermany chest_xray merged with "
            "further public sources, exact and near duplicates removed, patient-grouped validation split from "
            "train, Kermany's official test split untouched). "
            f"Used: {info.get('n_train', '?')} training and {info.get('n_validation', '?')} validation images"
            + (" (subsampled with --max-train-samples / --max-eval-samples)" if cfg.get("max_train_samples")
               or cfg.get("max_eval_samples") else "") + ".")


def render_model_card(out_dir: Path, *, cfg: dict, metrics: dict, model_id: str | None = None) -> ModelCard:
    out_dir = Path(out_dir)
    info = {}
    if (out_dir / "training_config.json").exists():
        info = json.loads((out_dir / "training_config.json").read_text())
    model_id = model_id or cfg.get("push_to_hub") or str(out_dir)
    test = metrics.get("test")
    val = metrics.get("validation", {})
    cal = metrics.get("calibration", {})
    training = metrics.get("training", {})
    local_dataset = Path(cfg["dataset"]).exists()
    dataset_name = Path(cfg["dataset"]).name if local_dataset else cfg["dataset"]
    dataset_type = "cxr-pneumonia" if local_dataset else cfg["dataset"]  # a Hub id, never a local path

    columns = []
    if test:
        columns.append((f"test (n={test.get('n')})", test))
        if test.get("exact_dedup"):
            d = test["exact_dedup"]
            columns.append((f"test, exact duplicates removed (n={d.get('n')})", d))
    columns.append((f"validation (n={val.get('n')}; used for selection, T and threshold: optimistic)", val))
    results = results_table(columns)
    shown = test or val
    ci_text = (f"Values are point estimates with 95% bootstrap CIs ({shown.get('ci_method')})."
               if shown.get("ci") else "No confidence intervals were computed (--n-bootstrap 0).")
    notes = [f"Decision threshold on p(pneumonia): {cal.get('pneumonia_threshold', 0.5):.4f}.", ci_text]
    if test and test.get("subset"):
        notes.append("**Smoke run: the test numbers are on a subset of the test split (--max-eval-samples); "
                     "they are not a result.**")
    if not test:
        notes.append("No test evaluation was run (--no-test).")
    results_text = results + "\n\n" + " ".join(notes)

    calibration_text = (
        f"Temperature scaling fit on {cal.get('n_fit')} validation images: T = {cal.get('temperature', 1):.3f} "
        f"(validation NLL {cal.get('nll_before', float('nan')):.4f} -> {cal.get('nll_after', float('nan')):.4f}). "
        "T is folded into the classification head, so the saved logits are already calibrated "
        "(`config.cxr_calibration` records it). The pneumonia threshold "
        f"{cal.get('pneumonia_threshold', 0.5):.4f} gives validation sensitivity "
        f"{cal.get('fit_sensitivity', float('nan')):.4f} / specificity {cal.get('fit_specificity', float('nan')):.4f} "
        f"(target sensitivity {cal.get('target_sensitivity')})."
        + (" Test reliability diagram: `eval_test/plots/reliability.png`." if test else ""))

    pre = info.get("preprocessing", {})
    aug = info.get("augmentation", {})
    hw = info.get("hardware", {})
    wall = training.get("wall_seconds")
    card_data = ModelCardData(
        language="en", license="apache-2.0", library_name="transformers", pipeline_tag="image-classification",
        base_model=cfg.get("base_model") if not Path(cfg.get("base_model", "")).exists() else None,
        datasets=[cfg["dataset"]] if not Path(cfg["dataset"]).exists() else None,
        tags=["medical-imaging", "chest-x-ray", "pneumonia", "pediatrics", "grad-cam", "calibrated"],
        metrics=["accuracy", "f1", "roc_auc"],
        model_name=Path(model_id).name,
        eval_results=eval_results(test, dataset_name, dataset_type) if test and not test.get("subset") else None,
    )
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATE),
        model_name=Path(model_id).name, model_id=model_id, repo_url=PROJECT_URL,
        base_model=cfg.get("base_model"), threshold=cal.get("pneumonia_threshold", 0.5),
        target_sensitivity=cal.get("target_sensitivity"), cfg=cfg,
        data_text=_data_text(info),
        preprocessing=(f"{pre.get('size')} x {pre.get('size')} px, "
                       f"{'letterbox (aspect kept, black padding)' if pre.get('letterbox') else 'resized (aspect not kept)'}, "
                       f"grayscale replicated to 3 channels, normalised with mean {pre.get('image_mean')} std {pre.get('image_std')}"),
        augmentation=(f"crop {aug.get('crop_scale')} of the area, rotation +-{aug.get('max_rotation')} deg, "
                      f"brightness/contrast +-{aug.get('brightness')}/{aug.get('contrast')}, gamma +-{aug.get('gamma')}, "
                      f"horizontal flip {'on' if aug.get('hflip') else 'off'}"),
        loss={"weighted_ce": "cross-entropy with inverse-frequency class weights", "focal": f"focal loss (gamma {cfg.get('focal_gamma')}) with class weights",
              "ce": "cross-entropy"}[cfg.get("loss", "ce")]
        + (f", label smoothing {cfg.get('label_smoothing')}" if cfg.get("label_smoothing") else "")
        + (f", MixUp alpha {cfg.get('mixup_alpha')}" if cfg.get("mixup_alpha") else ""),
        schedule=(f"{training.get('epochs_run')} of {cfg.get('epochs')} epochs"
                  + (" (early stopping)" if training.get("stopped_early") else "")
                  + f", best epoch {training.get('best_epoch')}"
                  + (f", backbone frozen for the first {cfg.get('freeze_backbone_epochs')}" if cfg.get("freeze_backbone_epochs") else "")),
        precision=info.get("mixed_precision", "?"),
        hardware=f"{hw.get('cuda') or 'CPU ' + str(hw.get('processor') or hw.get('machine'))}, {hw.get('cpu_threads')} threads, "
                 f"{info.get('num_processes', 1)} process(es)",
        wall_time=f"{wall / 60:.1f} min" if wall else "n/a",
        command=info.get("command", "python train.py ..."),
        test_protocol=("The test split was evaluated once, after training, on the saved model."
                       if test else "The test split was not evaluated for this model."),
        results_text=results_text, calibration_text=calibration_text,
    )


def write_model_card(out_dir: Path, *, cfg: dict, metrics: dict, model_id: str | None = None) -> Path:
    card = render_model_card(out_dir, cfg=cfg, metrics=metrics, model_id=model_id)
    path = Path(out_dir) / "README.md"
    card.save(path)
    return path
