"""Patient grouping and the train/validation split.

A *group* is what must never straddle two splits. It is the connected component of two relations:
same patient id, and same duplicate cluster (a Skytells copy of a Kermany image inherits that
image's patient). Images whose source gives no patient id form their own group (with their
duplicates). Groups that contain an official test image's patient cannot go to train/validation.

Validation is one fold of scikit-learn's ``StratifiedGroupKFold``: stratified by label, grouped by
the component above, seeded.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from modeling.labels import LABEL2ID

from .dedup import UnionFind
from .sources import Record


def patient_groups(records: list[Record], clusters: list[list[int]]) -> list[int]:
    """Group id (the smallest member index) for every record."""
    uf = UnionFind(len(records))
    first_by_patient: dict[str, int] = {}
    for i, r in enumerate(records):
        if r.patient_id:
            uf.union(i, first_by_patient.setdefault(r.patient_id, i))
    for members in clusters:
        for i in members[1:]:
            uf.union(members[0], i)
    return [uf.find(i) for i in range(len(records))]


def validation_split(indices: list[int], labels: list[str], groups: list[int], fraction: float,
                     seed: int) -> set[int]:
    """Indices (a subset of ``indices``) that form the validation split."""
    if not indices or fraction <= 0:
        return set()
    n_splits = max(2, round(1 / fraction))  # one fold of k: the share is 1/k, reported as measured
    n_groups = len({groups[i] for i in indices})
    if n_groups < n_splits:
        raise ValueError(f"only {n_groups} patient groups: too few for a {fraction:.0%} validation split")
    y = np.array([LABEL2ID[labels[i]] for i in indices])
    g = np.array([groups[i] for i in indices])
    # With very small classes StratifiedGroupKFold warns; the split is still grouped, just less even.
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, val_idx = next(sgkf.split(np.zeros(len(indices)), y, g))
    return {indices[k] for k in val_idx}
