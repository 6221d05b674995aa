"""``validate``: check a submission folder and write its cleaned copy."""

from __future__ import annotations


import hashlib
import json
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from modeling import image_io
from modeling.image_io import ImageLoadError, load_image_with_info, save_pixels_png
from modeling.labels import LABELS, parse_label
from modeling.manifest import MANIFEST_COLUMNS, ManifestError, read_manifest_rows, write_manifest
from modeling.dicom import identifying_tags as dicom_identifying_tags

from .. import dedup
from ..fingerprint import Fingerprint, fingerprint_image
from .checks import _pseudonymiser, _raster_metadata, _safe_path, _slug, chest_xray_warnings
from .common import CLEAN_DIRNAME, KNOWN_LICENSES, TEST_INDEX, UsageError
from .official_index import RefImage, _test_refs, load_dataset_refs
from .report import FileResult, ValidationReport


def _read_manifest_rows(root: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    try:
        cols, rows = read_manifest_rows(root / "manifest.csv")
    except ManifestError as e:
        raise UsageError(f"{e}; see docs/contributing.md") from None
    warnings = []
    extra = [c for c in cols if c not in MANIFEST_COLUMNS]
    if extra:
        warnings.append(f"manifest column(s) {extra} are not part of the format and were not submitted")
    if "license" not in cols:
        warnings.append("manifest has no 'license' column")
    return rows, warnings


def _matches(fp_words: np.ndarray, refs: list[RefImage], ref_words: np.ndarray, pixel: str,
             threshold: int) -> list[tuple[RefImage, int]]:
    """Reference images within ``threshold`` bits of the query (its phash or any variant), or with
    identical pixels; nearest first."""
    if not refs:
        return []
    d = dedup.hamming_matrix(fp_words, ref_words).min(axis=0)
    hits = {i: int(d[i]) for i in np.nonzero(d <= threshold)[0]}
    for i, r in enumerate(refs):
        if r.pixel_sha256 == pixel:
            hits[i] = 0
    return sorted(((refs[i], dist) for i, dist in hits.items()), key=lambda x: (x[1], x[0].ref))


def validate(submission_dir: str | os.PathLike, dataset: str | None = None, output: str | os.PathLike | None = None,
             near_threshold: int = dedup.DEFAULT_NEAR_THRESHOLD, test_index: str | os.PathLike = TEST_INDEX,
             write_output: bool = True) -> ValidationReport:
    """Check every manifest line (see the module docstring) and, unless ``write_output`` is False,
    write the cleaned copy and the reports to ``output`` (default ``SUBMISSION_DIR/_clean``, replaced
    if it exists). Raises :class:`UsageError` for a folder that is not a submission."""
    root = Path(submission_dir)
    if not root.is_dir():
        raise UsageError(f"{root}: no such folder")
    root = root.resolve()
    out = Path(output) if output else root / CLEAN_DIRNAME
    rows, manifest_warnings = _read_manifest_rows(root)
    # a local --dataset path is reported by its folder name only (no home directories in a public PR)
    shown = f"{Path(dataset).name} (local folder)" if dataset and Path(dataset).exists() else dataset
    report = ValidationReport(submission_dir=str(root), dataset=shown, near_threshold=near_threshold,
                              test_index=Path(test_index).name,
                              created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    report.warnings += manifest_warnings
    if not rows:
        report.problems.append("manifest.csv lists no files")

    refs = _test_refs(Path(test_index))
    report.test_index_images = len(refs)
    if dataset:
        refs += load_dataset_refs(dataset)
    ref_words = dedup.hex_to_words([r.phash for r in refs]) if refs else np.zeros((0, 4), np.uint64)

    unlisted = _unlisted_files(root, out, {os.path.normpath(r.get("path", "")) for _, r in rows if r.get("path")})
    if unlisted:
        report.warnings.append(f"{len(unlisted)} file(s) in the folder are not listed in manifest.csv and "
                               "are not submitted")
    decoded: dict[int, tuple[Fingerprint, dict]] = {}  # file index -> fingerprint, clean manifest row
    # Cleaned PNGs are written as files are checked (a submission of full-resolution films does not
    # fit in memory), to a staging folder beside the output; _write_output moves the accepted ones.
    staging = None
    if write_output:
        _check_output(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        _check_files(report, rows, root, refs, ref_words, near_threshold, decoded, staging)
        _within_submission_duplicates(report, decoded, near_threshold)
        for fr in report.files:
            fr.status = "blocked" if fr.problems else "dropped" if fr.dropped else "warning" if fr.warnings else "ok"
            if fr.status in ("blocked", "dropped"):
                fr.clean_name = ""
        if rows and not report.accepted and not report.problems:
            report.problems.append("nothing left to submit (every file is blocked or already in the dataset)")
        accepted = [i for i, f in enumerate(report.files) if f.status in ("ok", "warning")]
        # The id names the submitted content: every decodable image of the folder, whatever --dataset
        # decided, so submitting the same folder again is recognised.
        content = hashlib.sha256("".join(sorted(f.pixel_sha256 for f in report.files if f.pixel_sha256)).encode()
                                 ).hexdigest()
        contributor = next((decoded[i][1]["contributor"] for i in accepted if decoded[i][1]["contributor"]), "")
        report.submission_id = f"{_slug(contributor) or 'anonymous'}-{content[:10]}"
        if staging is not None:
            _write_output(report, decoded, accepted, out, staging)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return report


def _check_files(report: ValidationReport, rows: list, root: Path, refs: list[RefImage], ref_words: np.ndarray,
                 near_threshold: int, decoded: dict, staging: Path | None) -> None:
    """The per-line checks; fills ``report.files`` and ``decoded``, writes cleaned PNGs to
    ``staging``."""
    pseudonym = _pseudonymiser()
    seen_paths: dict[str, int] = {}
    for line, row in rows:
        rel = row.get("path", "")
        fr = FileResult(line=line, path=rel)
        report.files.append(fr)
        label = parse_label(row.get("label", ""))
        if label is None:
            fr.problems.append(f"label {row.get('label', '')!r} is not one of {', '.join(LABELS)} "
                               "(or an accepted spelling, see modeling.labels.LABEL_ALIASES)")
        fr.label = label
        licence = row.get("license", "")
        if not licence:
            fr.problems.append("no licence (license column empty): we cannot redistribute without one")
        elif licence.lower() not in KNOWN_LICENSES:
            fr.warnings.append(f"licence {licence!r} is not one we recognise: the maintainer will check it")
        if not row.get("patient_id"):
            fr.warnings.append("no patient_id: the build treats the image as its own patient")
        norm = os.path.normpath(rel) if rel else rel
        if norm in seen_paths:
            fr.problems.append(f"the same file is listed twice (also on line {seen_paths[norm]})")
        elif rel:
            seen_paths[norm] = line
        full, why = _safe_path(root, rel)
        if full is None:
            fr.problems.append(why)
            continue
        size = full.stat().st_size
        if size > image_io.MAX_FILE_BYTES:  # before reading it into memory
            fr.problems.append(f"cannot be decoded (too_large): {size:,} bytes, more than the "
                               f"{image_io.MAX_FILE_BYTES:,}-byte limit")
            continue
        data = full.read_bytes()
        try:
            # named by line, not by file name: error texts end up in the report
            img, info = load_image_with_info(data, name=f"line {line}")
        except ImageLoadError as e:
            # A decoder's message can quote header values (pydicom does for malformed elements):
            # values of identifying DICOM tags are redacted from it.
            detail = e.detail
            dicomish = "DICOM" in detail or data[128:132] == b"DICM"
            for value in sorted(dicom_identifying_tags(data)[1] if dicomish else [], key=len, reverse=True):
                detail = re.sub(re.escape(value), "[redacted]", detail, flags=re.IGNORECASE)
            fr.problems.append(f"cannot be decoded ({e.reason}): {detail}")
            continue
        fr.format, fr.width, fr.height = info.format, img.width, img.height
        fp = fingerprint_image(img, info)
        fr.pixel_sha256, fr.phash = fp.pixel_sha256, fp.phash
        fr.warnings += chest_xray_warnings(img, info, data)
        fr.metadata_removed = _raster_metadata(data, info)
        if info.is_dicom:
            names, values, burned = dicom_identifying_tags(data)
            fr.identifying_tags_removed = names
            if burned == "YES":
                fr.problems.append("DICOM BurnedInAnnotation=YES: identifying text may be burned into the "
                                   "pixels, which removing tags cannot fix")
            note = row.get("note", "").lower()
            if note and any(v.lower() in note for v in values):
                fr.problems.append("the note repeats a value of this DICOM's patient-identifying tags: "
                                   "remove personal data from the note")
            del values
        words = dedup.hex_to_words([fp.phash, *fp.variants])
        for ref, dist in _matches(words, refs, ref_words, fr.pixel_sha256, near_threshold):
            kind = "exact" if ref.pixel_sha256 == fr.pixel_sha256 else "near"
            fr.matches.append({"kind": kind, "ref": ref.ref, "distance_bits": dist, "label": ref.label})
            if ref.is_test:
                fr.problems.append(f"{kind} duplicate of official test image {ref.ref} ({dist} bits): "
                                   "test images must never reach training")
            elif label is not None and ref.label != label:
                fr.problems.append(f"label conflict: the dataset has this image ({ref.ref}, {dist} bits) as "
                                   f"{ref.label}, the manifest says {label}. A relabelling needs a maintainer: "
                                   "open a discussion on the dataset repo")
            elif not fr.dropped:
                fr.dropped = f"already in the dataset: {kind} duplicate of {ref.ref} ({dist} bits)"
        fr.clean_name = f"images/{fr.pixel_sha256[:16]}.png"
        pid = row.get("patient_id", "")
        clean_row = {"path": fr.clean_name, "label": label, "patient_id": pseudonym(pid) if pid else "",
                     "license": licence, "contributor": row.get("contributor", ""), "note": row.get("note", "")}
        if staging is not None:
            save_pixels_png(img, staging / Path(fr.clean_name).name)
        decoded[len(report.files) - 1] = (fp, clean_row)


def _within_submission_duplicates(report: ValidationReport, decoded: dict, threshold: int) -> None:
    """Copies inside the submission: same label -> the later lines are dropped; different labels ->
    every copy is blocked (which one is right is for the contributor to say)."""
    idx = [i for i in sorted(decoded) if not report.files[i].problems and not report.files[i].dropped]
    if len(idx) < 2:
        return
    clusters, _, _ = dedup.duplicate_clusters([decoded[i][0] for i in idx], threshold)
    for members in clusters:
        if len(members) < 2:
            continue
        files = [report.files[idx[m]] for m in members]
        if len({f.label for f in files}) > 1:
            lines = ", ".join(str(f.line) for f in files)
            for f in files:
                f.problems.append(f"copies of one image with different labels on lines {lines}")
            continue
        first = min(files, key=lambda f: f.line)
        for f in files:
            if f is not first:
                f.dropped = f"duplicate of line {first.line} of this submission"


def _unlisted_files(root: Path, out: Path, listed: set[str]) -> list[str]:
    found = []
    for p in root.rglob("*"):
        if not p.is_file() or p.name == "manifest.csv" or CLEAN_DIRNAME in p.relative_to(root).parts:
            continue
        if out.resolve() in p.resolve().parents:
            continue
        rel = os.path.normpath(p.relative_to(root).as_posix())
        if rel not in listed:
            found.append(rel)
    return found


def _check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").exists())):
        raise UsageError(f"--output {out} exists and is not an earlier validation output; refusing to replace it")


def _write_output(report: ValidationReport, decoded: dict, accepted: list[int], out: Path, staging: Path) -> None:
    """The cleaned copy (replacing an earlier one). Only pixels leave: each PNG was saved from a
    fresh image built from the decoded pixel array with no metadata argument, so no DICOM tag, EXIF
    block or text chunk can come along."""
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    rows = []
    for i in accepted:
        clean_row = decoded[i][1]
        os.replace(staging / Path(clean_row["path"]).name, out / clean_row["path"])
        rows.append({**clean_row, "source": f"contrib-{report.submission_id}"})
    write_manifest(out, rows)  # the library's one writer of the format (the Space export uses it too)
    report.output_dir = str(out)
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    (out / "REPORT.md").write_text(report.markdown())
