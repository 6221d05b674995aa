"""Build the merged, deduplicated, patient-grouped dataset.

    python -m dataset_scripts.build \\
        --source kermany:../shared/data/kermany \\
        --source folders:../shared/data/skytells-covid19-xray --exclude 'TrainData/*' \\
        --out data/cxr-pneumonia [--push-to-hub USER/cxr-pneumonia]

Output ``DIR``: ``datasets.load_from_disk(DIR)`` -> ``DatasetDict(train, validation, test)``,
``DIR/README.md`` (dataset card) and ``DIR/build_report.json`` (the same numbers, machine-readable).

Steps: read sources (no decoding) -> fingerprint every file (cached) -> exact/near duplicate clusters
-> merge policy -> patient groups -> validation split -> leak check -> write. Unreadable files are
reported and skipped; nothing good is dropped without a line in the report.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from modeling.labels import LABELS

from . import dedup
from .card import render_card
from .fingerprint import Fingerprint, FingerprintCache, encode_png, fingerprint_paths
from .sources import Record, SourceError, read_source
from .splits import patient_groups, validation_split

SPLITS = ("train", "validation", "test")
STUDY_THRESHOLD = 48  # pairs up to this distance are kept for the threshold study in the report


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cxr-pneumonia"


@dataclass
class BuildConfig:
    sources: list[str]
    out: Path
    exclude: list[str] = field(default_factory=list)
    val_fraction: float = 0.15
    seed: int = 42
    near_threshold: int = dedup.DEFAULT_NEAR_THRESHOLD
    cache_dir: Path | None = None  # None: no cache
    workers: int = 2
    progress: bool = True
    command: str = ""  # how it was invoked, for the report


@dataclass
class BuildResult:
    records: list[Record]
    fingerprints: list[Fingerprint]
    split_of: dict[int, str]  # record index -> split, for the kept records
    report: dict


_ref = dedup.record_ref


def _patient_or_unknown(r: Record, fp: Fingerprint) -> str:
    return r.patient_id or f"{r.source}:unknown-{fp.pixel_sha256[:12]}"


def plan(cfg: BuildConfig) -> BuildResult:
    """Everything but writing: decide which image goes to which split, and why."""
    t0 = time.perf_counter()
    timing = {}
    records: list[Record] = []
    sources_report, ignored = [], []
    for spec in cfg.sources:
        listing = read_source(spec, cfg.exclude)
        if not listing.records:
            raise SourceError(f"--source {spec}: no image files found (after --exclude)")
        records.extend(listing.records)
        ignored.extend({"source": spec, **x} for x in listing.ignored)
        first = listing.records[0] if listing.records else None
        licenses = sorted({r.license for r in listing.records})
        sources_report.append({
            "spec": spec, "name": first.source if first else "", "kind": spec.split(":", 1)[0],
            "license": licenses[0] if len(licenses) == 1 else "mixed", "licenses": licenses,
            "files": len(listing.records),
            "by_label": dict(Counter(r.label for r in listing.records)),
            "ignored": len(listing.ignored),
        })
    timing["list_s"] = time.perf_counter() - t0

    cache = FingerprintCache(cfg.cache_dir / "fingerprints.sqlite") if cfg.cache_dir else None
    try:
        fp_by_path, hash_stats = fingerprint_paths([r.path for r in records], cache, cfg.workers, cfg.progress)
    finally:
        if cache:
            cache.close()
    timing["fingerprint_s"] = time.perf_counter() - t0 - timing["list_s"]

    unreadable = []
    good_idx = []
    for i, r in enumerate(records):
        fp = fp_by_path[r.path]
        if fp.ok:
            good_idx.append(i)
        else:
            unreadable.append({"image": _ref(r), "reason": fp.error_reason, "message": fp.error_message})
    recs = [records[i] for i in good_idx]
    fps = [fp_by_path[r.path] for r in recs]
    if not recs:
        raise SourceError(f"none of the {len(records)} listed files could be decoded "
                          f"({dict(Counter(u['reason'] for u in unreadable))})")

    t1 = time.perf_counter()
    study_pairs = dedup.near_pairs(fps, max(STUDY_THRESHOLD, cfg.near_threshold))
    clusters, pairs, exact_links = dedup.duplicate_clusters(fps, cfg.near_threshold, study_pairs)
    decisions, conflicts = dedup.resolve_clusters(recs, fps, clusters, [s["name"] for s in sources_report])
    timing["dedup_s"] = time.perf_counter() - t1

    # Patients: a pool image whose patient group holds an official test image cannot be used.
    groups = patient_groups(recs, clusters)
    test_groups = {groups[i] for i, r in enumerate(recs) if r.is_official_test}
    for i, r in enumerate(recs):
        if not r.is_official_test and decisions[i].keep and groups[i] in test_groups:
            decisions[i] = dedup.Decision(False, "same patient as an official test image")

    split_of: dict[int, str] = {}
    pool = []
    for i, r in enumerate(recs):
        if not decisions[i].keep:
            continue
        if r.is_official_test:
            split_of[i] = "test"
        else:
            pool.append(i)
    try:
        val = validation_split(pool, [r.label for r in recs], groups, cfg.val_fraction, cfg.seed)
    except ValueError as e:
        raise SourceError(str(e)) from e
    for i in pool:
        split_of[i] = "validation" if i in val else "train"

    report = _report(cfg, recs, fps, decisions, conflicts, clusters, pairs, study_pairs, exact_links,
                     groups, split_of, sources_report, ignored, unreadable, hash_stats)
    timing["total_plan_s"] = time.perf_counter() - t0
    report["timing"] = {k: round(v, 2) for k, v in timing.items()}
    return BuildResult(recs, fps, split_of, report)


def leak_check(recs: list[Record], fps: list[Fingerprint], split_of: dict[int, str], threshold: int) -> dict:
    """Independent of the policy code path: recompute, on the final splits only, every near/exact
    duplicate between train+validation and test, every pair of copies left inside train+validation
    (e.g. a Kermany image counted twice because another source re-published it), and every patient
    id found in two splits."""
    test = [i for i, s in split_of.items() if s == "test"]
    pool = [i for i, s in split_of.items() if s != "test"]
    n_pool = len(pool)
    found = dedup.near_pairs([fps[i] for i in pool + test], threshold)
    near = sum(1 for a, b in found if (a < n_pool) != (b < n_pool))
    pool_pairs = sum(1 for a, b in found if a < n_pool and b < n_pool)
    pix_test = {fps[i].pixel_sha256 for i in test}
    exact = sum(1 for i in pool if fps[i].pixel_sha256 in pix_test)
    patients: dict[str, set] = {}
    for i, s in split_of.items():
        patients.setdefault(_patient_or_unknown(recs[i], fps[i]), set()).add(s)
    shared = sorted(p for p, ss in patients.items() if len(ss) > 1)
    return {
        "near_duplicates_train_or_validation_vs_test": near,
        "exact_duplicates_train_or_validation_vs_test": exact,
        "near_duplicate_pairs_within_train_and_validation": pool_pairs,
        "patients_in_more_than_one_split": len(shared),
        "examples": shared[:10],
        "passed": near == 0 and exact == 0 and pool_pairs == 0 and not shared,
    }


def _report(cfg, recs, fps, decisions, conflicts, clusters, pairs, study_pairs, exact_links, groups,
            split_of, sources_report, ignored, unreadable, hash_stats) -> dict:
    dropped = [{"image": _ref(recs[i]), "reason": d.reason, "duplicate_of": d.duplicate_of}
               for i, d in enumerate(decisions) if not d.keep]
    dropped_by = Counter((recs[i].source, d.reason) for i, d in enumerate(decisions) if not d.keep)
    n_val = sum(1 for x in split_of.values() if x == "validation")
    n_pool = sum(1 for x in split_of.values() if x != "test")
    splits = {}
    for s in SPLITS:
        idx = [i for i, x in split_of.items() if x == s]
        splits[s] = {
            "images": len(idx),
            "by_label": {lab: sum(recs[i].label == lab for i in idx) for lab in LABELS},
            "by_source": dict(Counter(recs[i].source for i in idx)),
            "patient_groups": len({groups[i] for i in idx}),
        }
    # Threshold study: distances between images of *different* Kermany patients (should be far) and
    # between cross-source pairs (re-published copies, should be near).
    diff_patient, cross_source = Counter(), Counter()
    for (a, b), d in study_pairs.items():
        ra, rb = recs[a], recs[b]
        if d == 0 and fps[a].pixel_sha256 == fps[b].pixel_sha256:
            continue  # identical pixels: a true duplicate, not a hash question
        if ra.source_kind == rb.source_kind == "kermany" and ra.patient_id != rb.patient_id:
            diff_patient[d] += 1
        elif ra.source != rb.source:
            cross_source[d] += 1
    n_k = sum(r.source_kind == "kermany" for r in recs)
    per_patient = Counter(r.patient_id for r in recs if r.source_kind == "kermany")
    kermany_pairs = n_k * (n_k - 1) // 2 - sum(c * (c - 1) // 2 for c in per_patient.values())
    false_at_t = sum(c for d, c in diff_patient.items() if d <= cfg.near_threshold)
    sizes = Counter(len(c) for c in clusters)
    reencoded = [{"image": _ref(recs[i]), "format": fps[i].format, "mode": fps[i].mode, "notes": fps[i].converted}
                 for i in split_of if fps[i].needs_reencode]
    leak = leak_check(recs, fps, split_of, cfg.near_threshold)
    return {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": cfg.command,
        "parameters": {"sources": cfg.sources, "exclude": cfg.exclude, "val_fraction": cfg.val_fraction,
                       "seed": cfg.seed, "near_threshold_bits": cfg.near_threshold,
                       "hash": "imagehash.phash hash_size=16 (256 bits), +mirror, +-2..10 deg rotations"},
        "sources": sources_report,
        "files": {"listed": len(recs) + len(unreadable), "readable": len(recs), "unreadable": len(unreadable),
                  "ignored_by_readers": len(ignored), "fingerprints_from_cache": hash_stats["from_cache"],
                  "fingerprints_computed": hash_stats["computed"]},
        "unreadable_by_reason": dict(Counter(u["reason"] for u in unreadable)),
        "unreadable": unreadable,
        "ignored": ignored,
        "reencoded": reencoded,
        "dedup": {
            "exact_duplicate_links": exact_links,
            "near_duplicate_pairs": len(pairs),
            "clusters_with_copies": sum(c for s, c in sizes.items() if s > 1),
            "cluster_sizes": {str(k): v for k, v in sorted(sizes.items())},
            "dropped_total": len(dropped),
            "dropped_by_source_and_reason": [{"source": s, "reason": r, "images": n}
                                             for (s, r), n in sorted(dropped_by.items())],
            "label_conflicts": conflicts,
        },
        "threshold_study": {
            "threshold_bits": cfg.near_threshold,
            "study_limit_bits": max(STUDY_THRESHOLD, cfg.near_threshold),
            "different_kermany_patient_pairs": kermany_pairs,
            "different_patient_pairs_within_threshold": false_at_t,
            "false_match_rate": (false_at_t / kermany_pairs) if kermany_pairs else None,
            "different_patient_distance_histogram": {str(k): v for k, v in sorted(diff_patient.items())},
            "cross_source_distance_histogram": {str(k): v for k, v in sorted(cross_source.items())},
        },
        "splits": splits,
        "validation_share": round(n_val / n_pool, 4) if n_pool else 0.0,
        "kermany_official_val_images": sum(1 for i, x in split_of.items()
                                           if x != "test" and recs[i].official_split == "val"),
        "has_kermany": any(r.source_kind == "kermany" for r in recs),
        "test_exact_duplicate_groups": sum(1 for c in Counter(fps[i].pixel_sha256 for i, x in split_of.items()
                                                              if x == "test").values() if c > 1),
        "leak_check": leak,
        "contributions": _contributions_report(recs, decisions, split_of, unreadable),
        "dropped": dropped,
    }


def _contributions_report(recs, decisions, split_of, unreadable) -> list[dict]:
    """One entry per merged contribution (``contributions:`` source): who, which licence, and what
    became of its images, for the dataset card."""
    out: dict[str, dict] = {}
    for i, r in enumerate(recs):
        cid = r.extra.get("contribution")
        if not cid:
            continue
        c = out.setdefault(cid, {"id": cid, "contributors": set(), "licenses": set(), "images": 0,
                                 "by_label": Counter(), "train": 0, "validation": 0, "dropped": 0,
                                 "unreadable": 0})
        c["images"] += 1
        c["by_label"][r.label] += 1
        c["licenses"].add(r.license)
        if r.contributor:
            c["contributors"].add(r.contributor)
        if not decisions[i].keep:
            c["dropped"] += 1
        elif split_of.get(i) in ("train", "validation"):
            c[split_of[i]] += 1
    for u in unreadable:
        src = u["image"].split(":", 1)[0]
        if src.startswith("contrib-") and src[len("contrib-"):] in out:
            out[src[len("contrib-"):]]["unreadable"] += 1
    return [{**c, "contributors": sorted(c["contributors"]), "licenses": sorted(c["licenses"]),
             "by_label": dict(c["by_label"])} for _, c in sorted(out.items())]


def to_dataset_dict(result: BuildResult):
    """The kept records as a ``datasets.DatasetDict``. File bytes are stored as they are (no
    re-encoding loss) unless the loader had to convert them (16-bit, CMYK, palette, DICOM...), in
    which case the loader's 8-bit PNG is stored, so ``image`` always decodes to what we trained on."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

    features = Features({
        "image": Image(),
        "label": ClassLabel(names=list(LABELS)),
        "source": Value("string"),
        "source_path": Value("string"),
        "patient_id": Value("string"),
        "official_split": Value("string"),
        "license": Value("string"),
        "image_sha256": Value("string"),
        "phash": Value("string"),
    })
    columns = {s: {k: [] for k in features} for s in SPLITS}
    order = sorted(result.split_of, key=lambda i: (result.records[i].source, result.records[i].source_path))
    for i in order:
        r, fp, s = result.records[i], result.fingerprints[i], result.split_of[i]
        data = r.path.read_bytes()
        name = Path(r.source_path).name
        if fp.needs_reencode:
            data, name = encode_png(data), Path(r.source_path).stem + ".png"
        c = columns[s]
        c["image"].append({"bytes": data, "path": name})
        c["label"].append(r.label)
        c["source"].append(r.source)
        c["source_path"].append(r.source_path)
        c["patient_id"].append(_patient_or_unknown(r, fp))
        c["official_split"].append(r.official_split or "")
        c["license"].append(r.license)
        c["image_sha256"].append(fp.pixel_sha256)
        c["phash"].append(fp.phash)
    return DatasetDict({s: Dataset.from_dict(columns[s], features=features, split=s) for s in SPLITS})


def write(result: BuildResult, out: Path) -> None:
    """The dataset itself; :func:`build` adds the report and card once the timing is known."""
    out.mkdir(parents=True, exist_ok=True)
    dsd = to_dataset_dict(result)
    dsd.save_to_disk(str(out))


def push_to_hub(out: Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Publish the built dataset: card first, then the parquet shards through ``datasets`` (which
    merges ``dataset_info``/``configs`` into the card's YAML), then the build report."""
    from datasets import load_from_disk
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_file(path_or_fileobj=str(out / "README.md"), path_in_repo="README.md", repo_id=repo_id,
                    repo_type="dataset", commit_message="Dataset card")
    load_from_disk(str(out)).push_to_hub(repo_id, token=token, private=private,
                                         commit_message="Dataset splits from dataset_scripts.build")
    api.upload_file(path_or_fileobj=str(out / "build_report.json"), path_in_repo="build_report.json",
                    repo_id=repo_id, repo_type="dataset", commit_message="Build report")
    return f"{api.endpoint}/datasets/{repo_id}"


def build(cfg: BuildConfig) -> BuildResult:
    t0 = time.perf_counter()
    result = plan(cfg)
    write(result, cfg.out)
    result.report["timing"]["total_s"] = round(time.perf_counter() - t0, 2)
    (cfg.out / "build_report.json").write_text(json.dumps(result.report, indent=2))
    (cfg.out / "README.md").write_text(render_card(result.report))
    return result


def main(argv: list[str] | None = None) -> int:
    from modeling.cli import add_flag, parse

    ap = argparse.ArgumentParser(prog="cxr-build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", action="append", required=True, metavar="KIND:PATH",
                    help="kermany:PATH, folders:PATH, manifest:CSV or contributions:DIR_OR_REPO_ID "
                         "(merged contributions; repeatable; order = preference)")
    add_flag(ap, "--output-dir", old=("--out",), required=True, type=Path, help="output folder (save_to_disk)")
    ap.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                    help="skip files whose path relative to their source matches, e.g. 'TrainData/*' "
                         "for pre-augmented copies (repeatable)")
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--near-threshold", type=int, default=dedup.DEFAULT_NEAR_THRESHOLD,
                    help="max Hamming distance (of 256 bits) for a near duplicate")
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                    help="fingerprint cache folder (default: %(default)s)")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--push-to-hub", metavar="REPO_ID", help="publish dataset + card as a Hub dataset")
    ap.add_argument("--private", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = parse(ap, argv)
    if not 0 < args.val_fraction <= 0.5:
        ap.error("--val-fraction must be in (0, 0.5]")

    cfg = BuildConfig(sources=args.source, out=args.output_dir, exclude=args.exclude, val_fraction=args.val_fraction,
                      seed=args.seed, near_threshold=args.near_threshold,
                      cache_dir=None if args.no_cache else args.cache_dir, workers=args.workers,
                      progress=not args.no_progress,
                      command="cxr-build " + shlex.join(argv if argv is not None else sys.argv[1:]))
    try:
        result = build(cfg)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rep = result.report
    print(f"\nwrote {cfg.out} in {rep['timing']['total_s']:.0f} s")
    for s in SPLITS:
        print(f"  {s:<10} {rep['splits'][s]['images']:>5} images  {rep['splits'][s]['by_label']}")
    print(f"  dropped {rep['dedup']['dropped_total']} duplicates/leaks, "
          f"{rep['files']['unreadable']} unreadable files (see build_report.json)")
    print(f"  leak check: {'passed' if rep['leak_check']['passed'] else 'FAILED'}")
    if not rep["leak_check"]["passed"]:
        print("error: leak check failed; see build_report.json (nothing pushed)", file=sys.stderr)
        return 1
    if args.push_to_hub:
        url = push_to_hub(cfg.out, args.push_to_hub, token=os.environ.get("HF_TOKEN"), private=args.private)
        print(f"  pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
