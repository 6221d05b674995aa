"""Unit tests for fingerprinting, near-duplicate search, clustering, the merge policy and the
patient-grouped validation split (dataset_scripts/fingerprint.py, dedup.py, splits.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path
from dataset_scripts import fingerprint as fpmod
from dataset_scripts.dedup import (
    DEFAULT_NEAR_THRESHOLD,
    duplicate_clusters,
    hamming_matrix,
    hex_to_words,
    near_pairs,
    resolve_clusters,
)
from dataset_scripts.fingerprint import Fingerprint, FingerprintCache, fingerprint_bytes, fingerprint_paths
from dataset_scripts.sources import Record
from dataset_scripts.splits import patient_groups, validation_split
from modeling.labels import BACTERIAL, NORMAL, VIRAL
from synthetic import jpeg_bytes, xray_like

T = DEFAULT_NEAR_THRESHOLD
BILINEAR = Image.Resampling.BILINEAR
MIRROR = Image.Transpose.FLIP_LEFT_RIGHT


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def distance(a: Fingerprint, b: Fingerprint) -> int | None:
    """near_pairs' distance between two fingerprints (None when above 256, i.e. never)."""
    return near_pairs([a, b], 256).get((0, 1))


# --- hash robustness on synthetic images -----------------------------------------------------------

SEEDS = (0, 1, 2)


def _resize(img, f):
    return img.resize((round(img.width * f), round(img.height * f)), BILINEAR)


NEAR_COPIES = {
    "resize_0.5x": lambda img: png_bytes(_resize(img, 0.5)),
    "resize_1.7x": lambda img: png_bytes(_resize(img, 1.7)),
    "jpeg_q50": lambda img: jpeg_bytes(img, quality=50),
    "mirrored": lambda img: png_bytes(img.transpose(MIRROR)),
    "rot_3": lambda img: png_bytes(img.rotate(3, resample=BILINEAR)),
    "rot_5": lambda img: png_bytes(img.rotate(5, resample=BILINEAR)),
    "rot_7": lambda img: png_bytes(img.rotate(7, resample=BILINEAR)),
    "rot_10": lambda img: png_bytes(img.rotate(10, resample=BILINEAR)),
    "rot_-3": lambda img: png_bytes(img.rotate(-3, resample=BILINEAR)),
    "rot_-7": lambda img: png_bytes(img.rotate(-7, resample=BILINEAR)),
    "mirrored_rot_5": lambda img: png_bytes(img.transpose(MIRROR).rotate(5, resample=BILINEAR)),
}


@pytest.fixture(scope="module")
def originals():
    return {s: (xray_like(s), fingerprint_bytes(png_bytes(xray_like(s)))) for s in SEEDS}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", list(NEAR_COPIES))
def test_near_copy_within_default_threshold(originals, seed, kind):
    img, orig = originals[seed]
    copy = fingerprint_bytes(NEAR_COPIES[kind](img))
    assert copy.ok
    pairs = near_pairs([orig, copy], T)
    assert list(pairs) == [(0, 1)], f"{kind} of seed {seed}: distance {distance(orig, copy)} > {T}"
    assert pairs[(0, 1)] <= T
    # symmetric: the order of the two fingerprints does not matter
    assert near_pairs([copy, orig], T) == pairs


def test_png_resave_of_jpeg_is_an_exact_pixel_duplicate():
    jpg = jpeg_bytes(xray_like(5), quality=85)
    png = png_bytes(Image.open(io.BytesIO(jpg)))
    a, b = fingerprint_bytes(jpg), fingerprint_bytes(png)
    assert (a.format, b.format) == ("JPEG", "PNG")
    assert a.file_sha256 != b.file_sha256
    assert a.pixel_sha256 == b.pixel_sha256
    assert a.phash == b.phash and a.variants == b.variants
    assert near_pairs([a, b], T) == {(0, 1): 0}
    clusters, _, exact = duplicate_clusters([a, b], T)
    assert clusters == [[0, 1]] and exact == 1


def test_rgb_version_of_gray_image_is_an_exact_pixel_duplicate():
    img = xray_like(6)
    gray, rgb = fingerprint_bytes(png_bytes(img)), fingerprint_bytes(png_bytes(img.convert("RGB")))
    assert (gray.mode, rgb.mode) == ("L", "RGB")
    assert gray.pixel_sha256 == rgb.pixel_sha256
    assert near_pairs([gray, rgb], T) == {(0, 1): 0}


def test_resized_copy_is_not_an_exact_pixel_duplicate(originals):
    img, orig = originals[0]
    small = fingerprint_bytes(png_bytes(_resize(img, 0.5)))
    assert small.pixel_sha256 != orig.pixel_sha256
    assert (small.width, small.height) == (128, 128)


def test_distinct_images_are_far_apart():
    fps = [fingerprint_bytes(png_bytes(xray_like(seed))) for seed in range(100, 120)]
    assert len({f.pixel_sha256 for f in fps}) == 20
    assert near_pairs(fps, T) == {}
    assert near_pairs(fps, 3 * T) == {}
    all_pairs = near_pairs(fps, 256)
    assert len(all_pairs) == 20 * 19 // 2
    assert min(all_pairs.values()) > 3 * T
    clusters, pairs, exact = duplicate_clusters(fps, T)
    assert clusters == [[i] for i in range(20)] and pairs == {} and exact == 0


def test_fingerprint_shape():
    f = fingerprint_bytes(png_bytes(xray_like(9)))
    assert f.ok and f.error_reason == ""
    assert (f.width, f.height, f.format, f.mode) == (256, 256, "PNG", "L")
    assert len(f.phash) == 64 and all(len(v) == 64 for v in f.variants)
    assert len(f.variants) == 1 + 2 * len(fpmod.ROTATIONS)  # mirror, then rotations of both
    assert len(f.pixel_sha256) == 64 and len(f.file_sha256) == 64


# --- hash robustness on real Kermany images (skipped without ../shared) ----------------------------


@pytest.fixture(scope="module")
def kermany_samples():
    train = shared_path("data", "kermany", "chest_xray", "train")
    files = sorted((train / "NORMAL").glob("*.jpeg"))[:3] + sorted((train / "PNEUMONIA").glob("*.jpeg"))[:3]
    if len(files) < 6:
        pytest.skip(f"too few Kermany images under {train}")
    from modeling.image_io import load_image

    return [(f.name, load_image(f.read_bytes()), fingerprint_bytes(f.read_bytes())) for f in files]


@pytest.mark.parametrize("kind", ["rot_3", "rot_7", "resize_0.6x"])
def test_real_images_near_copies_matched(kermany_samples, kind):
    for name, img, orig in kermany_samples:
        if kind == "resize_0.6x":
            copy_img = _resize(img, 0.6)
        else:
            copy_img = img.rotate(int(kind.split("_")[1]), resample=BILINEAR)
        copy = fingerprint_bytes(jpeg_bytes(copy_img, quality=90))
        d = distance(orig, copy)
        assert d is not None and d <= T, f"{kind} of {name}: distance {d} > {T}"


def test_real_images_distinct_images_not_matched(kermany_samples):
    fps = [f for _, _, f in kermany_samples]
    assert near_pairs(fps, T) == {}


# --- hamming_matrix / hex_to_words -----------------------------------------------------------------


def test_hamming_matrix_matches_popcount_reference():
    rng = np.random.default_rng(0)
    a = rng.integers(0, np.iinfo(np.uint64).max, size=(7, 4), dtype=np.uint64, endpoint=True)
    b = rng.integers(0, np.iinfo(np.uint64).max, size=(5, 4), dtype=np.uint64, endpoint=True)
    b[0] = a[3]  # one identical row
    b[1] = ~a[0]  # one complementary row
    d = hamming_matrix(a, b)
    assert d.shape == (7, 5)
    ref = [[sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(ra, rb)) for rb in b] for ra in a]
    assert d.tolist() == ref
    assert d[3, 0] == 0 and d[0, 1] == 256


def test_hamming_matrix_all_ones_and_zeros():
    ones = np.full((1, 4), np.iinfo(np.uint64).max, dtype=np.uint64)
    zeros = np.zeros((2, 4), dtype=np.uint64)
    assert hamming_matrix(ones, zeros).tolist() == [[256, 256]]
    assert hamming_matrix(zeros, zeros).tolist() == [[0, 0], [0, 0]]


def _words_to_hex(row) -> str:
    return "".join(f"{int(w):016x}" for w in row)


def test_hex_to_words_round_trip():
    rng = np.random.default_rng(1)
    hexes = [rng.bytes(32).hex() for _ in range(10)] + ["0" * 64, "f" * 64]
    words = hex_to_words(hexes)
    assert words.dtype == np.uint64 and words.shape == (12, 4)
    assert [_words_to_hex(r) for r in words] == hexes


def test_hex_to_words_word_order():
    h = "0000000000000001" "00000000000000ff" "8000000000000000" "ffffffffffffffff"
    assert hex_to_words([h]).tolist() == [[1, 255, 1 << 63, (1 << 64) - 1]]


def test_hex_to_words_matches_bit_distance():
    a = (1 << 255) | 0b1011
    b = 0b0001
    d = hamming_matrix(hex_to_words([f"{a:064x}"]), hex_to_words([f"{b:064x}"]))
    assert d.tolist() == [[3]]


# --- hand-made fingerprints ------------------------------------------------------------------------

_rng = np.random.default_rng(1234)


def rand256() -> int:
    return int.from_bytes(_rng.bytes(32), "big")


def hx(n: int) -> str:
    return f"{n:064x}"


def flip(n: int, bits: range) -> int:
    for b in bits:
        n ^= 1 << b
    return n


def make_fp(phash: int, pixel: str | None = None, variants: list[int] | None = None,
            w: int = 100, h: int = 100, name: str = "") -> Fingerprint:
    return Fingerprint(
        file_sha256=f"file-{name}" if name else f"file-{phash:x}", ok=True, width=w, height=h,
        pixel_sha256=pixel or f"pix-{phash:x}", phash=hx(phash),
        variants=[hx(v) for v in (variants if variants is not None else [rand256()])],
    )


def test_near_pairs_chain_and_variants():
    a = rand256()
    b = flip(a, range(0, 10))    # 10 bits from a
    c = flip(b, range(10, 20))   # 10 bits from b, 20 from a
    x = rand256()                # unrelated, but one of its variants is 5 bits from a
    fps = [make_fp(a, variants=[rand256(), rand256()]), make_fp(b, variants=[rand256(), rand256()]),
           make_fp(c, variants=[rand256(), rand256()]), make_fp(x, variants=[rand256(), flip(a, range(100, 105))])]
    assert near_pairs(fps, 12) == {(0, 1): 10, (1, 2): 10, (0, 3): 5}
    # x's variant is also 15 bits from b (5 + 10) and 25 from c
    assert near_pairs(fps, 20) == {(0, 1): 10, (1, 2): 10, (0, 2): 20, (0, 3): 5, (1, 3): 15}
    assert near_pairs(fps, 25)[(2, 3)] == 25
    # the block size only changes how the work is cut, never the result
    assert near_pairs(fps, 20, block=1) == near_pairs(fps, 20, block=3) == near_pairs(fps, 20)
    assert near_pairs([], 20) == {}


def test_near_pairs_keeps_the_smallest_distance_over_variants():
    a = rand256()
    far_copy = flip(a, range(0, 9))
    fps = [make_fp(a, variants=[rand256() for _ in range(3)]),  # every fingerprint has as many variants
           make_fp(rand256(), variants=[far_copy, flip(a, range(50, 52)), rand256()])]
    assert near_pairs(fps, 24) == {(0, 1): 2}


def test_duplicate_clusters_chain_is_transitive():
    a = rand256()
    b, c = flip(a, range(0, 10)), flip(a, range(0, 20))
    d = rand256()
    fps = [make_fp(a), make_fp(b), make_fp(c), make_fp(d)]
    clusters, pairs, exact = duplicate_clusters(fps, 12)
    assert clusters == [[0, 1, 2], [3]]  # A~B and B~C although A-C is 20 bits
    assert pairs == {(0, 1): 10, (1, 2): 10}
    assert exact == 0


def test_duplicate_clusters_counts_exact_links():
    p, q, r = rand256(), rand256(), rand256()
    fps = [
        make_fp(p, pixel="same"), make_fp(q), make_fp(r, pixel="same"),   # 0, 2: pixels only
        make_fp(rand256(), pixel="same"),                                 # 3: third copy, 2nd link
        make_fp(rand256(), pixel="other"), make_fp(rand256(), pixel="other"),  # 4, 5
    ]
    clusters, pairs, exact = duplicate_clusters(fps, T)
    assert clusters == [[0, 2, 3], [1], [4, 5]]
    assert pairs == {}
    assert exact == 3


def test_duplicate_clusters_precomputed_pairs_filtered_to_threshold():
    a = rand256()
    fps = [make_fp(a), make_fp(flip(a, range(10))), make_fp(flip(a, range(10, 40)))]
    study = near_pairs(fps, 48)
    assert study == {(0, 1): 10, (0, 2): 30, (1, 2): 40}
    clusters, pairs, exact = duplicate_clusters(fps, T, pairs=study)
    assert clusters == [[0, 1], [2]]
    assert pairs == {(0, 1): 10}
    assert (clusters, pairs, exact) == duplicate_clusters(fps, T)


# --- resolve_clusters ------------------------------------------------------------------------------


def rec(source_path: str, label: str, source: str = "kermany", kind: str | None = None,
        split: str | None = None, patient: str | None = None) -> Record:
    kind = kind or ("kermany" if source == "kermany" else "folders")
    if kind == "kermany" and split is None:
        split = source_path.split("/")[0]
    return Record(path=Path("/data") / source / source_path, label=label, source=source, source_kind=kind,
                  source_path=source_path, patient_id=patient, official_split=split)


def sized(w: int, h: int) -> Fingerprint:
    return make_fp(rand256(), w=w, h=h)


def test_resolve_test_member_keeps_test_drops_rest_and_lists_conflict():
    records = [
        rec("train/NORMAL/IM-0001-0001.jpeg", NORMAL),                              # 0
        rec("test/NORMAL/IM-0002-0001.jpeg", NORMAL),                               # 1 official test
        rec("Normal/copy.png", NORMAL, source="other"),                             # 2
        rec("BacterialPneumonia/copy.png", BACTERIAL, source="other"),              # 3 other label
        rec("Normal/alone.png", NORMAL, source="other"),                            # 4 singleton
    ]
    fps = [sized(100, 100), sized(50, 50), sized(400, 400), sized(400, 400), sized(10, 10)]
    decisions, conflicts = resolve_clusters(records, fps, [[0, 1, 2, 3], [4]], ["kermany", "other"])
    test_ref = "kermany:test/NORMAL/IM-0002-0001.jpeg"
    assert decisions[1].keep and decisions[1].reason == ""
    for i in (0, 2, 3):
        assert not decisions[i].keep
        assert decisions[i].reason == "copy of an official test image"
        assert decisions[i].duplicate_of == test_ref
    assert decisions[4].keep
    assert conflicts == [{
        "action": "includes an official test image: test kept, rest dropped",
        "members": [
            {"image": "kermany:train/NORMAL/IM-0001-0001.jpeg", "label": NORMAL},
            {"image": test_ref, "label": NORMAL},
            {"image": "other:Normal/copy.png", "label": NORMAL},
            {"image": "other:BacterialPneumonia/copy.png", "label": BACTERIAL},
        ],
    }]


def test_resolve_test_member_with_other_label_is_kept():
    records = [rec("test/PNEUMONIA/person1_virus_1.jpeg", VIRAL),
               rec("BacterialPneumonia/x.png", BACTERIAL, source="other")]
    decisions, conflicts = resolve_clusters(records, [sized(10, 10), sized(20, 20)], [[0, 1]], ["kermany", "other"])
    assert decisions[0].keep
    assert (decisions[1].keep, decisions[1].reason) == (False, "copy of an official test image")
    assert len(conflicts) == 1 and conflicts[0]["action"].startswith("includes an official test image")


def test_resolve_test_member_same_label_no_conflict_and_all_tests_kept():
    records = [rec("test/NORMAL/IM-0002-0001.jpeg", NORMAL), rec("test/NORMAL/IM-0001-0001.jpeg", NORMAL),
               rec("Normal/c.png", NORMAL, source="other")]
    decisions, conflicts = resolve_clusters(records, [sized(10, 10)] * 3, [[0, 1, 2]], ["kermany", "other"])
    assert [d.keep for d in decisions] == [True, True, False]
    # the representative of several test images is the preferred one (same size: smaller path)
    assert decisions[2].duplicate_of == "kermany:test/NORMAL/IM-0001-0001.jpeg"
    assert conflicts == []


def test_resolve_folder_named_test_is_not_official():
    records = [rec("test/Normal/a.png", NORMAL, source="other"), rec("train/NORMAL/IM-0001-0001.jpeg", NORMAL)]
    decisions, _ = resolve_clusters(records, [sized(10, 10)] * 2, [[0, 1]], ["other", "kermany"])
    assert [d.keep for d in decisions] == [False, True]
    assert decisions[0].reason == "duplicate"


def test_resolve_label_conflict_without_test_drops_all():
    records = [rec("train/NORMAL/IM-0001-0001.jpeg", NORMAL), rec("ViralPneumonia/v.png", VIRAL, source="other"),
               rec("Normal/n.png", NORMAL, source="other")]
    decisions, conflicts = resolve_clusters(records, [sized(10, 10)] * 3, [[0, 1, 2]], ["kermany", "other"])
    for d in decisions:
        assert (d.keep, d.reason, d.duplicate_of) == (False, "label conflict between copies", "")
    assert conflicts == [{"action": "dropped", "members": [
        {"image": "kermany:train/NORMAL/IM-0001-0001.jpeg", "label": NORMAL},
        {"image": "other:ViralPneumonia/v.png", "label": VIRAL},
        {"image": "other:Normal/n.png", "label": NORMAL},
    ]}]


def _kept(records, fps, order):
    decisions, conflicts = resolve_clusters(records, fps, [list(range(len(records)))], order)
    assert conflicts == []
    kept = [i for i, d in enumerate(decisions) if d.keep]
    assert len(kept) == 1
    ref = f"{records[kept[0]].source}:{records[kept[0]].source_path}"
    for i, d in enumerate(decisions):
        if i != kept[0]:
            assert (d.reason, d.duplicate_of) == ("duplicate", ref)
    return kept[0]


def test_resolve_preference_kermany_first():
    records = [rec("Normal/big.png", NORMAL, source="first"), rec("train/NORMAL/IM-0001-0001.jpeg", NORMAL)]
    # the folders source is listed first and its copy is larger: Kermany still wins
    assert _kept(records, [sized(1000, 1000), sized(10, 10)], ["first", "kermany"]) == 1


def test_resolve_preference_source_order():
    records = [rec("Normal/a.png", NORMAL, source="s1"), rec("Normal/b.png", NORMAL, source="s2")]
    fps = [sized(1000, 1000), sized(10, 10)]
    assert _kept(records, fps, ["s2", "s1"]) == 1
    assert _kept(records, fps, ["s1", "s2"]) == 0
    # a source missing from the order ranks after every listed one
    assert _kept(records, fps, ["s2"]) == 1


def test_resolve_preference_larger_image_then_path():
    records = [rec("Normal/a.png", NORMAL, source="s"), rec("Normal/b.png", NORMAL, source="s"),
               rec("Normal/c.png", NORMAL, source="s")]
    assert _kept(records, [sized(100, 100), sized(300, 200), sized(200, 300)], ["s"]) == 1  # tie on area: path
    assert _kept(records, [sized(100, 100), sized(300, 200), sized(301, 200)], ["s"]) == 2
    assert _kept(records, [sized(50, 50)] * 3, ["s"]) == 0


def test_resolve_singletons_and_multiple_clusters():
    records = [rec("Normal/a.png", NORMAL, source="s"), rec("Normal/b.png", NORMAL, source="s"),
               rec("Normal/c.png", NORMAL, source="s")]
    decisions, conflicts = resolve_clusters(records, [sized(10, 10)] * 3, [[0], [1], [2]], ["s"])
    assert all(d.keep for d in decisions) and conflicts == []


# --- patient_groups / validation_split -------------------------------------------------------------


def _prec(patient: str | None, label: str = NORMAL) -> Record:
    return Record(path=Path("/x"), label=label, source="s", source_kind="manifest", source_path="x",
                  patient_id=patient)


def test_patient_groups_same_patient_links():
    records = [_prec("s:pA"), _prec("s:pB"), _prec("s:pA"), _prec(None), _prec(None), _prec("other:pA")]
    groups = patient_groups(records, [[i] for i in range(6)])
    # pA within one source links; no id never links; another source's "pA" is another patient
    assert groups == [0, 1, 0, 3, 4, 5]


def test_patient_groups_cluster_links_and_transitivity():
    #        0      1      2      3     4      5      6     7
    pids = ["pA", "pB", "pA", None, "pC", "pB", None, "pC"]
    records = [_prec(p) for p in pids]
    clusters = [[0], [1], [2, 4], [3, 6], [5], [7]]
    groups = patient_groups(records, clusters)
    # {0,2} by pA, 2~4 by cluster, {4,7} by pC -> one group; {1,5} by pB; {3,6} by cluster
    assert groups == [0, 1, 0, 3, 0, 1, 3, 0]


def _pool(n_groups: int, per_group: int = 2):
    labels, groups = [], []
    for g in range(n_groups):
        for _ in range(per_group):
            labels.append((NORMAL, BACTERIAL, VIRAL)[g % 3])
            groups.append(g * per_group)  # group id = smallest member index, as patient_groups gives
    return labels, groups


def test_validation_split_grouped_fraction_and_deterministic():
    labels, groups = _pool(60)
    indices = list(range(len(labels)))
    val = validation_split(indices, labels, groups, 0.25, seed=0)
    assert val and val <= set(indices)
    val_groups = {groups[i] for i in val}
    train_groups = {groups[i] for i in indices if i not in val}
    assert val_groups.isdisjoint(train_groups)
    assert 0.15 <= len(val_groups) / 60 <= 0.35
    assert {labels[i] for i in val} == {NORMAL, BACTERIAL, VIRAL}  # stratified
    assert validation_split(indices, labels, groups, 0.25, seed=0) == val
    assert any(validation_split(indices, labels, groups, 0.25, seed=s) != val for s in (1, 2, 3))


def test_validation_split_subset_of_indices():
    labels, groups = _pool(40)
    indices = [i for i in range(len(labels)) if groups[i] % 10 != 0]  # leave some groups out (e.g. test)
    val = validation_split(indices, labels, groups, 0.2, seed=7)
    assert val and val <= set(indices)
    assert {groups[i] for i in val}.isdisjoint({groups[i] for i in indices if i not in val})


def test_validation_split_too_few_groups_raises():
    labels, groups = _pool(3, per_group=4)  # 3 groups, a 25% split needs 4 folds
    with pytest.raises(ValueError, match="only 3 patient groups"):
        validation_split(list(range(len(labels))), labels, groups, 0.25, seed=0)


def test_validation_split_empty_or_zero_fraction():
    labels, groups = _pool(10)
    assert validation_split([], labels, groups, 0.25, seed=0) == set()
    assert validation_split(list(range(len(labels))), labels, groups, 0.0, seed=0) == set()


# --- FingerprintCache / fingerprint_paths ----------------------------------------------------------


def test_fingerprint_cache_round_trip_and_persistence(tmp_path):
    good = fingerprint_bytes(png_bytes(xray_like(3)))
    bad = fingerprint_bytes(b"")
    assert not bad.ok and bad.error_reason == "empty"
    db = tmp_path / "sub" / "fp.sqlite"
    cache = FingerprintCache(db)
    assert cache.get_many([good.file_sha256]) == {}
    cache.put_many([good, bad])
    got = cache.get_many([good.file_sha256, bad.file_sha256, "0" * 64])
    assert got == {good.file_sha256: good, bad.file_sha256: bad}
    cache.close()
    cache = FingerprintCache(db)
    assert cache.get_many([good.file_sha256]) == {good.file_sha256: good}
    cache.close()


def test_fingerprint_cache_many_keys(tmp_path):
    cache = FingerprintCache(tmp_path / "fp.sqlite")
    fps = [Fingerprint(file_sha256=f"{i:064x}", ok=False, error_reason="empty") for i in range(1203)]
    cache.put_many(fps)
    got = cache.get_many([f.file_sha256 for f in fps])  # more than one 500-key chunk
    assert len(got) == 1203 and got[f"{1202:064x}"] == fps[1202]
    cache.close()


def test_fingerprint_cache_version_is_part_of_the_key(tmp_path, monkeypatch):
    f = fingerprint_bytes(png_bytes(xray_like(4)))
    cache = FingerprintCache(tmp_path / "fp.sqlite")
    cache.put_many([f])
    assert cache.get_many([f.file_sha256]) == {f.file_sha256: f}
    monkeypatch.setattr(fpmod, "FINGERPRINT_VERSION", fpmod.FINGERPRINT_VERSION + 1)
    assert cache.get_many([f.file_sha256]) == {}
    monkeypatch.undo()
    assert cache.get_many([f.file_sha256]) == {f.file_sha256: f}
    cache.close()


@pytest.fixture
def image_files(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.png").write_bytes(png_bytes(xray_like(20)))
    (d / "a_copy.png").write_bytes((d / "a.png").read_bytes())  # identical bytes: decoded once
    (d / "b.jpeg").write_bytes(jpeg_bytes(xray_like(21)))
    (d / "zero.jpeg").write_bytes(b"")
    return [d / "a.png", d / "a_copy.png", d / "b.jpeg", d / "zero.jpeg"]


def test_fingerprint_paths_with_cache(tmp_path, image_files):
    cache = FingerprintCache(tmp_path / "cache" / "fp.sqlite")
    first, stats = fingerprint_paths(image_files, cache, workers=1, progress=False)
    assert stats == {"from_cache": 0, "computed": 3}
    assert set(first) == set(image_files)
    a, a_copy, b, zero = (first[p] for p in image_files)
    assert a.ok and b.ok and a == a_copy
    assert (zero.ok, zero.error_reason) == (False, "empty")
    assert a.pixel_sha256 != b.pixel_sha256

    second, stats = fingerprint_paths(image_files, cache, workers=1, progress=False)
    assert stats == {"from_cache": 4, "computed": 0}
    assert second == first
    cache.close()


def test_fingerprint_paths_without_cache(image_files):
    fps, stats = fingerprint_paths(image_files, None, workers=1, progress=False)
    assert stats == {"from_cache": 0, "computed": 3}
    assert fps[image_files[3]].error_reason == "empty"
    assert fps[image_files[0]] == fingerprint_bytes(image_files[0].read_bytes())


def test_fingerprint_paths_new_file_only_computes_it(tmp_path, image_files):
    cache = FingerprintCache(tmp_path / "fp.sqlite")
    fingerprint_paths(image_files, cache, workers=1, progress=False)
    new = image_files[0].parent / "c.png"
    new.write_bytes(png_bytes(xray_like(22)))
    fps, stats = fingerprint_paths(image_files + [new], cache, workers=1, progress=False)
    assert stats == {"from_cache": 4, "computed": 1}
    assert fps[new].ok
    cache.close()
