"""The ``manifest`` exchange format: a folder of images plus ``manifest.csv``.

It is how labelled images move between the parts of the project: the Space's feedback export writes
it, contributors submit it, ``dataset_scripts.build --source manifest:DIR`` reads it. The format is
defined here, in the library every part imports, so writer and readers cannot drift apart.

Columns (``path`` and ``label`` required, paths relative to the CSV's folder, labels from
:data:`modeling.labels.LABELS`)::

    path,label,patient_id,license,contributor,note,source
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterable, Mapping

MANIFEST_COLUMNS = ("path", "label", "patient_id", "license", "contributor", "note", "source")
MANIFEST_NAME = "manifest.csv"


def write_manifest(folder: str | os.PathLike, rows: Iterable[Mapping[str, object]]) -> Path:
    """Write ``folder/manifest.csv`` (atomically: a reader never sees half a file). Unknown keys
    are an error rather than silently dropped columns."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / MANIFEST_NAME
    tmp = out.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, extrasaction="raise")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    os.replace(tmp, out)
    return out


class ManifestError(ValueError):
    """A manifest that cannot be read as the format (no such file, missing required columns)."""


def read_manifest_rows(csv_path: str | os.PathLike) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The columns and the rows of a ``manifest.csv`` (``path`` and ``label`` required): each row as
    ``(line number in the file, {column: stripped value})``, so messages can name the line. Readers
    (the build's ``manifest:`` source, the contributor validator) decide what a bad row means."""
    path = Path(csv_path)
    if not path.is_file():
        raise ManifestError(f"{path.parent}: no {path.name} (expected columns {','.join(MANIFEST_COLUMNS)})")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = {"path", "label"} - set(cols)
        if missing:
            raise ManifestError(f"{path}: missing column(s) {sorted(missing)}; expected {','.join(MANIFEST_COLUMNS)}")
        rows = [(i, {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in row.items()})
                for i, row in enumerate(reader, start=2)]  # line 1 is the header
    return cols, rows
