"""Loading the training/evaluation dataset: the output of ``dataset_scripts.build``, from a local
directory (``save_to_disk``) or a Hub dataset id. Checked against our label set so a dataset with
another class order can never be silently mis-scored."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datasets import ClassLabel, DatasetDict, load_dataset, load_from_disk

from .labels import LABELS

REQUIRED_COLUMNS = ("image", "label")


class DatasetFormatError(ValueError):
    """The dataset lacks a column or split we need, or uses other labels."""


def load_cxr_dataset(path_or_id: str, *, revision: str | None = None) -> DatasetDict:
    """``datasets.load_from_disk`` for a directory, else ``load_dataset(path_or_id)`` from the Hub."""
    p = Path(path_or_id)
    if p.exists():
        ds = load_from_disk(str(p))
    else:
        ds = load_dataset(path_or_id, revision=revision)
    if not isinstance(ds, DatasetDict):
        raise DatasetFormatError(f"{path_or_id}: expected a DatasetDict with splits, got {type(ds).__name__}")
    for name, split in ds.items():
        missing = [c for c in REQUIRED_COLUMNS if c not in split.column_names]
        if missing:
            raise DatasetFormatError(f"{path_or_id}: split {name!r} lacks column(s) {missing}")
        feat = split.features["label"]
        if not isinstance(feat, ClassLabel) or tuple(feat.names) != LABELS:
            got = getattr(feat, "names", feat)
            raise DatasetFormatError(f"{path_or_id}: split {name!r} label must be ClassLabel{list(LABELS)}, got {got}")
    return ds


def require_split(ds: DatasetDict, name: str):
    if name not in ds:
        raise DatasetFormatError(f"the dataset has no {name!r} split (has: {sorted(ds)})")
    return ds[name]


def groups_of(split) -> list[str] | None:
    """Patient ids for grouped statistics, or None when the split has no ``patient_id`` column (the
    metrics then resample images and say so). Rows with an empty id count as their own patient."""
    if "patient_id" not in split.column_names:
        return None
    return [pid if pid else f"row:{i}" for i, pid in enumerate(split["patient_id"])]


def stratified_subset(split, n: int | None, seed: int):
    """``n`` rows keeping the class mix (a plain head or shuffle of a small subset can miss a class,
    which would make calibration and the threshold meaningless)."""
    if n is None or n >= len(split):
        return split
    counts = np.bincount(np.asarray(split["label"]), minlength=len(LABELS))
    k = int((counts > 0).sum())
    if n >= k and len(split) - n >= k and (counts[counts > 0] >= 2).all():  # what train_test_split needs
        return split.train_test_split(train_size=n, stratify_by_column="label", seed=seed)["train"]
    return split.shuffle(seed=seed).select(range(n))
