"""Check, de-identify and submit a contributor's dataset update (a folder of images + ``manifest.csv``).

    python -m dataset_scripts.contribute validate SUBMISSION_DIR [--dataset DIR_OR_HUB_ID] [--output DIR]
    python -m dataset_scripts.contribute submit   SUBMISSION_DIR --repo REPO_ID [--dataset ...]
    python -m dataset_scripts.contribute index-test-images KERMANY_DIR   # maintainers: refresh the index

Why a gate: one careless upload (a copy of a test image, a mislabelled batch, a DICOM with a
patient's name in it) silently poisons every later model and leaks personal data. ``validate`` runs
on the contributor's machine, before anything leaves it, and writes a *cleaned copy* that is the only
thing ``submit`` ever uploads.

Input: ``SUBMISSION_DIR/manifest.csv`` in the ``manifest`` format that ``dataset_scripts.build``
reads and the Space's feedback export writes (``path,label[,patient_id,license,contributor,note,
source]``, paths relative to the CSV) and the image files it lists (JPEG/PNG/TIFF/BMP/WebP/DICOM).

Per file (statuses ``ok`` / ``warning`` / ``dropped`` / ``blocked``):

- blocked: path unsafe (absolute, ``..``, symlink, outside the folder) or missing; undecodable by
  :func:`modeling.image_io.load_image` (empty, truncated, not an image, decompression bomb, ...);
  label outside our three classes; no licence; exact or near duplicate of an **official test image**
  (the committed :data:`TEST_INDEX` of the 624 Kermany test images, or the ``test`` split of
  ``--dataset``); same image as an existing dataset image with *another* label; copies inside the
  submission that disagree on the label; a DICOM flagged ``BurnedInAnnotation=YES`` (identifying text
  in the pixels, which no tag removal fixes); a note that repeats a value of the file's
  patient-identifying DICOM tags.
- dropped: duplicate of an image already in ``--dataset`` (same label) or of an earlier line of the
  submission: reported, not submitted.
- warning: does not look like a frontal chest X-ray (:func:`chest_xray_warnings`), DICOM not CR/DX,
  not a chest, or a lateral view; no patient id; a licence id we do not recognise.

Duplicates use the build's own fingerprints and threshold (:mod:`dataset_scripts.fingerprint`,
:data:`dataset_scripts.dedup.DEFAULT_NEAR_THRESHOLD`: 256-bit phash within 28 bits, with mirror and
+-2..10 degree rotations), so the gate and the build agree on what a copy is.

De-identification is by construction: every accepted image is re-encoded to PNG from the decoded
pixels (no DICOM header, EXIF, ICC or text chunk survives), renamed to its pixel hash (no
identifying file names), and ``patient_id`` values are replaced by per-submission pseudonyms (kept
equal within the submission so the build still groups a patient's images). The report names the
identifying DICOM tags that were present and removed, never their values. The manifest's free-text
``note`` is passed through: do not put personal data in it.

Output (``--output``, default ``SUBMISSION_DIR/_clean``; what ``submit`` uploads is exactly the
first four)::

    manifest.csv          cleaned manifest (paths images/<hash>.png, canonical labels, pseudonyms)
    images/<hash16>.png   accepted images, re-encoded from pixels
    report.json           the validation report
    REPORT.md             the same as a summary table (the pull request description)

Reports and console output name files by their manifest line (and new name), never by the original
path: a file name can itself be personal data (``Doe_Jane_1970.dcm``).

Exit codes: 0 nothing blocking (warnings allowed), 1 blocking problems (``submit``: nothing was
uploaded), 2 usage errors (no such folder, no manifest.csv, unusable ``--dataset``), 3 the Hub
refused the upload.

On the dataset repo, a merged submission lives in ``contributions/<submission-id>/`` (the four files
above); ``python -m dataset_scripts.build --source contributions:DIR_OR_REPO_ID`` takes every merged
contribution as a source (train/validation only, never test) and the dataset card lists them.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import hmac
import io
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from modeling import image_io
from modeling.image_io import ImageInfo, ImageLoadError, load_image_with_info, pixel_sha256
from modeling.labels import LABELS, parse_label
from modeling.manifest import write_manifest
from modeling.dicom import identifying_tags as dicom_identifying_tags
from modeling.quality import symmetry_problems, xray_problems

from . import dedup
from .fingerprint import Fingerprint, image_phash, perceptual_hashes
from .sources import MANIFEST_COLUMNS, read_kermany

CONTRIBUTIONS_DIR = "contributions"  # folder of merged submissions in the dataset repo
CLEAN_DIRNAME = "_clean"
TEST_INDEX = Path(__file__).with_name("official_test_index.csv.gz")
UPLOADED_FILES = ("manifest.csv", "report.json", "REPORT.md")  # + images/*.png
REPORT_VERSION = 1

STATUSES = ("ok", "warning", "dropped", "blocked")

# Licence ids we recognise (SPDX, lower case). Others are accepted with a warning: the maintainer
# must check that the licence allows redistribution in a CC BY 4.0 dataset.
KNOWN_LICENSES = frozenset({
    "cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-3.0", "cc-by-2.0", "pddl", "odc-by", "odbl",
    "mit", "apache-2.0", "bsd-3-clause", "cdla-permissive-2.0", "public-domain",
})


class UsageError(ValueError):
    """The command cannot run as asked (no folder, no manifest.csv, unusable --dataset): exit 2."""


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

@dataclass
class FileResult:
    """One manifest line. ``path`` is the contributor's own path: it can carry personal data
    (``Doe_Jane.dcm``), so it stays in memory (Python API) and is never written or printed."""

    line: int
    path: str
    label: str | None = None
    status: str = "ok"
    problems: list[str] = field(default_factory=list)  # blocking
    warnings: list[str] = field(default_factory=list)
    dropped: str = ""  # why it is not submitted although nothing is wrong with it
    clean_name: str = ""  # images/<hash>.png in the cleaned copy
    format: str = ""
    width: int = 0
    height: int = 0
    pixel_sha256: str = ""
    phash: str = ""
    identifying_tags_removed: list[str] = field(default_factory=list)  # DICOM tag names, never values
    metadata_removed: list[str] = field(default_factory=list)  # kinds: "EXIF", "XMP", "text chunk", ...
    matches: list[dict] = field(default_factory=list)  # duplicates found: {"kind", "ref", "distance"}

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("path")
        return d


@dataclass
class ValidationReport:
    submission_dir: str
    submission_id: str = ""
    created_at: str = ""
    dataset: str | None = None
    test_index: str = ""
    test_index_images: int = 0
    near_threshold: int = dedup.DEFAULT_NEAR_THRESHOLD
    problems: list[str] = field(default_factory=list)  # blocking, not tied to one file
    warnings: list[str] = field(default_factory=list)
    files: list[FileResult] = field(default_factory=list)
    output_dir: str = ""

    @property
    def accepted(self) -> list[FileResult]:
        return [f for f in self.files if f.status in ("ok", "warning")]

    @property
    def blocked(self) -> list[FileResult]:
        return [f for f in self.files if f.status == "blocked"]

    @property
    def ok(self) -> bool:
        """Nothing blocking: the cleaned copy may be submitted."""
        return not self.problems and not self.blocked

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def counts(self) -> dict:
        c = Counter(f.status for f in self.files)
        by_label = Counter(f.label for f in self.accepted)
        return {"files": len(self.files), **{s: c.get(s, 0) for s in STATUSES},
                "submitted_by_label": {lab: by_label.get(lab, 0) for lab in LABELS}}

    def to_dict(self) -> dict:
        return {
            "report_version": REPORT_VERSION, "submission_id": self.submission_id,
            "created_at": self.created_at, "result": "passed" if self.ok else "blocked",
            "counts": self.counts(), "problems": self.problems, "warnings": self.warnings,
            "checks": {"dataset": self.dataset, "official_test_index": self.test_index,
                       "official_test_images": self.test_index_images,
                       "near_threshold_bits": self.near_threshold,
                       "hash": "imagehash.phash hash_size=16 (256 bits), +mirror, +-2..10 deg rotations"},
            "files": [f.to_dict() for f in self.files],
        }

    def markdown(self) -> str:
        """Summary table (the pull request description, and what the CLI prints): files by manifest
        line and new name."""
        c = self.counts()
        lines = [
            f"## Contribution `{self.submission_id or '-'}`: validation {'passed' if self.ok else '**BLOCKED**'}",
            "",
            "| files | ok | warning | dropped | blocked | submitted: " + " / ".join(LABELS) + " |",
            "|---|---|---|---|---|---|",
            f"| {c['files']} | {c['ok']} | {c['warning']} | {c['dropped']} | {c['blocked']} | "
            + " / ".join(str(c["submitted_by_label"][lab]) for lab in LABELS) + " |",
            "",
            f"Checked against the official test index ({self.test_index_images} images) and "
            f"{'dataset `' + self.dataset + '`' if self.dataset else 'no existing dataset (`--dataset` not given)'}; "
            f"near duplicate = 256-bit phash within {self.near_threshold} bits (mirror and rotations included). "
            "Images re-encoded to PNG from pixels; every DICOM tag, EXIF and text chunk removed; patient ids pseudonymised.",
            "",
        ]
        for title, items in (("Blocking problems", self.problems), ("Warnings", self.warnings)):
            if items:
                lines += [f"**{title}:**", "", *[f"- {x}" for x in items], ""]
        head = ["line", "status", "label", "file", "details"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for f in self.files:
            details = "; ".join([*f.problems, *([f.dropped] if f.dropped else []), *f.warnings])
            if f.identifying_tags_removed:
                details += ("; " if details else "") + "identifying DICOM tags removed: " + ", ".join(f.identifying_tags_removed)
            row = [str(f.line), f.status, f.label or "-",
                   f"`{f.clean_name}`" if f.clean_name else "-", _md(details) or "-"]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------------------------------
# Official test index
# --------------------------------------------------------------------------------------------------

@dataclass
class RefImage:
    """An image the submission is compared against: an official test image or a dataset row."""

    ref: str  # how the report names it: "kermany-test:test/NORMAL/IM-0001-0001.jpeg"
    label: str
    pixel_sha256: str
    phash: str
    is_test: bool


def compute_test_index(kermany_root: Path) -> list[dict]:
    """Rows of the official test index from a Kermany copy (``chest_xray/test/...``): name, label,
    pixel SHA-256 and 256-bit phash, decoded by the one loader and hashed exactly as the build does."""
    rows = []
    for r in read_kermany(Path(kermany_root), exclude=[]).records:
        if r.official_split != "test":
            continue
        img = load_image_with_info(r.path.read_bytes(), name=r.source_path)[0]
        rows.append({"path": r.source_path, "label": r.label, "pixel_sha256": pixel_sha256(img),
                     "phash": image_phash(img)})
    return sorted(rows, key=lambda x: x["path"])


def write_test_index(rows: list[dict], out: Path = TEST_INDEX) -> Path:
    """Deterministic gzip (no time stamp, no file name), so regenerating gives identical bytes."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=("path", "label", "pixel_sha256", "phash"), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    with open(out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(buf.getvalue().encode())
    return out


def read_test_index(path: Path = TEST_INDEX) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _test_refs(path: Path) -> list[RefImage]:
    return [RefImage(f"kermany-test:{r['path']}", r["label"], r["pixel_sha256"], r["phash"], True)
            for r in read_test_index(path)]


def load_dataset_refs(dataset: str) -> list[RefImage]:
    """Reference images of an existing dataset built by ``dataset_scripts.build`` (a ``save_to_disk``
    folder or a Hub dataset id), from its ``image_sha256``/``phash``/``label`` columns: no image is
    decoded. Rows of its ``test`` split count as test images."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    try:
        if Path(dataset).exists():
            dsd = load_from_disk(str(dataset))
        else:
            dsd = load_dataset(dataset)
    except Exception as e:  # not found, not a dataset, offline...: say so, do not guess
        raise UsageError(f"--dataset {dataset!r}: cannot load it ({type(e).__name__}: {e})") from e
    if not isinstance(dsd, DatasetDict):
        dsd = DatasetDict({"train": dsd})
    refs = []
    for split, ds in dsd.items():
        missing = {"image_sha256", "phash", "label"} - set(ds.column_names)
        if missing:
            raise UsageError(f"--dataset {dataset!r}: split {split!r} has no column(s) {sorted(missing)}; "
                             "expected a dataset built by dataset_scripts.build")
        names = ds.features["label"].names
        cols = [c for c in ("image_sha256", "phash", "label", "source", "source_path") if c in ds.column_names]
        for row in ds.select_columns(cols):
            where = f"{row.get('source', '')}:{row.get('source_path', '')}".strip(":")
            refs.append(RefImage(f"dataset-{split}:{where}", names[row["label"]], row["image_sha256"],
                                 row["phash"], split == "test"))
    return refs


# --------------------------------------------------------------------------------------------------
# Per-file checks
# --------------------------------------------------------------------------------------------------

def chest_xray_warnings(img: Image.Image, info: ImageInfo, data: bytes | None = None) -> list[str]:
    """Warnings for images that do not look like a frontal chest X-ray.

    :func:`modeling.quality.xray_problems` (the rules the Space applies: gray, a radiograph, chest,
    not lateral by DICOM tags, not tiny, a film-like aspect ratio, not flat), so contributor and Space
    agree, plus a left-right symmetry check: a frontal chest is roughly symmetric (spine in the
    middle, a lung each side); a lateral film without DICOM tags, a hand or a screenshot mostly is
    not. Limits: a symmetric non-chest image (skull, pelvis, frontal abdomen) passes; about 1% of
    real frontal films (rotated patients, large one-sided consolidations) get a symmetry warning.
    Warnings do not block: the maintainer looks at the flagged files in the PR.
    """
    return list(xray_problems(img, info, data)) + symmetry_problems(img)


_METADATA_KINDS = {"exif": "EXIF", "icc_profile": "ICC profile", "xmp": "XMP", "XML:com.adobe.xmp": "XMP",
                   "comment": "comment", "photoshop": "Photoshop block", "iptc": "IPTC"}
_TECHNICAL_INFO = frozenset({"dpi", "jfif", "jfif_version", "jfif_unit", "jfif_density", "progressive",
                             "progression", "gamma", "aspect", "compression", "interlace", "transparency",
                             "adobe", "adobe_transform", "srgb", "chromaticity", "mp", "mpoffset"})


def _raster_metadata(data: bytes, info: ImageInfo) -> list[str]:
    """Kinds of metadata a raster file carries (EXIF, XMP, ICC, comments, text chunks): all are
    dropped by the re-encode, and the report says which kinds were there. Never contents, and never
    a text chunk's own keyword (the writer chose it; it could be a name): those are "text chunk"."""
    if info.is_dicom:
        return []
    try:
        with Image.open(io.BytesIO(data), formats=[info.format]) as im:
            kinds = {_METADATA_KINDS.get(str(k), "text chunk") for k in im.info if str(k) not in _TECHNICAL_INFO}
            if im.getexif():
                kinds.add("EXIF")
    except Exception:
        return []
    return sorted(kinds)


def _safe_path(root: Path, rel: str) -> tuple[Path | None, str]:
    """The file a manifest path names, or (None, why it is refused). Absolute paths, ``..``, symlinks
    and anything resolving outside the submission folder are refused: the manifest must not make the
    validator read (and then upload) a file from elsewhere on the contributor's machine."""
    if not rel:
        return None, "empty path"
    p = Path(rel)
    if p.is_absolute() or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
        return None, "unsafe path: absolute paths are not allowed"
    if ".." in p.parts or ".." in rel.replace("\\", "/").split("/"):
        return None, "unsafe path: '..' is not allowed"
    full = root / p
    cur = root
    for part in p.parts:
        cur = cur / part
        if cur.is_symlink():
            return None, "unsafe path: symbolic links are not allowed"
    if not full.exists():
        return None, "file not found"
    if not full.is_file():
        return None, "not a regular file"
    try:
        full.resolve().relative_to(root.resolve())
    except ValueError:
        return None, "unsafe path: outside the submission folder"
    return full, ""


def _pseudonymiser():
    """patient_id -> ``p-<12 hex>``: HMAC with a random key that is never stored, so ids stay equal
    within one submission (the build groups a patient's images) but cannot be traced back or linked
    across submissions."""
    key = secrets.token_bytes(32)
    return lambda pid: "p-" + hmac.new(key, pid.encode(), hashlib.sha256).hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:24]


# --------------------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------------------

def _read_manifest_rows(root: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    csv_path = root / "manifest.csv"
    if not csv_path.is_file():
        raise UsageError(f"{root}: no manifest.csv (expected columns {','.join(MANIFEST_COLUMNS)}); "
                         "see README 'Contributing data'")
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = {"path", "label"} - set(cols)
        if missing:
            raise UsageError(f"{csv_path}: missing column(s) {sorted(missing)}; expected {','.join(MANIFEST_COLUMNS)}")
        rows = [(i, {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in row.items()})
                for i, row in enumerate(reader, start=2)]
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
        fr.pixel_sha256 = pixel_sha256(img)
        ph, variants = perceptual_hashes(img)
        fr.phash = ph
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
        fp = Fingerprint(file_sha256="", ok=True, pixel_sha256=fr.pixel_sha256, phash=ph, variants=variants,
                         width=img.width, height=img.height, format=info.format)
        words = dedup.hex_to_words([ph, *variants])
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
            pixels = Image.frombytes("L", img.size, img.tobytes())  # a fresh image: pixels, nothing else
            pixels.save(staging / Path(fr.clean_name).name, format="PNG")
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


# --------------------------------------------------------------------------------------------------
# submit
# --------------------------------------------------------------------------------------------------

@dataclass
class SubmitResult:
    report: ValidationReport
    pr_url: str | None = None
    pr_num: int | None = None
    path_in_repo: str = ""


def submit(submission_dir: str | os.PathLike, repo_id: str, dataset: str | None = None,
           output: str | os.PathLike | None = None, token: str | None = None,
           near_threshold: int = dedup.DEFAULT_NEAR_THRESHOLD,
           test_index: str | os.PathLike = TEST_INDEX) -> SubmitResult:
    """Validate, then open a pull request on the Hub dataset repo ``repo_id`` that adds the cleaned
    copy under ``contributions/<submission-id>/``, with the summary table as its description.
    Nothing is uploaded when validation finds a blocking problem (``result.pr_url`` is None)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    report = validate(submission_dir, dataset=dataset, output=output, near_threshold=near_threshold,
                      test_index=test_index)
    result = SubmitResult(report)
    if not report.ok:
        return result
    out = Path(report.output_dir)
    base = f"{CONTRIBUTIONS_DIR}/{report.submission_id}"
    api = HfApi(token=token)
    if api.file_exists(repo_id, f"{base}/manifest.csv", repo_type="dataset"):
        report.problems.append(f"{base} is already in {repo_id}: this submission was merged before")
        return result
    files = [*UPLOADED_FILES, *sorted(f"images/{p.name}" for p in (out / "images").glob("*.png"))]
    ops = [CommitOperationAdd(path_in_repo=f"{base}/{rel}", path_or_fileobj=str(out / rel)) for rel in files]
    c = report.counts()
    info = api.create_commit(
        repo_id, repo_type="dataset", operations=ops, create_pr=True,
        commit_message=f"Contribution {report.submission_id}: {c['ok'] + c['warning']} images",
        commit_description=report.markdown())
    result.pr_url, result.pr_num, result.path_in_repo = info.pr_url, info.pr_num, base
    return result


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def _print_report(report: ValidationReport) -> None:
    print(report.markdown())
    if report.output_dir:
        print(f"cleaned copy and reports: {report.output_dir} (REPORT.md = what reviewers see)")
    print("result:", "passed" if report.ok else "BLOCKED (fix the problems above and run validate again)")


def main(argv: list[str] | None = None) -> int:
    from modeling.cli import add_flag, parse

    ap = argparse.ArgumentParser(prog="cxr-contribute", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("validate", "submit"):
        p = sub.add_parser(name, help=f"{name} a submission folder (images + manifest.csv)")
        p.add_argument("submission_dir", type=Path)
        p.add_argument("--dataset", metavar="DIR_OR_HUB_ID",
                       help="the existing dataset (built by dataset_scripts.build): duplicates of its "
                            "images are dropped, label conflicts blocked")
        add_flag(p, "--output-dir", old=("--output",), type=Path,
                 help=f"cleaned copy folder (default SUBMISSION_DIR/{CLEAN_DIRNAME})")
        p.add_argument("--near-threshold", type=int, default=dedup.DEFAULT_NEAR_THRESHOLD,
                       help="max Hamming distance (of 256 bits) for a near duplicate (default: the build's)")
        p.add_argument("--test-index", type=Path, default=TEST_INDEX, help=argparse.SUPPRESS)
        if name == "submit":
            p.add_argument("--repo", required=True, metavar="REPO_ID", help="the Hub dataset repo")
    p = sub.add_parser("index-test-images", help="recompute the committed official test index (maintainers)")
    p.add_argument("kermany_dir", type=Path)
    add_flag(p, "--output", old=("--out",), type=Path, default=TEST_INDEX, help="the index file written")
    args = parse(ap, argv)

    try:
        if args.command == "index-test-images":
            rows = compute_test_index(args.kermany_dir)
            if not rows:
                raise UsageError(f"{args.kermany_dir}: no official test images found")
            print(f"wrote {write_test_index(rows, args.output)} ({len(rows)} images)")
            return 0
        if args.command == "validate":
            report = validate(args.submission_dir, dataset=args.dataset, output=args.output_dir,
                              near_threshold=args.near_threshold, test_index=args.test_index)
            _print_report(report)
            return report.exit_code
        from huggingface_hub.errors import HfHubHTTPError

        try:
            result = submit(args.submission_dir, args.repo, dataset=args.dataset, output=args.output_dir,
                            token=os.environ.get("HF_TOKEN"), near_threshold=args.near_threshold,
                            test_index=args.test_index)
        except HfHubHTTPError as e:
            print(f"error: the Hub refused the upload: {e}", file=sys.stderr)
            return 3
        _print_report(result.report)
        if result.pr_url is None:
            print("nothing was uploaded", file=sys.stderr)
            return 1
        print(f"opened pull request #{result.pr_num}: {result.pr_url}")
        return 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
