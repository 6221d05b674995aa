"""The build on the real shared sources (Kermany + Skytells), checked independently: the checks
below re-decode the *saved* dataset and hash it with imagehash directly, without the build's
fingerprint/dedup code. Skipped with a reason when ../shared is absent. ~2 min on 2 cores."""

from __future__ import annotations


import imagehash
import numpy as np
import pytest
from PIL import Image

from dataset_scripts.dedup import DEFAULT_NEAR_THRESHOLD

LABELS = ["normal", "bacterial_pneumonia", "viral_pneumonia"]


@pytest.fixture(scope="module")
def real(real_dataset):
    from datasets import load_from_disk

    out, report, kermany = real_dataset
    return load_from_disk(str(out)), report, kermany


def _hashes(ds) -> tuple[np.ndarray, np.ndarray]:
    """(phash, phash of the mirror image) as (n, 256) bool arrays, straight from imagehash."""
    h, m = [], []
    for img in ds["image"]:
        g = img.convert("L")
        h.append(imagehash.phash(g, hash_size=16).hash.ravel())
        m.append(imagehash.phash(g.transpose(Image.Transpose.FLIP_LEFT_RIGHT), hash_size=16).hash.ravel())
    return np.array(h), np.array(m)


def _min_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.int16), b.astype(np.int16)
    # Hamming distance of bit vectors = |a| + |b| - 2 a.b
    d = a.sum(1)[:, None] + b.sum(1)[None, :] - 2 * a @ b.T
    return d.min(1)


def test_test_split_is_the_official_one_untouched(real):
    dsd, rep, kermany = real
    test = dsd["test"]
    counts = {n: test["label"].count(i) for i, n in enumerate(LABELS)}
    assert counts == {"normal": 234, "bacterial_pneumonia": 242, "viral_pneumonia": 148}
    official = {p.relative_to(kermany).as_posix() for p in (kermany / "chest_xray" / "test").rglob("*.jpeg")}
    assert set(test["source_path"]) == official and len(official) == 624
    assert set(test["source"]) == {"kermany"}


def test_no_train_or_validation_image_near_duplicates_a_test_image(real):
    dsd, _, _ = real
    th, tm = _hashes(dsd["test"])
    for split in ("train", "validation"):
        h, m = _hashes(dsd[split])
        nearest = np.minimum(_min_dist(h, th), _min_dist(m, th))
        assert nearest.min() > DEFAULT_NEAR_THRESHOLD, f"{split}: {int((nearest <= DEFAULT_NEAR_THRESHOLD).sum())} leaks"


def test_no_patient_in_two_splits(real):
    dsd, _, _ = real
    p = {s: set(dsd[s]["patient_id"]) for s in dsd}
    assert not p["train"] & p["validation"]
    assert not p["train"] & p["test"] and not p["validation"] & p["test"]


def test_no_kermany_image_counted_twice(real):
    """Every Skytells image that survives is far from every Kermany image in train/validation."""
    dsd, rep, _ = real
    from datasets import concatenate_datasets
    pool = concatenate_datasets([dsd["train"], dsd["validation"]])
    is_k = np.array([s == "kermany" for s in pool["source"]])
    h, m = _hashes(pool)
    nearest = np.minimum(_min_dist(h[~is_k], h[is_k]), _min_dist(m[~is_k], h[is_k]))
    assert (~is_k).sum() > 0 and nearest.min() > DEFAULT_NEAR_THRESHOLD
    # and the Skytells images that were re-published Kermany copies were dropped, not kept
    dropped = [d for d in rep["dropped"] if d["image"].startswith("skytells")]
    assert len(dropped) > 2500


def test_report_numbers(real):
    dsd, rep, _ = real
    assert rep["leak_check"]["passed"]
    assert rep["threshold_study"]["different_patient_pairs_within_threshold"] == 0
    for s in dsd:
        assert rep["splits"][s]["images"] == len(dsd[s])
    assert abs(len(dsd["validation"]) / (len(dsd["train"]) + len(dsd["validation"])) - 0.15) < 0.03
