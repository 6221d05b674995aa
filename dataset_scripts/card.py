"""The dataset card (``README.md``) from the build report, so the card can only say what the build
measured: this module turns the report into the values the template shows; the text is
``modeling/templates/dataset_card.md``, rendered by the project's one card renderer
(:mod:`modeling.card`)."""

from __future__ import annotations

from modeling.card import markdown_table, render_dataset_card
from modeling.labels import LABELS

_LICENSE_NAMES = {"cc-by-4.0": "CC BY 4.0", "cc0-1.0": "CC0 1.0", "mit": "MIT", "apache-2.0": "Apache-2.0",
                  "mixed": "mixed (per image)",
                  "unknown": "unknown (no licence file found: check before redistributing)"}


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return name
    return "100K<n<1M"


def _exclusions(excl: list[str]) -> str:
    if not excl:
        return ""
    return ("Excluded by the build command: " + ", ".join(f"`{x}`" for x in excl) + ". Exclusions are for "
            "pre-augmented copies: Skytells `TrainData/` holds *augmented* copies (rotations up to ~40 "
            "degrees with zoom, shift and shear) of `NonAugmentedTrain/` (file `_{i}_*.jpeg` is an augmented "
            "`{i}.jpeg`). Augmented copies carry no new information, and no perceptual hash finds copies "
            "that heavily transformed (measured on this data: neither 256-bit phash with a rotation search "
            "nor DINOv2 embeddings recover their originals), so they are excluded at the source rather "
            "than risk an augmented copy of a test image reaching training.")


def _test_line(report: dict) -> str:
    if not report.get("has_kermany"):
        return "- `test` is empty: no `kermany` source (the official test split) was given."
    return ("- `test` is the official Kermany test split, untouched: the benchmark. Report on it; never "
            "select models, thresholds or temperatures on it.")


def _val_note(report: dict) -> str:
    n = report.get("kermany_official_val_images", 0)
    return f", including the {n} kept images of Kermany's official `val` split" if n else ""


def _kermany_patient_note(report: dict) -> str:
    dropped = sum(d["images"] for d in report["dedup"]["dropped_by_source_and_reason"]
                  if d["reason"] == "same patient as an official test image")
    if not report.get("has_kermany"):
        return ""
    return ("Note: Kermany's official train and test splits share patients (`personN` ids; the image "
            "counters are one numbering across splits), so the official *train* split is not "
            f"patient-disjoint from *test*; this build dropped {dropped} such pool images.")


def _reproduce(report: dict) -> str:
    cmd = report.get("command")
    return f"\nRebuild it with:\n\n```bash\n{cmd}\n```\n" if cmd else ""


def _contributions(report: dict) -> str:
    contribs = report.get("contributions") or []
    if not contribs:
        return ""
    rows = [[f"`{c['id']}`", ", ".join(c["contributors"]) or "-",
             ", ".join(_LICENSE_NAMES.get(x, x) for x in c["licenses"]), c["images"],
             ", ".join(f"{k} {v}" for k, v in sorted(c["by_label"].items())), c["train"], c["validation"],
             c["dropped"] + c.get("unreadable", 0)]
            for c in contribs]
    return ("\n### Contributions\n\nMerged community contributions (`contributions/<id>/` in the dataset repo, "
            "each validated by `dataset_scripts.contribute` and reviewed in a pull request; the PR "
            "description holds its validation report). They go to train/validation only, never test, "
            "after the same duplicate and leak checks as every source.\n\n"
            + markdown_table(["contribution", "contributor", "licence", "images", "by label", "train", "validation",
                      "dropped"], rows) + "\n")


def render_card(report: dict, repo_id: str | None = None) -> str:
    splits = report["splits"]
    total = sum(s["images"] for s in splits.values())
    licenses = sorted({x or "unknown" for s in report["sources"] for x in s.get("licenses", [s["license"]])})
    single = len(licenses) == 1 and licenses[0] not in ("unknown", "other")
    meta = {
        "pretty_name": "Pediatric chest X-ray pneumonia (merged, deduplicated, patient-grouped)",
        "license": licenses[0] if single else "other",
        "task_categories": ["image-classification"],
        "task_ids": ["multi-class-image-classification"],
        "tags": ["medical", "chest-x-ray", "pneumonia", "radiology", "deduplicated"],
        "size_categories": [_size_category(total)],
        "language": ["en"],
    }
    if not single:
        meta["license_name"] = "mixed" if len(licenses) > 1 else licenses[0]
        meta["license_details"] = "Per-image licence in the `license` column: " + ", ".join(
            _LICENSE_NAMES.get(x, x) for x in licenses)
    lc, dd, ts = report["leak_check"], report["dedup"], report["threshold_study"]

    split_rows = [[s, splits[s]["images"], *[splits[s]["by_label"][lab] for lab in LABELS],
                   splits[s]["patient_groups"],
                   ", ".join(f"{k} {v}" for k, v in sorted(splits[s]["by_source"].items()))]
                  for s in ("train", "validation", "test")]
    source_rows = [[f"`{s['spec']}`", s["kind"], _LICENSE_NAMES.get(s["license"], s["license"]), s["files"],
                    ", ".join(f"{k} {v}" for k, v in sorted(s["by_label"].items())), s["ignored"]]
                   for s in report["sources"]]
    drop_rows = [[d["source"], d["reason"], d["images"]] for d in dd["dropped_by_source_and_reason"]]
    unread = report["unreadable_by_reason"]
    conflicts = dd["label_conflicts"]
    conflict_lines = "\n".join(
        f"- {c['action']}: " + "; ".join(f"`{m['image']}` ({m['label']})" for m in c["members"][:6])
        + (" ..." if len(c["members"]) > 6 else "")
        for c in conflicts[:30]) or "- none"
    excl = report["parameters"]["exclude"]
    hist = ts["different_patient_distance_histogram"]
    closest = min((int(k) for k in hist), default=None)
    cross = ts["cross_source_distance_histogram"]
    cross_within = sum(v for k, v in cross.items() if int(k) <= ts["threshold_bits"])
    rate = ts["false_match_rate"]
    limit = ts.get("study_limit_bits", 48)

    return render_dataset_card(
        meta, created_at=report["created_at"], reproduce=_reproduce(report), repo_id=repo_id or "REPO_ID",
        labels_list=list(LABELS), labels_text=", ".join(LABELS),
        split_table=markdown_table(["split", "images", *LABELS, "patient groups", "by source"], split_rows),
        test_line=_test_line(report), validation_share=f"{report['validation_share']:.1%}",
        seed=report["parameters"]["seed"], val_note=_val_note(report),
        source_table=markdown_table(["source", "reader", "licence", "images", "by label", "files ignored"],
                                    source_rows),
        exclusions=_exclusions(excl), contributions=_contributions(report), dedup=dd,
        threshold_bits=ts["threshold_bits"], drop_table=markdown_table(["source", "why dropped", "images"], drop_rows),
        n_conflicts=len(conflicts), conflict_lines=conflict_lines,
        different_pairs=f"{ts['different_kermany_patient_pairs']:,}", threshold_study=ts,
        false_match_rate="n/a" if rate is None else f"{rate:.2e}",
        closest=closest if closest is not None else "> " + str(limit), cross_within=cross_within, limit=limit,
        hist=hist, leak=lc, leak_result="passed" if lc["passed"] else "FAILED",
        kermany_patient_note=_kermany_patient_note(report), files=report["files"], unreadable=unread or "none",
        n_reencoded=len(report["reencoded"]), test_exact_duplicate_groups=report["test_exact_duplicate_groups"],
    )
