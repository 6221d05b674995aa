"""The command line of the library: one function per command, each the mirror of a Python call.

    cxr-evaluate    --model M --dataset D --output-dir O      modeling.evaluate.evaluate_model
    cxr-predict     --model M FILE...                         modeling.predict.Predictor
    cxr-predict     --model M DIR... --output F.parquet       modeling.archive.predict_archive
    cxr-calibrate   --model M --dataset D --output-dir O      modeling.evaluate.calibrate_saved
    cxr-export      --model M --output-dir O [--dataset D]    modeling.export.export_model
    cxr-robustness  --model M --dataset D --output-dir O      modeling.robustness.evaluate_robustness
    cxr-gate        --model M --dataset D                     modeling.gate.fit_for_model
    cxr-scope       --model M --dataset D --out-of-scope DIR  modeling.scope.fit_for_model

(also ``python -m modeling COMMAND ...``). The commands live here, not in the library modules, so that
importing ``modeling`` never runs argument parsing and the library has no import cycle.

One flag vocabulary across the project (this module, ``train.py``, ``dataset_scripts``,
``benchmarks``): ``--model`` (a saved model folder or Hub id), ``--base-model`` (what training starts
from), ``--dataset`` (a built dataset folder or Hub id), ``--output-dir`` (a folder written) and
``--output`` (a single file written). Older spellings (``--out``, ``--reference``, ``--model-dir``,
``--check-dataset``) still work for one release and print a deprecation notice.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any


class DeprecatedAlias(argparse.Action):
    """An old option spelling: stores into the new destination and says so on stderr."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog}: {option_string} is deprecated and will be removed; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_flag(ap: argparse.ArgumentParser, name: str, *, old: tuple[str, ...] = (), **kwargs: Any) -> None:
    """``ap.add_argument(name, ...)`` plus hidden deprecated spellings that fill the same value."""
    dest = name.lstrip("-").replace("-", "_")
    required = kwargs.pop("required", False)
    ap.add_argument(name, dest=dest, required=required and not old, **kwargs)
    for alias in old:
        ap.add_argument(alias, dest=dest, action=DeprecatedAlias, new=name, help=argparse.SUPPRESS,
                        type=kwargs.get("type"))
    if required and old:
        ap.set_defaults(**{f"_required_{dest}": name})


def parse(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parse_args`` that also enforces flags made optional only because they have an old alias."""
    args = ap.parse_args(argv)
    for key, flag in list(vars(args).items()):
        if key.startswith("_required_"):
            if getattr(args, key[len("_required_"):]) is None:
                ap.error(f"the following arguments are required: {flag}")
            delattr(args, key)
    return args


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


# ---- evaluate -----------------------------------------------------------------------------------------

def evaluate_main(argv: list[str] | None = None) -> int:
    """Evaluate a saved model on a dataset split: metrics with patient-grouped CIs, plots, predictions."""
    from .data import load_cxr_dataset, require_split, stratified_subset
    from .evaluate import evaluate_model
    from .metrics import format_summary
    from .predict import Predictor

    ap = argparse.ArgumentParser(prog="cxr-evaluate", description=evaluate_main.__doc__)
    add_flag(ap, "--model", required=True, help="Hub id or save_pretrained directory")
    ap.add_argument("--revision", default=None, help="model revision (branch, tag or commit) on the Hub")
    add_flag(ap, "--dataset", required=True, help="dataset directory (dataset_scripts.build) or Hub id")
    ap.add_argument("--split", default="test")
    add_flag(ap, "--output-dir", required=True, help="metrics.json, predictions.csv and plots/ go here")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-samples", type=int, default=None,
                    help="evaluate a stratified subset of N rows (smoke tests; marked subset=true, not a result)")
    ap.add_argument("--dataset-revision", default=None, help="dataset revision on the Hub")
    ap.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (0 = none)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="pneumonia threshold (default: the one stored with the model)")
    ap.add_argument("--seed", type=int, default=42,
                    help="bootstrap and --max-samples seed (train.py's default, so its subsets are reproduced)")
    ap.add_argument("--no-progress", action="store_true")
    args = parse(ap, argv)
    predictor = Predictor.from_pretrained(args.model, revision=args.revision)
    split = require_split(load_cxr_dataset(args.dataset, revision=args.dataset_revision), args.split)
    subset = bool(args.max_samples) and args.max_samples < len(split)
    if subset:
        split = stratified_subset(split, args.max_samples, args.seed)
    threshold = predictor.threshold if args.threshold is None else args.threshold
    metrics = evaluate_model(predictor.model, predictor.processor, split, Path(args.output_dir), threshold=threshold,
                             split_name=args.split, batch_size=args.batch_size, n_bootstrap=args.n_bootstrap,
                             seed=args.seed, progress=not args.no_progress,
                             extra={"model": args.model, "model_revision": predictor.revision, "dataset": args.dataset,
                                    "subset": subset})
    print(format_summary(metrics))
    print(f"wrote {Path(args.output_dir) / 'metrics.json'}")
    return 0


# ---- predict ------------------------------------------------------------------------------------------

def predict_main(argv: list[str] | None = None) -> int:
    """One JSON line per file. A file that cannot be read gets a line with its error (reason code and
    message) and the others are still predicted; the exit code is 1 if any file failed, else 0.
    With --output, folders are walked and every film gets a row of a results table (Parquet, CSV or
    JSON lines), decoded in worker processes and predicted in batches (modeling.archive)."""
    from PIL import Image

    from .archive import os_error_text
    from .image_io import ImageLoadError, load_image
    from .labels import LABELS
    from .predict import PRECISIONS, Predictor

    ap = argparse.ArgumentParser(prog="cxr-predict", description="Classify chest X-ray files. " + predict_main.__doc__)
    add_flag(ap, "--model", required=True, help="Hub id or save_pretrained directory")
    ap.add_argument("--revision", default=None)
    ap.add_argument("--heatmap-dir", default=None, help="write a Grad-CAM overlay PNG per file here")
    ap.add_argument("--target-class", default=None, choices=LABELS, help="heatmap class (default: the predicted one)")
    ap.add_argument("--alpha", type=float, default=0.4, help="heatmap opacity in the overlay")
    ap.add_argument("--precision", default=None, choices=PRECISIONS,
                    help="compute precision (float32 reproduces the model card; bfloat16 is faster on CPUs with native "
                         "bf16); default float32, or auto (bf16 where native) with --output")
    archive = ap.add_argument_group("archive mode (--output): folders to a results table, modeling.archive")
    archive.add_argument("--output", default=None, help="results file: .parquet, .csv or .jsonl (rows written as they come)")
    archive.add_argument("--workers", type=int, default=2, help="decoding processes (0: decode in this process)")
    archive.add_argument("--batch-size", type=int, default=16, help="films per forward pass")
    archive.add_argument("--resume", action="store_true",
                         help="skip the files whose rows are already in --output or its shards (any process count); "
                              "files whose row says io_error are tried again and their row replaced")
    archive.add_argument("--no-paths", action="store_true",
                         help="leave the path column empty; the file's hash is the key (path_sha256, the relative "
                              "path's hash, for a file that cannot be read)")
    archive.add_argument("--no-progress", action="store_true", help="no progress bar (none either when not a terminal)")
    archive.add_argument("--max-side", type=int, default=None, help="films are reduced to this long side while decoding")
    archive.add_argument("--compile", action="store_true",
                         help="compile the forward pass first (TorchInductor; tens of seconds; with --batch-size 1)")
    archive.add_argument("--num-threads", type=int, default=None,
                         help="torch threads for the forward pass (default: the cores the decoding workers leave free)")
    ap.add_argument("files", nargs="+", metavar="DIR_OR_FILE")
    args = parse(ap, argv)
    if args.output:
        return _archive(args)
    if args.precision is None:
        args.precision = "float32"

    predictor = Predictor.from_pretrained(args.model, revision=args.revision, precision=args.precision)
    heat_dir = Path(args.heatmap_dir) if args.heatmap_dir else None
    if heat_dir:
        heat_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for i, name in enumerate(args.files):
        record: dict[str, Any] = {"file": name}
        try:
            gray = load_image(name)
            pred = predictor.predict_one(gray, heatmap=heat_dir is not None, target_class=args.target_class)
            record.update(pred.to_dict())
            if heat_dir is not None and not pred.out_of_scope:  # no explanation of an answer not given
                from .gradcam import overlay

                out = heat_dir / f"{i:05d}_{Path(name).stem}_gradcam_{pred.heatmap_class}.png"
                Image.fromarray(overlay(gray, pred.heatmap, alpha=args.alpha)).save(out)
                record["heatmap_file"] = str(out)
        except (ImageLoadError, OSError) as exc:  # the message names no path: "file" holds the one given
            failed += 1
            message = exc.detail if isinstance(exc, ImageLoadError) else os_error_text(exc)
            record["error"] = {"reason": getattr(exc, "reason", "io_error"), "message": message}
        print(json.dumps(record), flush=True)
    if failed:
        print(f"{failed} of {len(args.files)} file(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


def _archive(args: argparse.Namespace) -> int:
    from .archive import ArchiveConfig, output_format, predict_archive

    try:
        output_format(args.output)
    except ValueError as exc:
        print(f"cxr-predict: {exc}", file=sys.stderr)
        return 2
    import signal

    # SIGTERM (SLURM's time limit, a Kubernetes stop, `timeout`) ends the run like Ctrl-C: the rows so
    # far are kept in a valid file and --resume continues
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cfg = ArchiveConfig(inputs=args.files, output=args.output, model=args.model, revision=args.revision,
                        workers=args.workers, batch_size=args.batch_size, resume=args.resume, paths=not args.no_paths,
                        progress=False if args.no_progress else None, precision=args.precision or "auto",
                        max_side=args.max_side or ArchiveConfig.max_side, threads=args.num_threads,
                        compile=args.compile)
    try:
        summary = predict_archive(cfg)
    except KeyboardInterrupt as stop:
        done = stop.args[0] if stop.args else None
        print(f"interrupted: {done.written if done else 'the'} rows written to {args.output} are kept; run again with "
              "--resume to continue", file=sys.stderr)
        return 130
    print(json.dumps(summary.to_dict()), flush=True)
    return 0


# ---- calibrate ----------------------------------------------------------------------------------------

def calibrate_main(argv: list[str] | None = None) -> int:
    """Fit temperature and pneumonia threshold on validation; save a calibrated copy."""
    from .evaluate import calibrate_saved

    ap = argparse.ArgumentParser(prog="cxr-calibrate", description=calibrate_main.__doc__)
    add_flag(ap, "--model", required=True, help="uncalibrated save_pretrained folder (train.py checkpoints/best)")
    add_flag(ap, "--dataset", required=True, help="dataset directory (dataset_scripts.build) or Hub id")
    add_flag(ap, "--output-dir", required=True)
    ap.add_argument("--crop-pct", type=float, default=None, help="set the processor's evaluation centre crop first")
    ap.add_argument("--target-sensitivity", type=float, default=0.985)
    ap.add_argument("--battery", action="store_true",
                    help="fit under the robustness battery (release v4's rule): the temperature on the pooled plain + "
                         "battery logits, the threshold keeping --target-sensitivity plain and "
                         "--condition-sensitivity under every condition")
    ap.add_argument("--condition-sensitivity", type=float, default=0.97)
    ap.add_argument("--battery-logits", default=None,
                    help="with --battery: reuse these logits (benchmarks/recipes.py score's .npz of this model)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = parse(ap, argv)
    _threads(args.threads)
    cal = calibrate_saved(args.model, args.dataset, args.output_dir, crop_pct=args.crop_pct,
                          target_sensitivity=args.target_sensitivity, batch_size=args.batch_size,
                          progress=not args.no_progress, battery=args.battery, battery_logits=args.battery_logits,
                          condition_sensitivity=args.condition_sensitivity)
    print(json.dumps(asdict(cal), indent=2))
    return 0


# ---- export -------------------------------------------------------------------------------------------

def export_main(argv: list[str] | None = None) -> int:
    """Write release weights (float16 on disk, float32 compute), checked on validation images. With
    --onnx: write onnx/ (model.onnx, model_quantized.onnx, browser.json, gate.bin) beside a released model's
    weights instead (modeling.onnx_export), each variant checked against the PyTorch model; with
    --push-to-hub REPO, then upload it to that model repo's onnx/ folder."""
    from .export import WEIGHT_DTYPES, export_model

    ap = argparse.ArgumentParser(prog="cxr-export", description=export_main.__doc__)
    add_flag(ap, "--model", required=True, help="calibrated save_pretrained folder (train.py output; with --onnx: "
                                                 "the released folder, e.g. space/model)")
    add_flag(ap, "--output-dir", default=None, help="where the release goes (with --onnx: default MODEL/onnx)")
    ap.add_argument("--weights-dtype", default="float16", choices=sorted(WEIGHT_DTYPES))
    add_flag(ap, "--dataset", old=("--check-dataset",), default=None,
             help="dataset whose --check-split images measure the rounding")
    ap.add_argument("--check-split", default="validation")
    ap.add_argument("--check-images", default=None, help="with --onnx and no --dataset: a folder of films to check on")
    ap.add_argument("--onnx", action="store_true", help="export ONNX variants for onnxruntime and the browser")
    ap.add_argument("--variants", default="float32,int8", help="with --onnx: float32 plus any of int8, float16")
    ap.add_argument("--report", default=None, help="with --onnx: also write the agreement summary to this JSON file")
    ap.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                    help="with --onnx: then upload the export to the Hub model repo's onnx/ folder (one commit)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = parse(ap, argv)
    images = None
    if args.dataset:
        from .data import load_cxr_dataset, require_split

        if args.check_split == "test":
            ap.error("check the export on validation: the official test split is for the one evaluation")
        images = require_split(load_cxr_dataset(args.dataset), args.check_split)["image"]
    if args.onnx:
        from .archive import find_films
        from .image_io import load_image
        from .onnx_export import export_onnx

        if images is None:
            if not args.check_images:
                ap.error("--onnx needs films to check the variants on: --dataset D (its validation split) or --check-images DIR")
            images = [load_image(s.path) for s in find_films([args.check_images])]
        summary = export_onnx(args.model, check_images=list(images), variants=args.variants.split(","),
                              output_dir=args.output_dir, overwrite=args.overwrite)
        if args.push_to_hub:
            from .onnx_export import push_onnx

            try:
                summary["hub_commit"] = push_onnx(summary["output_dir"], args.push_to_hub,
                                                  weights=Path(args.model) / "model.safetensors")
            except ValueError as exc:
                print(f"cxr-export: not pushed: {exc}", file=sys.stderr)
                return 2
        if args.report:
            Path(args.report).write_text(json.dumps({**summary, "command": "cxr-export " + " ".join(argv or sys.argv[1:])},
                                                    indent=2) + "\n")
        print(json.dumps(summary, indent=2))
        return 0
    if args.push_to_hub:
        ap.error("--push-to-hub uploads an ONNX export: use it with --onnx")
    if not args.output_dir:
        ap.error("the following arguments are required: --output-dir")
    print(json.dumps(export_model(args.model, args.output_dir, weights_dtype=args.weights_dtype,
                                  check_images=images, overwrite=args.overwrite), indent=2))
    return 0


# ---- robustness ---------------------------------------------------------------------------------------

def robustness_main(argv: list[str] | None = None) -> int:
    """Score a model on validation and under the fixed robustness battery."""
    import numpy as np

    from .robustness import battery_description, evaluate_robustness, format_report

    ap = argparse.ArgumentParser(prog="cxr-robustness", description=robustness_main.__doc__)
    add_flag(ap, "--model", required=True, help="save_pretrained folder or Hub id")
    add_flag(ap, "--dataset", required=True, help="dataset directory (dataset_scripts.build) or Hub id")
    add_flag(ap, "--output-dir", required=True, help="robustness.json and logits.npz go here")
    ap.add_argument("--split", default="validation", help="any split but test")
    ap.add_argument("--precision", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = parse(ap, argv)
    _threads(args.threads)
    report, logits = evaluate_robustness(args.model, args.dataset, split=args.split, precision=args.precision,
                                         batch_size=args.batch_size, progress=not args.no_progress)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps({**report, "battery": battery_description()}, indent=2) + "\n")
    np.savez_compressed(out / "logits.npz", **logits)
    print(format_report(report))
    return 0


# ---- gate ---------------------------------------------------------------------------------------------

def gate_main(argv: list[str] | None = None) -> int:
    """Fit the learned input gate of a saved model and save it beside the weights (input_gate.npz)."""
    from .gate import GATE_FILE, fit_for_model

    ap = argparse.ArgumentParser(prog="cxr-gate", description=gate_main.__doc__)
    add_flag(ap, "--model", required=True, help="save_pretrained folder; input_gate.npz is written into it")
    add_flag(ap, "--dataset", required=True)
    ap.add_argument("--n-fit", type=int, default=1500, help="training films used (stratified)")
    ap.add_argument("--false-refusal", type=float, default=0.005,
                    help="false-refusal rate of the limits on validation (caution) and on validation under the "
                         "robustness battery (refusal)")
    ap.add_argument("--no-battery", action="store_true",
                    help="refusal limit from plain validation only (faster; refuses more real films from other sites)")
    ap.add_argument("--refusal-margin", type=float, default=1.25,
                    help="refuse only beyond this multiple of the farthest real film's distance (training, validation, "
                         "validation under the battery): distance alone earns a caution; 0 = the quantile limits")
    add_flag(ap, "--output", old=("--report",), default=None, help="write the validation numbers here (JSON)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = parse(ap, argv)
    _threads(args.threads)
    gate, report = fit_for_model(args.model, args.dataset, n_fit=args.n_fit, false_refusal=args.false_refusal,
                                 battery=not args.no_battery, progress=not args.no_progress,
                                 refusal_margin=args.refusal_margin or None)
    gate.save(Path(args.model) / GATE_FILE)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


# ---- scope --------------------------------------------------------------------------------------------

def scope_main(argv: list[str] | None = None) -> int:
    """Fit the scope check of a saved model (pediatric training films against out-of-scope films, e.g.
    adults) and save it beside the weights (scope_check.npz)."""
    from .scope import SCOPE_FILE, fit_for_model

    ap = argparse.ArgumentParser(prog="cxr-scope", description=scope_main.__doc__)
    add_flag(ap, "--model", required=True, help="save_pretrained folder; scope_check.npz is written into it")
    add_flag(ap, "--dataset", required=True, help="the in-scope dataset (cxr-build's folder): train and validation")
    ap.add_argument("--out-of-scope", required=True,
                    help="a folder of out-of-scope films named <patient>_<n>.ext (../shared/data/nih-chestxray14-sample), "
                         "split by patient into fit / validation / held-out; the held-out part is never read")
    ap.add_argument("--n-fit", type=int, default=1500, help="training films used (stratified)")
    ap.add_argument("--flag-rate", type=float, default=0.01, help="share of in-scope validation films flagged at the limit")
    ap.add_argument("--battery", action="store_true", help="the limit flags at most --flag-rate of the validation films "
                    "under every robustness battery condition too (tone, noise, geometry), not only plain")
    add_flag(ap, "--output", default=None, help="write the validation numbers here (JSON)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = parse(ap, argv)
    _threads(args.threads)
    check, report = fit_for_model(args.model, args.dataset, args.out_of_scope, n_fit=args.n_fit,
                                  flag_rate=args.flag_rate, progress=not args.no_progress, battery=args.battery)
    check.save(Path(args.model) / SCOPE_FILE)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


COMMANDS = {"evaluate": evaluate_main, "predict": predict_main, "calibrate": calibrate_main, "export": export_main,
            "robustness": robustness_main, "gate": gate_main, "scope": scope_main}


def main(argv: list[str] | None = None) -> int:
    """``python -m modeling COMMAND [args]``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m modeling {" + ",".join(COMMANDS) + "} [args]   (or cxr-COMMAND)", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
