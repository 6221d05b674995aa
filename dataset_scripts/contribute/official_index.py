"""The committed index of the official test images (pixel SHA-256 + 256-bit phash) and the
reference images of an existing dataset: what a submission must not copy."""

from __future__ import annotations


import csv
import gzip
import io
from dataclasses import dataclass
from pathlib import Path


from modeling.image_io import load_image_with_info, pixel_sha256

from ..fingerprint import image_phash
from ..sources import read_kermany
from .common import TEST_INDEX, UsageError


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
