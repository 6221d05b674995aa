"""Unit tests for the source readers (dataset_scripts/sources.py) and the label table
(modeling/labels.py). Readers never decode pixels, so the planted "images" are a few bytes each."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataset_scripts.sources import (
    KERMANY_LICENSE,
    SourceError,
    kermany_patient_and_label,
    parse_source_spec,
    read_folders,
    read_kermany,
    read_manifest,
    read_source,
)
from modeling.labels import (
    BACTERIAL,
    LABEL2ID,
    LABELS,
    NORMAL,
    VIRAL,
    accepted_label_names,
    parse_label,
)

MIT_TEXT = """MIT License

Copyright (c) 2020 Someone

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction...
"""


def touch(path: Path, data: bytes = b"\xff\xd8not-decoded") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- kermany_patient_and_label ---------------------------------------------------------------------


@pytest.mark.parametrize("name, patient", [
    ("IM-0011-0001.jpeg", "kermany:IM-0011"),
    ("IM-0011-0001-0002.jpeg", "kermany:IM-0011"),
    ("NORMAL2-IM-1427-0001.jpeg", "kermany:NORMAL2-IM-1427"),
    ("im-0011-0001.jpeg", "kermany:IM-0011"),  # case-insensitive, upper-cased id
])
def test_kermany_normal_names(name, patient):
    assert kermany_patient_and_label("NORMAL", name) == (patient, NORMAL)


def test_kermany_normal_unparseable_name_keeps_label_without_patient():
    assert kermany_patient_and_label("NORMAL", "scan.jpeg") == (None, NORMAL)


@pytest.mark.parametrize("name, expected", [
    ("person1_bacteria_1.jpeg", ("kermany:person1", BACTERIAL)),
    ("person1_virus_6.jpeg", ("kermany:person1", VIRAL)),
    ("person447_virus_921_1.jpeg", ("kermany:person447", VIRAL)),
    ("person1000_bacteria_2931.jpeg", ("kermany:person1000", BACTERIAL)),
    ("Person12_Virus_3.jpeg", ("kermany:person12", VIRAL)),  # case-insensitive, lower-cased id
])
def test_kermany_pneumonia_names(name, expected):
    assert kermany_patient_and_label("PNEUMONIA", name) == expected


def test_kermany_bacteria_and_virus_images_of_one_person_share_the_patient():
    pb, lb = kermany_patient_and_label("PNEUMONIA", "person1_bacteria_1.jpeg")
    pv, lv = kermany_patient_and_label("PNEUMONIA", "person1_virus_6.jpeg")
    assert pb == pv == "kermany:person1"
    assert (lb, lv) == (BACTERIAL, VIRAL)


@pytest.mark.parametrize("name", ["person1_1.jpeg", "IM-0001-0001.jpeg", "person1_fungus_2.jpeg",
                                  "person_bacteria_1.jpeg", "xperson1_bacteria_1.jpeg"])
def test_kermany_pneumonia_name_without_bacteria_or_virus(name):
    assert kermany_patient_and_label("PNEUMONIA", name) == (None, None)


# --- read_kermany ----------------------------------------------------------------------------------


@pytest.fixture
def kermany_root(tmp_path) -> Path:
    """tmp/kermany/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/... (plus a note and a bad name)."""
    base = tmp_path / "kermany" / "chest_xray"
    for rel in ["train/NORMAL/IM-0001-0001.jpeg", "train/PNEUMONIA/person1_bacteria_1.jpeg",
                "train/PNEUMONIA/person1_virus_2.jpeg", "val/NORMAL/NORMAL2-IM-0002-0001.jpeg",
                "val/PNEUMONIA/person2_bacteria_3.jpeg", "test/NORMAL/IM-0003-0001-0002.jpeg",
                "test/PNEUMONIA/person3_virus_4.jpeg"]:
        touch(base / rel)
    (base / "train/PNEUMONIA/notes.txt").write_text("not an image")
    touch(base / "train/PNEUMONIA/odd_name.jpeg")
    return tmp_path / "kermany"


EXPECTED_KERMANY = {
    # source path under chest_xray/ -> (label, patient, split)
    "train/NORMAL/IM-0001-0001.jpeg": (NORMAL, "kermany:IM-0001", "train"),
    "train/PNEUMONIA/person1_bacteria_1.jpeg": (BACTERIAL, "kermany:person1", "train"),
    "train/PNEUMONIA/person1_virus_2.jpeg": (VIRAL, "kermany:person1", "train"),
    "val/NORMAL/NORMAL2-IM-0002-0001.jpeg": (NORMAL, "kermany:NORMAL2-IM-0002", "val"),
    "val/PNEUMONIA/person2_bacteria_3.jpeg": (BACTERIAL, "kermany:person2", "val"),
    "test/NORMAL/IM-0003-0001-0002.jpeg": (NORMAL, "kermany:IM-0003", "test"),
    "test/PNEUMONIA/person3_virus_4.jpeg": (VIRAL, "kermany:person3", "test"),
}


@pytest.mark.parametrize("layout", ["parent_of_chest_xray", "chest_xray_itself"])
def test_read_kermany_both_layouts(kermany_root, layout):
    root = kermany_root if layout == "parent_of_chest_xray" else kermany_root / "chest_xray"
    prefix = "chest_xray/" if layout == "parent_of_chest_xray" else ""
    listing = read_kermany(root, exclude=[])

    got = {r.source_path: (r.label, r.patient_id, r.official_split) for r in listing.records}
    assert got == {prefix + k: v for k, v in EXPECTED_KERMANY.items()}
    for r in listing.records:
        assert r.path == root / r.source_path
        assert r.source == "kermany" and r.source_kind == "kermany"
        assert r.license == KERMANY_LICENSE == "cc-by-4.0"
        assert r.is_official_test == (r.official_split == "test")
    assert sum(r.is_official_test for r in listing.records) == 2

    ignored = {i["path"]: i["reason"] for i in listing.ignored}
    assert ignored == {
        prefix + "train/PNEUMONIA/notes.txt": "not an image file name",
        prefix + "train/PNEUMONIA/odd_name.jpeg": "PNEUMONIA file name has neither _bacteria_ nor _virus_",
    }


def test_read_kermany_exclude_patterns(kermany_root):
    listing = read_kermany(kermany_root, exclude=["chest_xray/val/*", "*/person1_*", "*.txt"])
    got = {r.source_path for r in listing.records}
    assert got == {"chest_xray/" + k for k in EXPECTED_KERMANY
                   if not k.startswith("val/") and "person1_" not in k}
    # excluded files are skipped, not reported as ignored
    assert [i["path"] for i in listing.ignored] == ["chest_xray/train/PNEUMONIA/odd_name.jpeg"]


def test_read_kermany_exclude_plain_directory_prefix(kermany_root):
    listing = read_kermany(kermany_root / "chest_xray", exclude=["test"])
    assert {r.official_split for r in listing.records} == {"train", "val"}


def test_read_kermany_missing_layout_raises(tmp_path):
    touch(tmp_path / "NORMAL" / "IM-0001-0001.jpeg")
    with pytest.raises(SourceError, match="chest_xray"):
        read_kermany(tmp_path, exclude=[])


def test_read_kermany_partial_layout(tmp_path):
    """Only a test split (as when one downloads the test set alone) still reads."""
    touch(tmp_path / "test/PNEUMONIA/person9_virus_9.jpeg")
    listing = read_kermany(tmp_path, exclude=[])
    assert [(r.source_path, r.is_official_test) for r in listing.records] == [
        ("test/PNEUMONIA/person9_virus_9.jpeg", True)]


# --- read_folders ----------------------------------------------------------------------------------


@pytest.fixture
def folders_root(tmp_path) -> Path:
    root = tmp_path / "skytells"
    touch(root / "Train/Normal/n1.jpeg")
    touch(root / "Train/Normal/N2.PNG")  # upper-case extension is an image too
    touch(root / "Train/BacterialPneumonia/b1.png")
    touch(root / "Val/COVID-19/c1.jpg")
    touch(root / "Aug/Oversampled/ViralPneumonia/v1.png")
    touch(root / "Test/NORMAL/n3.jpeg")
    touch(root / "Test/viral pneumonia/v2.jpeg")
    (root / "Train/Normal/desc.txt").write_text("a description")
    (root / "LICENSE").write_text(MIT_TEXT)
    (root / "README.md").write_text("# readme at the root is expected, not reported")
    return root


EXPECTED_FOLDERS = {
    "Train/Normal/n1.jpeg": NORMAL,
    "Train/Normal/N2.PNG": NORMAL,
    "Train/BacterialPneumonia/b1.png": BACTERIAL,
    "Val/COVID-19/c1.jpg": VIRAL,
    "Aug/Oversampled/ViralPneumonia/v1.png": VIRAL,
    "Test/NORMAL/n3.jpeg": NORMAL,
    "Test/viral pneumonia/v2.jpeg": VIRAL,
}


def test_read_folders_nested_containers_and_aliases(folders_root):
    listing = read_folders(folders_root, exclude=[])
    assert {r.source_path: r.label for r in listing.records} == EXPECTED_FOLDERS
    for r in listing.records:
        assert r.path == folders_root / r.source_path
        assert r.source == "skytells" and r.source_kind == "folders"
        assert r.license == "mit"
        assert r.patient_id is None and r.official_split is None
        assert not r.is_official_test  # a folder called "Test" is not the official test split
    assert listing.ignored == [{"path": "Train/Normal/desc.txt", "reason": "not an image file name"}]


def test_read_folders_exclude(folders_root):
    listing = read_folders(folders_root, exclude=["Train/*"])
    assert {r.source_path for r in listing.records} == {k for k in EXPECTED_FOLDERS if not k.startswith("Train/")}
    assert listing.ignored == []  # Train/Normal/desc.txt is excluded too


def test_read_folders_exclude_does_not_match_a_longer_folder_name(folders_root):
    touch(folders_root / "TrainData/Normal/t.jpeg")
    listing = read_folders(folders_root, exclude=["Train/*"])
    assert "TrainData/Normal/t.jpeg" in {r.source_path for r in listing.records}


def test_read_folders_unknown_class_folder_raises_with_names(folders_root):
    touch(folders_root / "Train/PNEUMONIA/p1.jpeg")
    touch(folders_root / "Train/PNEUMONIA/p2.jpeg")
    touch(folders_root / "Extra/Tuberculosis/t1.png")
    with pytest.raises(SourceError) as exc:
        read_folders(folders_root, exclude=[])
    msg = str(exc.value)
    assert "'Extra/Tuberculosis' (1 images)" in msg
    assert "'Train/PNEUMONIA' (2 images)" in msg
    assert ", ".join(accepted_label_names()) in msg
    for name in ("normal", "bacterialpneumonia", "viral_pneumonia", "covid19"):
        assert name in msg
    assert "--exclude" in msg


def test_read_folders_unknown_class_folder_can_be_excluded(folders_root):
    touch(folders_root / "Train/PNEUMONIA/p1.jpeg")
    listing = read_folders(folders_root, exclude=["Train/PNEUMONIA"])
    assert {r.source_path: r.label for r in listing.records} == EXPECTED_FOLDERS


def test_read_folders_image_at_root_raises(folders_root):
    touch(folders_root / "stray.jpeg")
    with pytest.raises(SourceError, match=r"stray\.jpeg is not inside a class folder"):
        read_folders(folders_root, exclude=[])


@pytest.mark.parametrize("name, text, expected", [
    (None, None, "unknown"),
    ("LICENSE", MIT_TEXT, "mit"),
    ("LICENSE.txt", "Permission is hereby granted, free of charge, to any person", "mit"),
    ("LICENSE.md", "                                 Apache License\n Version 2.0, January 2004", "apache-2.0"),
    ("LICENCE", "Creative Commons Attribution 4.0 International Public License", "cc-by-4.0"),
    ("LICENSE", "All rights reserved.", "other"),
])
def test_read_folders_license_detection(tmp_path, name, text, expected):
    root = tmp_path / "src"
    touch(root / "Normal/a.png")
    if name:
        (root / name).write_text(text)
    listing = read_folders(root, exclude=[])
    assert [r.license for r in listing.records] == [expected]


# --- read_manifest ---------------------------------------------------------------------------------


@pytest.fixture
def manifest_dir(tmp_path) -> Path:
    d = tmp_path / "contrib-2024"
    for name in ("a.png", "b.jpeg", "c.png", "d.png", "e.png"):
        touch(d / "imgs" / name)
    (d / "manifest.csv").write_text(
        "path,label,patient_id,license,contributor,note,source\n"
        "imgs/a.png,Normal,p1,cc-by-4.0,alice,first,\n"          # line 2
        "imgs/b.jpeg,COVID-19,,,,,\n"                             # line 3
        "imgs/c.png,pneumonia,p2,,,,\n"                           # line 4: ambiguous label
        "imgs/missing.png,normal,,,,,\n"                          # line 5: no such file
        "imgs/d.png,BacterialPneumonia,p9,mit,bob,,otherhub\n"    # line 6: explicit source
        ",normal,,,,,\n"                                          # line 7: empty path
        "imgs/e.png, viral pneumonia ,p1,,,,\n"                   # line 8: same patient as line 2
    )
    return d


def _check_manifest_listing(listing, d: Path):
    by_path = {r.source_path: r for r in listing.records}
    assert set(by_path) == {"imgs/a.png", "imgs/b.jpeg", "imgs/d.png", "imgs/e.png"}
    a, b, dd, e = by_path["imgs/a.png"], by_path["imgs/b.jpeg"], by_path["imgs/d.png"], by_path["imgs/e.png"]
    assert a.path == (d / "imgs/a.png").resolve()
    assert (a.label, a.source, a.patient_id, a.license, a.contributor, a.note) == (
        NORMAL, "contrib-2024", "contrib-2024:p1", "cc-by-4.0", "alice", "first")
    assert (b.label, b.source, b.patient_id, b.license, b.contributor) == (
        VIRAL, "contrib-2024", None, "unknown", "")
    assert (dd.label, dd.source, dd.patient_id, dd.license, dd.contributor) == (
        BACTERIAL, "otherhub", "otherhub:p9", "mit", "bob")
    assert (e.label, e.patient_id) == (VIRAL, "contrib-2024:p1")
    for r in listing.records:
        assert r.source_kind == "manifest" and r.official_split is None and not r.is_official_test

    ignored = {i["path"]: i["reason"] for i in listing.ignored}
    assert set(ignored) == {"imgs/c.png", "imgs/missing.png", "manifest.csv:7"}
    assert ignored["imgs/c.png"] == ("unknown label 'pneumonia' (line 4); accepted: "
                                     "normal, bacterial_pneumonia, viral_pneumonia")
    assert ignored["imgs/missing.png"] == "file listed in manifest not found (line 5)"
    assert ignored["manifest.csv:7"] == "empty path"


def test_read_manifest_csv_path(manifest_dir):
    _check_manifest_listing(read_manifest(manifest_dir / "manifest.csv", exclude=[]), manifest_dir)


def test_read_manifest_directory_resolves_to_manifest_csv(manifest_dir):
    _check_manifest_listing(read_manifest(manifest_dir, exclude=[]), manifest_dir)


def test_read_source_manifest_spec(manifest_dir):
    _check_manifest_listing(read_source(f"manifest:{manifest_dir}"), manifest_dir)


def test_read_manifest_paths_are_relative_to_the_csv_folder_not_the_cwd(manifest_dir, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    listing = read_manifest(manifest_dir / "manifest.csv", exclude=[])
    assert len(listing.records) == 4
    assert all(r.path.is_file() and r.path.parent == (manifest_dir / "imgs").resolve() for r in listing.records)


def test_read_manifest_exclude(manifest_dir):
    listing = read_manifest(manifest_dir, exclude=["imgs/a.*", "imgs/c.png"])
    assert {r.source_path for r in listing.records} == {"imgs/b.jpeg", "imgs/d.png", "imgs/e.png"}
    assert {i["path"] for i in listing.ignored} == {"imgs/missing.png", "manifest.csv:7"}


def test_read_manifest_minimal_columns_and_bom(tmp_path):
    d = tmp_path / "m"
    touch(d / "x.png")
    (d / "manifest.csv").write_bytes("\ufeffpath,label\nx.png,bacterial\n".encode("utf-8"))
    listing = read_manifest(d, exclude=[])
    assert [(r.source_path, r.label, r.source, r.patient_id, r.license) for r in listing.records] == [
        ("x.png", BACTERIAL, "m", None, "unknown")]
    assert listing.ignored == []


@pytest.mark.parametrize("header", ["path,patient_id\n", "file,label\n", ""])
def test_read_manifest_missing_required_column_raises(tmp_path, header):
    d = tmp_path / "m"
    d.mkdir()
    (d / "manifest.csv").write_text(header + ("x.png,p1\n" if header else ""))
    with pytest.raises(SourceError, match="missing column"):
        read_manifest(d / "manifest.csv", exclude=[])


def test_read_source_manifest_directory_without_manifest_csv_is_a_source_error(tmp_path):
    d = tmp_path / "contrib"
    touch(d / "imgs/a.png")
    with pytest.raises(SourceError):
        read_source(f"manifest:{d}")


# --- parse_source_spec -----------------------------------------------------------------------------


def test_parse_source_spec_ok(tmp_path):
    assert parse_source_spec(f"folders:{tmp_path}") == ("folders", tmp_path.resolve())
    assert parse_source_spec(f"kermany:{tmp_path}/./") == ("kermany", tmp_path.resolve())


@pytest.mark.parametrize("spec", ["nosuchkind:{p}", "{p}", "Kermany:{p}", ":{p}", "kermany:{p}/missing"])
def test_parse_source_spec_errors(tmp_path, spec):
    with pytest.raises(SourceError):
        parse_source_spec(spec.format(p=tmp_path))


def test_parse_source_spec_error_names_the_kinds(tmp_path):
    with pytest.raises(SourceError, match=r"\['contributions', 'folders', 'kermany', 'manifest'\]"):
        parse_source_spec(f"csv:{tmp_path}")


@pytest.mark.parametrize("spec", ["folders:", "kermany:", "manifest:"])
def test_parse_source_spec_empty_path_is_an_error(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError):
        parse_source_spec(spec)


# --- modeling.labels -------------------------------------------------------------------------------


def test_labels_order_is_fixed():
    assert LABELS == ("normal", "bacterial_pneumonia", "viral_pneumonia")
    assert (NORMAL, BACTERIAL, VIRAL) == LABELS
    assert LABEL2ID == {"normal": 0, "bacterial_pneumonia": 1, "viral_pneumonia": 2}


@pytest.mark.parametrize("name, label", [
    ("normal", NORMAL), ("NORMAL", NORMAL), ("Normal", NORMAL), ("No Finding", NORMAL), ("healthy", NORMAL),
    ("bacterial_pneumonia", BACTERIAL), ("BacterialPneumonia", BACTERIAL), ("bacteria", BACTERIAL),
    ("Pneumonia-Bacterial", BACTERIAL), ("bacterial", BACTERIAL),
    ("viral_pneumonia", VIRAL), ("ViralPneumonia", VIRAL), ("viral pneumonia", VIRAL), ("virus", VIRAL),
    ("PNEUMONIA_VIRAL", VIRAL), ("COVID-19", VIRAL), ("covid", VIRAL), ("SARS-CoV-2", VIRAL),
    ("SARS", VIRAL), ("MERS", VIRAL), ("  Viral  ", VIRAL),
])
def test_parse_label_aliases(name, label):
    assert parse_label(name) == label


@pytest.mark.parametrize("name", ["pneumonia", "PNEUMONIA", "Pneumonia", "tuberculosis", "", "abnormal",
                                  "covid-20", "lung opacity"])
def test_parse_label_unknown_or_ambiguous_is_none(name):
    assert parse_label(name) is None


def test_every_label_parses_to_itself_and_is_accepted():
    names = accepted_label_names()
    assert names == sorted(names)
    for label in LABELS:
        assert parse_label(label) == label
        assert label in names
    assert "pneumonia" not in names
