"""The validation report: one result per manifest line, the summary, REPORT.md."""

from __future__ import annotations


from collections import Counter
from dataclasses import asdict, dataclass, field


from modeling.labels import LABELS

from .. import dedup
from .common import REPORT_VERSION, STATUSES


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
