"""What the scope check (modeling/scope.py) of the released model does, through the Space's own path.

    python benchmarks/scope.py [--model space/model] [--dataset data/cxr-pneumonia]
                               [--out-of-scope ../shared/data/nih-chestxray14-sample]

Every image goes through :meth:`space.service.CxrService.analyze` (the loader, the rules, the input
gate, the scope check) and is counted as refused (rules or gate), flagged (``out_of_scope``: no
label, no call) or answered; among the answered, how many get a pneumonia call at the stored
threshold.

- the held-out NIH ChestX-ray14 patients (the part ``cxr-scope`` never read), normal ("No Finding")
  and pneumonia films separately, with the scope check and, for comparison, without it;
- in-scope validation films (the limit was set on them), the official test films (only counted:
  nothing is chosen on them), the Space's pediatric examples (must never be flagged) and its adult
  DICOM example (the one that shows a visitor the scope check's answer);
- Skytells' adult COVID-19 films (adults from other hospitals; not used to fit anything);
- the 35 non-films of ``benchmarks/input_gate.py`` (photographs, screenshots, an MRI slice...): still
  refused, or at least flagged.

Writes ``benchmarks/results/scope.json`` (the README's and the card's scope table come from it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from modeling.cli import add_flag, parse
from modeling.data import load_cxr_dataset
from modeling.image_io import to_grayscale
from modeling.paths import shown_path
from modeling.predict import Predictor
from modeling.scope import IN_SCOPE_SOURCES, out_of_scope_films, patient_split
from space.service import CxrService, InputError
from space.store import FeedbackStore

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from input_gate import negatives, png  # noqa: E402  (the same 35 non-films)


def outcome(service: CxrService, data: bytes) -> str:
    try:
        a = service.analyze(data, channel="batch", heatmap=False)
    except InputError:
        return "refused"
    if a.decision == "out_of_scope":
        return "flagged"
    return "answered_pneumonia" if a.prediction.pneumonia else "answered_normal"


def count(service: CxrService, items) -> dict:
    res = [outcome(service, d) for d in items]
    n = len(res)
    answered = res.count("answered_pneumonia") + res.count("answered_normal")
    return {"n": n, "refused": res.count("refused"), "flagged": res.count("flagged"), "answered": answered,
            "pneumonia_calls_among_answered": res.count("answered_pneumonia"),
            "flagged_or_refused_rate": round((n - answered) / n, 4) if n else None,
            "pneumonia_call_rate_among_answered": round(res.count("answered_pneumonia") / answered, 4)
            if answered else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_flag(ap, "--model", default=str(ROOT / "space" / "model"))
    add_flag(ap, "--dataset", default=str(ROOT / "data" / "cxr-pneumonia"))
    ap.add_argument("--out-of-scope", default=str(SHARED / "data" / "nih-chestxray14-sample"))
    add_flag(ap, "--output", default=str(ROOT / "benchmarks" / "results" / "scope.json"))
    ap.add_argument("--threads", type=int, default=2)
    args = parse(ap, argv)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    predictor = Predictor.from_pretrained(args.model, precision="auto")
    if predictor.scope is None:
        raise SystemExit(f"{args.model} has no scope check (fit it with cxr-scope)")
    ds = load_cxr_dataset(args.dataset)
    held = patient_split(out_of_scope_films(args.out_of_scope))["held_out"]
    results: dict = {"model": shown_path(args.model), "model_revision": predictor.revision,
                     "scope": predictor.scope.meta, "limit": predictor.scope.limit,
                     "out_of_scope_source": shown_path(args.out_of_scope)}
    with tempfile.TemporaryDirectory() as tmp:
        service = CxrService(predictor, FeedbackStore(Path(tmp) / "store"))
        for kind in sorted({p.parent.name for p in held}):
            files = [p for p in held if p.parent.name == kind]
            results[f"nih_held_out_{kind}"] = count(service, (p.read_bytes() for p in files))
        scope = predictor.scope
        predictor.scope = None  # the same films without the scope check (what the Space did before it)
        for kind in sorted({p.parent.name for p in held}):
            files = [p for p in held if p.parent.name == kind]
            results[f"nih_held_out_{kind}_without_scope_check"] = count(service, (p.read_bytes() for p in files))
        predictor.scope = scope
        for key, split in (("validation", "validation"), ("test_counted_only", "test")):  # the pediatric films only
            rows = ds[split].filter(lambda src: src in IN_SCOPE_SOURCES, input_columns="source")
            results[key] = count(service, (png(to_grayscale(r["image"])) for r in rows))
        examples = sorted((ROOT / "space" / "examples").glob("kermany_*"))  # pediatric: never to be flagged
        results["space_examples"] = count(service, (p.read_bytes() for p in examples))
        adult = sorted((ROOT / "space" / "examples").glob("*.dcm"))  # the adult DICOM example (its NOTICE)
        results["space_example_adult_dicom"] = count(service, (p.read_bytes() for p in adult))
        covid = sorted((SHARED / "data" / "skytells-covid19-xray" / "NonAugmentedTrain" / "COVID-19").glob("*"))
        if covid:
            results["skytells_covid19_adult"] = count(service, (p.read_bytes() for p in covid))
        neg = [d for items in negatives().values() for d in items]
        results["non_films"] = count(service, neg)
    for k, v in results.items():
        if isinstance(v, dict) and "n" in v:
            print(f"{k:44s} {v}")
    results["seconds"] = round(time.time() - t0, 1)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
