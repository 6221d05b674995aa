"""Render the dataset card (``README.md``) from the build report, so the card can only say what the
build measured."""

from __future__ import annotations

import yaml

from modeling.labels import LABELS

_LICENSE_NAMES = {"cc-by-4.0": "CC BY 4.0", "cc0-1.0": "CC0 1.0", "mit": "MIT", "apache-2.0": "Apache-2.0",
                  "mixed": "mixed (per image)",
                  "unknown": "unknown (no licence file found: check before redistributing)"}


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return name
    return "100K<n<1M"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


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
            + _table(["contribution", "contributor", "licence", "images", "by label", "train", "validation",
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

    body = f"""
# Pediatric chest X-ray pneumonia: merged, deduplicated, patient-grouped

Chest X-rays labelled **normal**, **bacterial pneumonia** or **viral pneumonia**, merged from public
sources so that no image or patient of the official Kermany test split leaks into training or
validation. Built by `dataset_scripts.build` ({report['created_at']}); every number on this card comes
from `build_report.json` of the same build.

**Not for clinical use.** Research and education only.
{_reproduce(report)}
## Use

```python
from datasets import load_dataset
ds = load_dataset("{repo_id or 'REPO_ID'}")
ds["train"].features["label"].names  # {list(LABELS)}
```

Columns: `image`, `label` ({", ".join(LABELS)}), `source`, `source_path` (path in the original
source), `patient_id` (`kermany:personN` / `kermany:IM-NNNN`; `SOURCE:unknown-HASH` when the source
gives none), `official_split` (Kermany's own split), `license`, `image_sha256` (SHA-256 of the decoded
8-bit pixels), `phash` (256-bit perceptual hash, hex).

## Splits

{_table(["split", "images", *LABELS, "patient groups", "by source"], split_rows)}

{_test_line(report)}
- `validation` is a patient-grouped, label-stratified share ({report['validation_share']:.1%} of the
  images, seed {report['parameters']['seed']}) of everything else{_val_note(report)}. No patient group is
  in two splits.

## Sources

{_table(["source", "reader", "licence", "images", "by label", "files ignored"], source_rows)}
{_exclusions(excl)}

{_contributions(report)}
## Deduplication

- Exact duplicates: same SHA-256 of the decoded 8-bit grayscale pixels (re-saved, renamed or
  RGB-vs-gray copies). Links found: {dd['exact_duplicate_links']}.
- Near duplicates: `imagehash.phash(hash_size=16)` (256 bits) within **{ts['threshold_bits']} bits**, also
  comparing the mirror image and +-2..10 degree rotations, so resized, re-encoded, flipped and slightly
  rotated copies match. Pairs found: {dd['near_duplicate_pairs']}; clusters with copies:
  {dd['clusters_with_copies']}.
- Policy: (1) the test split is untouched; (2) everything in a cluster with a test image leaves
  train/validation; (3) clusters whose copies disagree on the label are dropped whole; (4) otherwise a
  cluster keeps one image, preferring the official (Kermany) source. A pool image whose *patient*
  has an image in the test split is dropped as well.

{_table(["source", "why dropped", "images"], drop_rows)}

Label conflicts ({len(conflicts)}):

{conflict_lines}

### Threshold and false-match rate (measured on this build)

Images of *different* Kermany patients are distinct images; any pair of them within the threshold
would be a false match. Of {ts['different_kermany_patient_pairs']:,} Kermany pairs,
**{ts['different_patient_pairs_within_threshold']}** different-patient pairs fall within
{ts['threshold_bits']} bits (false-match rate {'n/a' if rate is None else f'{rate:.2e}'}); the closest
different-patient pair is {closest if closest is not None else '> ' + str(limit)} bits apart (identical-pixel
pairs filed under two patient ids are true duplicates and excluded from this count).
Cross-source pairs (re-published copies) within the threshold: {cross_within}.
Distance histogram of different-patient pairs up to {limit} bits: `{hist}`.

## Leak check

Recomputed from the fingerprints of the final splits, apart from the merge policy (the test suite
re-checks the saved dataset with `imagehash` directly):

- near duplicates between train/validation and test: **{lc['near_duplicates_train_or_validation_vs_test']}**
- near-duplicate pairs left inside train + validation (an image counted twice):
  **{lc['near_duplicate_pairs_within_train_and_validation']}**
- exact duplicates between train/validation and test: **{lc['exact_duplicates_train_or_validation_vs_test']}**
- patients in more than one split: **{lc['patients_in_more_than_one_split']}**
- result: **{'passed' if lc['passed'] else 'FAILED'}**

{_kermany_patient_note(report)}

## Unreadable files

{report['files']['unreadable']} of {report['files']['listed']} listed files could not be decoded and were
skipped: {unread or 'none'}. {len(report['reencoded'])} kept files needed conversion by the loader
(16-bit, palette, CMYK, alpha, EXIF rotation, DICOM, TIFF) and are stored as its 8-bit grayscale PNG;
the others are stored byte for byte. All are listed in `build_report.json`.

## Class balance and known biases

- Classes are imbalanced (see the split table): use class weights or a balanced sampler.
- Kermany images are **pediatric** (ages 1-5, Guangzhou Women and Children's Medical Center); the
  copies in the shared sources are 224x224, resized without keeping the aspect ratio. COVID-19 images (Skytells, from the ieee8023
  covid-chestxray-dataset) are **adult**, often figures from papers, with different devices, markers
  and framing: a model can learn "adult film -> viral". They carry no patient id, so two films of one
  COVID patient can fall in train and validation (never in test, which is Kermany only).
- Bacterial vs viral labels come from the original annotation and are known to be noisy.
- The test split holds {report['test_exact_duplicate_groups']} groups of exact duplicates within itself (kept: the
  official split is the benchmark; report numbers with and without them).

## Citation

Kermany, Zhang, Goldbaum (2018), *Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images for
Classification*, Mendeley Data, doi:10.17632/rscbjbr9sj.2 (CC BY 4.0). Skytells COVID-19 X-ray dataset
(MIT); COVID-19 images from Cohen et al., covid-chestxray-dataset.
"""
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body
