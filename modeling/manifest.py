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
