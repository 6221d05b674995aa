"""Readers that turn a raw public source into a list of :class:`Record` (one per image file).

Readers only *list* files and read labels/patient ids from the layout and names; they never decode
pixels (that is :mod:`dataset_scripts.fingerprint`'s job), so listing ~10k files takes well under a
second and a bad image never stops a reader.

Source specs on the command line are ``KIND:PATH``:

- ``kermany:PATH``  official layout ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}``
- ``folders:PATH``  class-named folders at any depth (names through ``modeling.labels.LABEL_ALIASES``)
- ``manifest:CSV``  a CSV with ``path,label[,patient_id,license,contributor,note,source]``
- ``contributions:DIR_OR_REPO_ID``  every merged contribution ``contributions/<id>/manifest.csv`` of
  a local copy of the dataset repo, or of the Hub dataset repo itself (see dataset_scripts.contribute)
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from modeling.image_io import IMAGE_EXTENSIONS
from modeling.labels import BACTERIAL, LABELS, NORMAL, VIRAL, accepted_label_names, parse_label
from modeling.manifest import ManifestError, read_manifest_rows

KERMANY_LICENSE = "cc-by-4.0"


class SourceError(ValueError):
    """A source cannot be read as declared (unknown class folder, bad manifest...). Fatal for the
    build, with a message that says what to fix."""


@dataclass
class Record:
    """One image file of one source, before any pixel is read."""

    path: Path  # absolute path of the file
    label: str  # one of modeling.labels.LABELS
    source: str  # short source name, e.g. "kermany", "skytells-covid19-xray"
    source_kind: str  # "kermany" | "folders" | "manifest"
    source_path: str  # path relative to the source root, POSIX separators
    patient_id: str | None = None  # None when the source does not tell
    official_split: str | None = None  # "train" | "val" | "test" for Kermany, else None
    license: str = "unknown"
    contributor: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def is_official_test(self) -> bool:
        return self.source_kind == "kermany" and self.official_split == "test"


@dataclass
class SourceListing:
    """What a reader found: the records, plus the files it saw but did not take (never silent)."""

    records: list[Record]
    ignored: list[dict]  # {"path": ..., "reason": ...}


def parse_source_spec(spec: str) -> tuple[str, Path]:
    kind, sep, path = spec.partition(":")
    if not sep or kind not in READERS or not path.strip():
        raise SourceError(f"bad --source {spec!r}: expected KIND:PATH with KIND one of {sorted(READERS)}")
    p = Path(path).expanduser()
    if not p.exists() and kind == "contributions" and _REPO_ID.match(path):
        return kind, download_contributions(path)
    if not p.exists():
        raise SourceError(f"--source {spec!r}: {p} does not exist")
    return kind, p.resolve()


def read_source(spec: str, exclude: list[str] | None = None) -> SourceListing:
    kind, path = parse_source_spec(spec)
    return READERS[kind](path, exclude=exclude or [])


def _excluded(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, pat) or rel.startswith(pat.rstrip("/*") + "/") for pat in patterns)


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def _detect_license(root: Path) -> str:
    """SPDX-like id from a LICENSE file at the source root, 'unknown' otherwise."""
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE"):
        f = root / name
        if f.is_file():
            text = f.read_text(errors="replace")[:2000]
            if "MIT License" in text or "Permission is hereby granted, free of charge" in text:
                return "mit"
            if "Apache License" in text:
                return "apache-2.0"
            if "Attribution 4.0" in text:
                return "cc-by-4.0"
            return "other"
    return "unknown"


# --- kermany -------------------------------------------------------------------------------------

_PNEUMONIA_NAME = re.compile(r"^(person\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
_NORMAL_NAME = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE)


def kermany_patient_and_label(folder: str, name: str) -> tuple[str | None, str | None]:
    """(patient id, label) from a Kermany file name, or None where the name does not tell.

    Patient ids are *not* namespaced by split: ``person1`` in train and ``person1`` in test are the
    same patient (the image counters after ``_bacteria_``/``_virus_`` are unique across the official
    train and test splits, i.e. one numbering), so grouping by the bare id is the conservative choice.
    The same ``personN`` with bacteria and virus images is one group too.
    """
    if folder.upper() == "NORMAL":
        m = _NORMAL_NAME.match(name)
        return (f"kermany:{m.group(1).upper()}" if m else None), NORMAL
    m = _PNEUMONIA_NAME.match(name)
    if not m:
        return None, None
    label = BACTERIAL if m.group(2).lower() == "bacteria" else VIRAL
    return f"kermany:{m.group(1).lower()}", label


def read_kermany(root: Path, exclude: list[str]) -> SourceListing:
    base = root / "chest_xray" if (root / "chest_xray").is_dir() else root
    if not any((base / s).is_dir() for s in ("train", "test", "val")):
        raise SourceError(f"kermany source {root}: expected chest_xray/{{train,val,test}}/{{NORMAL,PNEUMONIA}}")
    records, ignored = [], []
    for split in ("train", "val", "test"):
        for folder in ("NORMAL", "PNEUMONIA"):
            d = base / split / folder
            if not d.is_dir():
                continue
            for p in sorted(d.iterdir()):
                rel = p.relative_to(root).as_posix()
                if not p.is_file() or _excluded(rel, exclude):
                    continue
                if not _is_image_name(p):
                    ignored.append({"path": rel, "reason": "not an image file name"})
                    continue
                patient, label = kermany_patient_and_label(folder, p.name)
                if label is None:
                    ignored.append({"path": rel, "reason": "PNEUMONIA file name has neither _bacteria_ nor _virus_"})
                    continue
                records.append(Record(
                    path=p, label=label, source="kermany", source_kind="kermany", source_path=rel,
                    patient_id=patient, official_split=split, license=KERMANY_LICENSE,
                ))
    return SourceListing(records, ignored)


# --- folders -------------------------------------------------------------------------------------

def read_folders(root: Path, exclude: list[str]) -> SourceListing:
    """Every folder that directly holds image files is a class folder, and its name must be an
    accepted label spelling; folders holding only folders are containers (``TrainData/``). An unknown
    class folder name is a :class:`SourceError` listing the accepted names: guessing a label is how
    datasets get silently mislabelled."""
    license = _detect_license(root)
    records, ignored, unknown = [], [], {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if _excluded(rel, exclude):
            continue
        if not _is_image_name(p):
            if p.parent != root:  # LICENSE, README, CSVs at the root are expected
                ignored.append({"path": rel, "reason": "not an image file name"})
            continue
        if p.parent == root:
            raise SourceError(f"folders source {root}: image {rel} is not inside a class folder")
        label = parse_label(p.parent.name)
        if label is None:
            unknown.setdefault(p.parent.relative_to(root).as_posix(), 0)
            unknown[p.parent.relative_to(root).as_posix()] += 1
            continue
        records.append(Record(
            path=p, label=label, source=root.name, source_kind="folders", source_path=rel,
            license=license,
        ))
    if unknown:
        listed = ", ".join(f"{k!r} ({n} images)" for k, n in sorted(unknown.items()))
        raise SourceError(
            f"folders source {root}: unknown class folder name(s): {listed}. "
            f"Accepted names (case and punctuation ignored): {', '.join(accepted_label_names())}. "
            f"Rename the folder, or skip it with --exclude."
        )
    return SourceListing(records, ignored)


# --- manifest ------------------------------------------------------------------------------------

def read_manifest(csv_path: Path, exclude: list[str], source_name: str | None = None) -> SourceListing:
    """The exchange format of contributions and Space feedback exports. Paths are relative to the
    CSV's folder. ``source`` defaults to the CSV's folder name; ``source_name`` overrides both."""
    if csv_path.is_dir():
        csv_path = csv_path / "manifest.csv"
        if not csv_path.is_file():
            raise SourceError(f"manifest source {csv_path.parent}: no manifest.csv in that folder")
    root = csv_path.parent
    try:
        _, rows = read_manifest_rows(csv_path)
    except ManifestError as e:
        raise SourceError(f"manifest source: {e}") from None
    records, ignored = [], []
    for i, row in rows:
        rel = (row.get("path") or "").strip()
        if not rel or _excluded(rel, exclude):
            if not rel:
                ignored.append({"path": f"{csv_path.name}:{i}", "reason": "empty path"})
            continue
        label = parse_label(row.get("label") or "")
        if label is None:
            ignored.append({"path": rel, "reason": f"unknown label {row.get('label')!r} (line {i}); "
                                                   f"accepted: {', '.join(LABELS)}"})
            continue
        p = (root / rel).resolve()
        if not p.is_file():
            ignored.append({"path": rel, "reason": f"file listed in manifest not found (line {i})"})
            continue
        source = source_name or (row.get("source") or "").strip() or root.name
        patient = (row.get("patient_id") or "").strip()
        records.append(Record(
            path=p, label=label, source=source, source_kind="manifest", source_path=rel,
            patient_id=f"{source}:{patient}" if patient else None,
            license=(row.get("license") or "").strip() or "unknown",
            contributor=(row.get("contributor") or "").strip(), note=(row.get("note") or "").strip(),
        ))
    return SourceListing(records, ignored)


# --- contributions -------------------------------------------------------------------------------

CONTRIBUTIONS_DIR = "contributions"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def download_contributions(repo_id: str) -> Path:
    """The ``contributions/`` folder of a Hub dataset repo (main branch: merged PRs only), through
    the ``huggingface_hub`` cache; returns the local snapshot root."""
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id, repo_type="dataset", allow_patterns=[f"{CONTRIBUTIONS_DIR}/**"],
                                  token=os.environ.get("HF_TOKEN"))
    except Exception as e:  # not found, no access, offline: a source that cannot be read as declared
        raise SourceError(f"contributions:{repo_id}: cannot download it ({type(e).__name__}: {e})") from e
    return Path(local)


def read_contributions(root: Path, exclude: list[str]) -> SourceListing:
    """Every merged contribution: ``ROOT/contributions/<id>/manifest.csv`` (a dataset repo checkout or
    snapshot) or ``ROOT/<id>/manifest.csv``. Each is a manifest source named ``contrib-<id>`` (so
    pseudonymous patient ids of different submissions never collide), with ``source_kind
    "contribution"`` and the id in ``extra["contribution"]``; ``source_path`` is ``<id>/<path>`` and
    ``--exclude`` globs match it. Contributions are never official test images, so the build puts
    them in train/validation only, after the usual duplicate and leak checks."""
    base = root / CONTRIBUTIONS_DIR if (root / CONTRIBUTIONS_DIR).is_dir() else root
    manifests = sorted(p for p in base.glob("*/manifest.csv") if p.is_file())
    if not manifests:
        raise SourceError(f"contributions source {root}: no {CONTRIBUTIONS_DIR}/<id>/manifest.csv found")
    records, ignored = [], []
    for m in manifests:
        cid = m.parent.name
        listing = read_manifest(m, [], source_name=f"contrib-{cid}")
        for r in listing.records:
            r.source_kind, r.source_path = "contribution", f"{cid}/{r.source_path}"
            r.extra["contribution"] = cid
        records.extend(r for r in listing.records if not _excluded(r.source_path, exclude))
        ignored.extend({**x, "path": f"{cid}/{x['path']}"} for x in listing.ignored)
    return SourceListing(records, ignored)


READERS = {"kermany": read_kermany, "folders": read_folders, "manifest": read_manifest,
           "contributions": read_contributions}
