"""dataset_scripts.contribute: every blocking and warning case with planted files, de-identification
(no PHI value in any output), the committed official test index, and a clean submission that goes
to a pull request on the local Hub server, is merged and lands in the next build."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from conftest import ROOT, shared_path
from dataset_scripts import contribute
from dataset_scripts.contribute import (
    TEST_INDEX, chest_xray_warnings, compute_test_index, main, read_test_index, validate, write_test_index,
)
from hub_server import run_python_json
from synthetic import jpeg_bytes, make_mini_sources, png_bomb_header, xray_like

PHI = {"PatientName": "Doe^Jane", "PatientID": "PID-12345", "PatientBirthDate": "19700101",
       "InstitutionName": "Saint Example Hospital", "AccessionNumber": "ACC-987",
       "ReferringPhysicianName": "House^Gregory", "StudyDate": "20240102"}
PHI_STRINGS = ["Doe^Jane", "Doe", "Jane", "PID-12345", "19700101", "Saint Example", "ACC-987", "House", "Gregory"]


def chest_like(seed: int, size: tuple[int, int] = (256, 256)) -> Image.Image:
    """A synthetic frontal-film stand-in: left-right symmetric structure (a mirrored smooth field)
    plus a little asymmetric texture, so it passes the frontal-chest screen; distinct seeds give
    unrelated images (far apart in phash)."""
    w, h = size
    half = np.asarray(xray_like(seed, (w // 2, h)), dtype=np.float64)
    sym = np.hstack([half, half[:, ::-1]])
    noise = np.asarray(xray_like(seed + 50_000, (w, h)), dtype=np.float64)
    return Image.fromarray(np.clip(0.85 * sym + 0.15 * noise, 0, 255).astype(np.uint8), mode="L")


def dicom_bytes(img: Image.Image, **tags) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    a = np.asarray(img, dtype=np.uint16) * 16  # 12-bit data
    ds.Rows, ds.Columns = a.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = a.astype("<u2").tobytes()
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.add_new(0x00091010, "LO", "private vendor note")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_submission(root: Path, rows: list[dict], files: dict[str, bytes | Image.Image] | None = None) -> Path:
    """Plant ``files`` (name -> bytes or image saved by extension) and a manifest of ``rows``
    (defaults: licence cc-by-4.0, contributor, patient id)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in (files or {}).items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Image.Image):
            content.save(p)
        else:
            p.write_bytes(content)
    cols = ["path", "label", "patient_id", "license", "contributor", "note"]
    with (root / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for i, r in enumerate(rows):
            w.writerow({"patient_id": f"pt{i}", "license": "cc-by-4.0", "contributor": "Test Clinic", "note": "",
                        **r})
    return root


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """Mini sources (tests/synthetic.py) and a test index of their official test split."""
    root = make_mini_sources(tmp_path_factory.mktemp("mini"))
    index = write_test_index(compute_test_index(root / "kermany"), tmp_path_factory.mktemp("idx") / "index.csv.gz")
    return root, index


@pytest.fixture(scope="module")
def mini_dataset(mini, tmp_path_factory):
    """The mini sources built into a dataset (save_to_disk folder) for --dataset."""
    from dataset_scripts.build import BuildConfig, build

    root, _ = mini
    out = tmp_path_factory.mktemp("ds") / "ds"
    build(BuildConfig(sources=[f"kermany:{root / 'kermany'}", f"folders:{root / 'other'}"], out=out,
                      val_fraction=0.25, cache_dir=None, workers=1, progress=False))
    return out


def by_line(report) -> dict[int, contribute.FileResult]:
    return {f.line: f for f in report.files}


def all_output_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


# --------------------------------------------------------------------------------------------------
# blocking cases
# --------------------------------------------------------------------------------------------------

def test_undecodable_and_unsafe_files_are_blocked(tmp_path, mini):
    _, index = mini
    outside = tmp_path / "outside.png"
    chest_like(1).save(outside)
    sub = write_submission(tmp_path / "sub", [
        {"path": "good.png", "label": "normal"},                     # 2
        {"path": "empty.jpeg", "label": "normal"},                   # 3
        {"path": "truncated.jpeg", "label": "normal"},               # 4
        {"path": "text.png", "label": "normal"},                     # 5
        {"path": "bomb.png", "label": "normal"},                     # 6
        {"path": "../outside.png", "label": "normal"},               # 7
        {"path": str(outside), "label": "normal"},                   # 8
        {"path": "link.png", "label": "normal"},                     # 9
        {"path": "missing.png", "label": "normal"},                  # 10
        {"path": "good.png", "label": "normal"},                     # 11: listed twice
    ], {"good.png": chest_like(2), "empty.jpeg": b"", "truncated.jpeg": jpeg_bytes(chest_like(3))[:1500],
        "text.png": b"this is not an image", "bomb.png": png_bomb_header()})
    (sub / "link.png").symlink_to(outside)
    report = validate(sub, test_index=index)
    f = by_line(report)
    assert f[2].status == "ok"
    expected = {3: "(empty)", 4: "(truncated)", 5: "(not_an_image)", 6: "(too_large)", 7: "'..'",
                8: "absolute", 9: "symbolic link", 10: "file not found", 11: "listed twice"}
    for line, needle in expected.items():
        assert f[line].status == "blocked", (line, f[line])
        assert any(needle in p for p in f[line].problems), (line, f[line].problems)
        assert f[line].clean_name == ""
    assert not report.ok and report.exit_code == 1
    # blocked files never reach the cleaned copy; the good one does
    clean = sub / "_clean"
    assert sorted(p.name for p in (clean / "images").iterdir()) == [f[2].clean_name.split("/")[1]]
    with (clean / "manifest.csv").open() as fh:
        assert [r["path"] for r in csv.DictReader(fh)] == [f[2].clean_name]


def test_labels_outside_the_three_classes_and_missing_licence_are_blocked(tmp_path, mini):
    _, index = mini
    sub = write_submission(tmp_path / "sub", [
        {"path": "a.png", "label": "PNEUMONIA"},          # ambiguous: bacterial or viral?
        {"path": "b.png", "label": "tuberculosis"},
        {"path": "c.png", "label": ""},
        {"path": "d.png", "label": "normal", "license": ""},
        {"path": "e.png", "label": "COVID-19"},           # an accepted spelling of viral
    ], {n: chest_like(10 + i) for i, n in enumerate(["a.png", "b.png", "c.png", "d.png", "e.png"])})
    f = by_line(validate(sub, test_index=index))
    for line in (2, 3, 4):
        assert f[line].status == "blocked" and "is not one of" in f[line].problems[0]
    assert f[5].status == "blocked" and f[5].problems == [
        "no licence (license column empty): we cannot redistribute without one"]
    assert f[6].status == "ok" and f[6].label == "viral_pneumonia"


def test_renamed_resized_reencoded_copy_of_a_test_image_is_blocked(tmp_path, mini):
    root, index = mini
    test_img = Image.open(root / "kermany/chest_xray/test/PNEUMONIA/person60_bacteria_12.jpeg")
    copy = test_img.resize((180, 180), Image.Resampling.LANCZOS)
    sub = write_submission(tmp_path / "sub", [
        {"path": "holiday_photo_17.jpg", "label": "bacterial"},
        {"path": "exact.png", "label": "normal"},              # same pixels, other label, other format
        {"path": "mirrored.png", "label": "bacterial"},
        {"path": "fine.png", "label": "normal"},
    ], {"holiday_photo_17.jpg": jpeg_bytes(copy, quality=70), "exact.png": test_img.convert("L"),
        "mirrored.png": test_img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "fine.png": chest_like(4)})
    report = validate(sub, test_index=index)  # no --dataset: the index alone must block it
    f = by_line(report)
    for line in (2, 3, 4):
        assert f[line].status == "blocked"
        assert "duplicate of official test image kermany-test:chest_xray/test/PNEUMONIA/person60_bacteria_12.jpeg" \
            in f[line].problems[0]
    assert f[3].matches[0]["kind"] == "exact" and f[2].matches[0]["kind"] == "near"
    assert f[5].status == "ok" and report.exit_code == 1


def test_copy_of_a_real_official_test_image_is_blocked_by_the_committed_index(tmp_path):
    kermany = shared_path("data", "kermany", "chest_xray", "test")
    src = kermany / "NORMAL" / "IM-0003-0001.jpeg"
    copy = Image.open(src).convert("L").resize((180, 180), Image.Resampling.BILINEAR)
    sub = write_submission(tmp_path / "sub", [{"path": "scan_0001.jpg", "label": "normal"}],
                           {"scan_0001.jpg": jpeg_bytes(copy, quality=80)})
    code = main(["validate", str(sub)])  # the CLI with its defaults: committed index, no --dataset
    assert code == 1
    f = validate(sub).files[0]
    assert f.status == "blocked" and "chest_xray/test/NORMAL/IM-0003-0001.jpeg" in f.problems[0]
    assert f.matches[0]["distance_bits"] <= 14


def test_committed_test_index_equals_a_fresh_computation(tmp_path):
    kermany = shared_path("data", "kermany")
    committed = read_test_index(TEST_INDEX)
    fresh = compute_test_index(kermany)
    assert len(committed) == 624
    assert committed == [{k: str(v) for k, v in r.items()} for r in fresh]
    # regenerating gives the same bytes (deterministic gzip), so a stale index shows up in git diff
    assert write_test_index(fresh, tmp_path / "i.csv.gz").read_bytes() == TEST_INDEX.read_bytes()
    assert TEST_INDEX.stat().st_size < 100_000


def test_existing_dataset_duplicates_are_dropped_and_label_conflicts_blocked(tmp_path, mini, mini_dataset):
    root, index = mini
    k = root / "kermany/chest_xray"
    train_normal = Image.open(k / "train/NORMAL/IM-0002-0001.jpeg")
    sub = write_submission(tmp_path / "sub", [
        {"path": "dup.jpg", "label": "normal"},                 # same label: dropped
        {"path": "conflict.jpg", "label": "viral"},             # same image, other label: blocked
        {"path": "new.png", "label": "normal"},
    ], {"dup.jpg": jpeg_bytes(train_normal.resize((200, 200)), 75), "conflict.jpg": jpeg_bytes(train_normal, 85),
        "new.png": chest_like(5)})
    report = validate(sub, dataset=str(mini_dataset), test_index=index)
    f = by_line(report)
    assert f[2].status == "dropped" and "already in the dataset" in f[2].dropped and "IM-0002-0001" in f[2].dropped
    assert f[3].status == "blocked" and "label conflict" in f[3].problems[0]
    assert f[4].status == "ok"
    # without --dataset the dataset is not known (they are train images, not test images): what is
    # left is the conflict between the two copies inside the submission
    g = by_line(validate(sub, test_index=index, write_output=False))
    assert not g[2].dropped and not g[2].matches and not g[3].matches
    assert "different labels on lines 2, 3" in g[3].problems[0]


def test_dataset_test_split_blocks_even_when_the_index_does_not_know_the_image(tmp_path, mini, mini_dataset):
    root, _ = mini
    empty_index = write_test_index([], tmp_path / "empty.csv.gz")
    t3 = Image.open(root / "kermany/chest_xray/test/PNEUMONIA/person61_virus_13.jpeg")
    sub = write_submission(tmp_path / "sub", [{"path": "x.jpg", "label": "viral"}],
                           {"x.jpg": jpeg_bytes(t3.resize((190, 190)))})
    f = validate(sub, dataset=str(mini_dataset), test_index=empty_index).files[0]
    assert f.status == "blocked" and "official test image dataset-test:" in f.problems[0]


def test_copies_inside_the_submission(tmp_path, mini):
    _, index = mini
    a, b = chest_like(20), chest_like(21)
    sub = write_submission(tmp_path / "sub", [
        {"path": "a1.png", "label": "normal"}, {"path": "a2.jpg", "label": "normal"},       # same: drop 2nd
        {"path": "b1.png", "label": "bacterial"}, {"path": "b2.jpg", "label": "viral"},     # conflict: block
    ], {"a1.png": a, "a2.jpg": jpeg_bytes(a.resize((200, 200))), "b1.png": b, "b2.jpg": jpeg_bytes(b)})
    report = validate(sub, test_index=index)
    f = by_line(report)
    assert f[2].status == "ok" and f[3].status == "dropped" and f[3].dropped == "duplicate of line 2 of this submission"
    assert f[4].status == f[5].status == "blocked"
    assert "different labels on lines 4, 5" in f[4].problems[0]


def test_burned_in_annotation_and_phi_in_the_note_are_blocked(tmp_path, mini):
    _, index = mini
    sub = write_submission(tmp_path / "sub", [
        {"path": "burned.dcm", "label": "normal"},
        {"path": "noted.dcm", "label": "normal", "note": "follow-up of jane, see chart"},
    ], {"burned.dcm": dicom_bytes(chest_like(30), BurnedInAnnotation="YES", **PHI),
        "noted.dcm": dicom_bytes(chest_like(31), **PHI)})
    report = validate(sub, test_index=index)
    f = by_line(report)
    assert f[2].status == "blocked" and "BurnedInAnnotation=YES" in f[2].problems[0]
    assert f[3].status == "blocked" and "note repeats a value" in f[3].problems[0]
    # the report says that, never what the value was
    text = json.dumps(report.to_dict()) + report.markdown()
    assert not any(s.lower() in text.lower() for s in PHI_STRINGS)


def test_missing_manifest_or_folder_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "nomanifest").mkdir()
    chest_like(1).save(tmp_path / "nomanifest" / "a.png")
    assert main(["validate", str(tmp_path / "nomanifest")]) == 2
    assert "no manifest.csv" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "nope")]) == 2
    (tmp_path / "badcols").mkdir()
    (tmp_path / "badcols" / "manifest.csv").write_text("file,class\na.png,normal\n")
    assert main(["validate", str(tmp_path / "badcols")]) == 2
    assert "missing column(s) ['label', 'path']" in capsys.readouterr().err
    empty = write_submission(tmp_path / "empty", [])
    assert main(["validate", str(empty)]) == 1  # a manifest listing nothing is a blocking problem


# --------------------------------------------------------------------------------------------------
# warnings
# --------------------------------------------------------------------------------------------------

def test_images_that_do_not_look_like_frontal_chest_films_are_warnings(tmp_path, mini):
    _, index = mini
    rgb = np.stack([np.asarray(chest_like(40))] * 3, axis=2).astype(np.int16)
    rgb[..., 0] += 60  # a reddish photo
    colour = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    # bright on one side, dark on the other (like a lateral film or a photo): not mirror-symmetric
    ramp = np.linspace(0, 140, 256)[None, :]
    lopsided = Image.fromarray((np.asarray(xray_like(42), dtype=np.float64) * 0.45 + ramp).astype(np.uint8), "L")
    sub = write_submission(tmp_path / "sub", [
        {"path": "colour.jpg", "label": "normal"},
        {"path": "wide.png", "label": "normal"},
        {"path": "texture.png", "label": "normal"},
        {"path": "flat.png", "label": "normal"},
        {"path": "lateral.dcm", "label": "normal"},
        {"path": "knee.dcm", "label": "normal"},
        {"path": "nopatient.png", "label": "normal", "patient_id": "", "license": "my-own-licence"},
        {"path": "small.png", "label": "normal"},
    ], {"colour.jpg": jpeg_bytes(colour, 95), "wide.png": chest_like(41, (600, 200)), "texture.png": lopsided,
        "flat.png": Image.new("L", (256, 256), 128), "lateral.dcm": dicom_bytes(chest_like(43), ViewPosition="LL"),
        "knee.dcm": dicom_bytes(chest_like(44), BodyPartExamined="KNEE", Modality="OT"),
        "nopatient.png": chest_like(45), "small.png": chest_like(46, (48, 48))})
    report = validate(sub, test_index=index)
    f = by_line(report)
    expect = {2: ["a colour image"], 3: ["aspect ratio 3.00"], 4: ["not left-right symmetric"], 5: ["nearly uniform"],
              6: ["DICOM view LL is lateral"], 7: ["body part KNEE is not the chest", "modality OT is not"],
              8: ["no patient_id", "not one we recognise"], 9: ["too small (48x48"]}
    for line, needles in expect.items():
        assert f[line].status == "warning", (line, f[line])
        for needle in needles:
            assert any(needle in w for w in f[line].warnings), (line, needle, f[line].warnings)
    assert report.ok and report.exit_code == 0  # warnings never block
    assert len(list((sub / "_clean/images").iterdir())) == 8


def test_frontal_screen_on_real_films():
    """The symmetry threshold leaves real frontal films alone (documented: ~1% false warnings)."""
    from modeling.image_io import load_image_with_info

    files = sorted(shared_path("data", "kermany", "chest_xray", "test").glob("*/*.jpeg"))[::8]
    warned = [p for p in files if chest_xray_warnings(*load_image_with_info(p))]
    assert len(warned) <= 0.05 * len(files), warned
    img, info = load_image_with_info(shared_path("data", "dicom", "nhsx_sample_OT_not_chest.dcm"))
    assert any("modality OT is not" in w for w in chest_xray_warnings(img, info))


# --------------------------------------------------------------------------------------------------
# de-identification
# --------------------------------------------------------------------------------------------------

def test_dicom_with_patient_tags_is_converted_to_pixels_and_no_phi_leaves(tmp_path, mini):
    _, index = mini
    png = PngImagePlugin.PngInfo()
    png.add_text("Author", "Doe^Jane")
    sub = write_submission(tmp_path / "sub", [
        {"path": "study/Doe_Jane_PID-12345.dcm", "label": "bacterial", "patient_id": "PID-12345"},
        {"path": "tagged.png", "label": "normal", "patient_id": "PID-12345"},
        {"path": "camera.jpg", "label": "viral", "patient_id": "other"},
    ], {"study/Doe_Jane_PID-12345.dcm": dicom_bytes(chest_like(50), **PHI)})
    chest_like(51).save(sub / "tagged.png", pnginfo=png)
    exif = Image.Exif()
    exif[0x013B] = "Doe^Jane"  # Artist
    exif[0x010E] = "PID-12345"  # ImageDescription
    chest_like(52).save(sub / "camera.jpg", exif=exif, quality=95)
    assert b"PID-12345" in (sub / "camera.jpg").read_bytes()
    assert b"Doe^Jane" in (sub / "study/Doe_Jane_PID-12345.dcm").read_bytes()  # the plant is real
    out = tmp_path / "clean"
    proc = subprocess.run([sys.executable, "-m", "dataset_scripts.contribute", "validate", str(sub),
                           "--output-dir", str(out), "--test-index", str(index)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    dcm, tagged, camera = report["files"]
    assert dcm["status"] == "ok" and dcm["format"] == "DICOM"
    assert {"PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "AccessionNumber",
            "ReferringPhysicianName", "StudyDate", "SOPInstanceUID", "(0009,1010)"} <= set(dcm["identifying_tags_removed"])
    assert tagged["metadata_removed"] == ["text chunk"]  # the kind, never the chunk's keyword or text
    assert camera["metadata_removed"] == ["EXIF"] and camera["status"] == "ok"
    # the cleaned images are plain PNGs of the pixels, named by content, without any metadata
    with (out / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        assert row["path"].startswith("images/") and row["path"].endswith(".png")
        with Image.open(out / row["path"]) as im:
            assert im.format == "PNG" and im.mode == "L" and not im.info and not im.getexif()
    # patient ids are pseudonymised, consistently within the submission
    assert rows[0]["patient_id"] == rows[1]["patient_id"] != rows[2]["patient_id"]
    assert rows[0]["patient_id"] != "PID-12345"
    assert rows[0]["patient_id"].startswith("p-")
    # no PHI value anywhere in what would be uploaded (original file names included)
    uploaded = b"".join((out / f).read_bytes() for f in contribute.UPLOADED_FILES) + b"".join(
        p.read_bytes() for p in (out / "images").iterdir())
    for s in PHI_STRINGS + ["Doe_Jane"]:
        assert s.encode() not in uploaded, s
    # and the tag values appear in no output file, nor in what the command printed
    everything = all_output_bytes(out) + proc.stdout.encode() + proc.stderr.encode()
    for value in [*PHI.values(), "Doe_Jane"]:
        assert value.encode() not in everything, value


def test_pixels_of_the_cleaned_dicom_are_what_the_loader_gives(tmp_path, mini):
    from modeling.image_io import load_image

    _, index = mini
    data = dicom_bytes(chest_like(60), **PHI)
    sub = write_submission(tmp_path / "sub", [{"path": "x.dcm", "label": "normal"}], {"x.dcm": data})
    report = validate(sub, test_index=index)
    cleaned = load_image(sub / "_clean" / report.files[0].clean_name)
    assert np.array_equal(np.asarray(cleaned), np.asarray(load_image(data)))


# --------------------------------------------------------------------------------------------------
# submit -> pull request -> merge -> next build
# --------------------------------------------------------------------------------------------------

def test_blocked_submission_uploads_nothing(hub, tmp_path, mini):
    server, env = hub
    root, index = mini
    test_img = Image.open(root / "kermany/chest_xray/test/NORMAL/IM-0200-0001.jpeg").resize((150, 150))
    sub = write_submission(tmp_path / "sub", [{"path": "t.jpg", "label": "normal"}], {"t.jpg": jpeg_bytes(test_img)})
    run_python_json('from huggingface_hub import HfApi; HfApi().create_repo("test-user/cxr", repo_type="dataset");'
                    'print("{}")', env)
    n_requests = len(server.requests)
    proc = subprocess.run([sys.executable, "-m", "dataset_scripts.contribute", "submit", str(sub), "--repo",
                           "test-user/cxr", "--test-index", str(index)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "nothing was uploaded" in proc.stderr
    assert server.requests[n_requests:] == []  # not even a request


def test_clean_submission_round_trips_to_a_pr_and_into_the_next_build(hub, tmp_path, mini, mini_dataset):
    server, env = hub
    root, index = mini
    images = {f"img{i}.png": chest_like(100 + i) for i in range(6)}
    images["scan.dcm"] = dicom_bytes(chest_like(106), **PHI)
    # a copy of an image the published dataset already has: found through --dataset REPO_ID, dropped
    images["known.jpg"] = jpeg_bytes(Image.open(root / "kermany/chest_xray/train/NORMAL/IM-0004-0001.jpeg"), 80)
    labels = ["normal", "bacterial", "viral", "normal", "bacterial", "viral", "normal", "normal"]
    sub = write_submission(tmp_path / "sub", [
        {"path": name, "label": lab, "patient_id": f"pt{i // 2}", "contributor": "Dr. Example"}
        for i, (name, lab) in enumerate(zip(images, labels))], images)
    # the dataset repo as the build publishes it (parquet splits, card, build report)
    run_python_json(f"from pathlib import Path; from dataset_scripts.build import push_to_hub; "
                    f"push_to_hub(Path({str(mini_dataset)!r}), 'test-user/cxr'); print('{{}}')", env, cwd=ROOT)
    proc = subprocess.run([sys.executable, "-m", "dataset_scripts.contribute", "submit", str(sub), "--repo",
                           "test-user/cxr", "--dataset", "test-user/cxr", "--test-index", str(index)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "opened pull request #1:" in proc.stdout
    report = json.loads((sub / "_clean/report.json").read_text())
    sid = report["submission_id"]
    assert sid.startswith("dr-example-") and report["counts"]["ok"] == 7 and report["counts"]["dropped"] == 1
    assert report["files"][-1]["dropped"].startswith("already in the dataset: near duplicate of dataset-")
    assert report["checks"]["dataset"] == "test-user/cxr"
    md = (sub / "_clean/REPORT.md").read_text()

    got = run_python_json("""
import json
from huggingface_hub import HfApi
api = HfApi()
repo = "test-user/cxr"
details = api.get_discussion_details(repo, 1, repo_type="dataset")
pr_files = api.list_repo_files(repo, repo_type="dataset", revision="refs/pr/1")
main_before = api.list_repo_files(repo, repo_type="dataset")
api.merge_pull_request(repo, 1, repo_type="dataset")
from datasets import load_dataset
ds = load_dataset(repo)  # the contributions folder does not disturb the published splits
print(json.dumps({"n": {s: len(ds[s]) for s in ds},"is_pr": details.is_pull_request, "title": details.title, "description": details.events[0].content,
                  "status": api.get_discussion_details(repo, 1, repo_type="dataset").status,
                  "pr_files": pr_files, "main_before": main_before,
                  "main_after": api.list_repo_files(repo, repo_type="dataset")}))
""", env)
    base = f"contributions/{sid}"
    assert got["is_pr"] and got["title"] == f"Contribution {sid}: 7 images"
    assert got["description"] == md and "validation passed" in md
    expected = {f"{base}/manifest.csv", f"{base}/report.json", f"{base}/REPORT.md"} | {
        f"{base}/{f['clean_name']}" for f in report["files"] if f["clean_name"]}
    assert expected <= set(got["pr_files"]) and len(expected) == 3 + 7
    assert not any(p.startswith("contributions/") for p in got["main_before"])
    assert got["status"] == "merged" and expected <= set(got["main_after"])
    from datasets import load_from_disk

    assert got["n"] == {s: len(d) for s, d in load_from_disk(str(mini_dataset)).items()}
    # nothing identifying was stored on the server, in any blob
    stored = all_output_bytes(server.storage_dir)
    for value in [*PHI.values(), "img0.png", "scan.dcm", "known.jpg"]:
        assert value.encode() not in stored, value

    # submitting the same content again is refused: it is already merged
    proc = subprocess.run([sys.executable, "-m", "dataset_scripts.contribute", "submit", str(sub), "--repo",
                           "test-user/cxr", "--test-index", str(index)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "already in test-user/cxr" in proc.stdout

    # the next build takes merged contributions straight from the Hub repo
    out = tmp_path / "next"
    proc = subprocess.run(
        [sys.executable, "-m", "dataset_scripts.build", "--source", f"kermany:{root / 'kermany'}",
         "--source", "contributions:test-user/cxr", "--output-dir", str(out), "--val-fraction", "0.25",
         "--no-cache", "--workers", "1", "--no-progress", "--push-to-hub", "test-user/cxr"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # publishing the next build keeps the contributions in the repo
    files_after = run_python_json('import json; from huggingface_hub import list_repo_files; '
                                  'print(json.dumps(list_repo_files("test-user/cxr", repo_type="dataset")))', env)
    assert expected <= set(files_after)
    dsd = load_from_disk(str(out))
    contrib = {s: [r for r in dsd[s].select_columns(["source", "source_path", "patient_id"])
                   if r["source"] == f"contrib-{sid}"] for s in dsd}
    assert contrib["test"] == []
    assert len(contrib["train"]) + len(contrib["validation"]) == 7
    assert all(r["patient_id"].startswith(f"contrib-{sid}:p-") for s in ("train", "validation") for r in contrib[s])
    build_report = json.loads((out / "build_report.json").read_text())
    assert build_report["leak_check"]["passed"]
    (entry,) = build_report["contributions"]
    assert entry["id"] == sid and entry["contributors"] == ["Dr. Example"] and entry["licenses"] == ["cc-by-4.0"]
    assert entry["images"] == 7 and entry["train"] + entry["validation"] == 7 and entry["dropped"] == 0
    card = (out / "README.md").read_text()
    assert "### Contributions" in card and f"| `{sid}` | Dr. Example | CC BY 4.0 | 7 |" in card


def test_contributions_source_from_a_local_folder_and_a_copy_of_a_test_image(tmp_path, mini):
    """A contribution that slipped a test-image copy past review is still dropped by the build
    (the build's own leak policy), and contributions never enter the test split."""
    from dataset_scripts.build import BuildConfig, build

    root, _ = mini
    repo = tmp_path / "repo" / "contributions"
    t1 = Image.open(root / "kermany/chest_xray/test/NORMAL/IM-0200-0001.jpeg")
    write_submission(repo / "alice-1", [{"path": "a.png", "label": "normal"}, {"path": "b.png", "label": "viral"}],
                     {"a.png": t1.resize((190, 190)), "b.png": chest_like(200)})
    write_submission(repo / "bob-2", [{"path": "c.png", "label": "bacterial", "license": "cc0-1.0"}],
                     {"c.png": chest_like(201)})
    res = build(BuildConfig(sources=[f"kermany:{root / 'kermany'}", f"contributions:{tmp_path / 'repo'}"],
                            out=tmp_path / "ds", val_fraction=0.25, cache_dir=None, workers=1, progress=False))
    rep = res.report
    entries = {c["id"]: c for c in rep["contributions"]}
    assert entries["alice-1"]["dropped"] == 1 and entries["alice-1"]["train"] + entries["alice-1"]["validation"] == 1
    assert entries["bob-2"]["licenses"] == ["cc0-1.0"]
    assert all(not res.records[i].extra.get("contribution") for i, s in res.split_of.items() if s == "test")
    assert any(d["image"] == "contrib-alice-1:alice-1/a.png" and d["reason"] == "copy of an official test image"
               for d in rep["dropped"])
    assert rep["leak_check"]["passed"]
    src = next(s for s in rep["sources"] if s["kind"] == "contributions")
    assert src["license"] == "mixed" and src["licenses"] == ["cc-by-4.0", "cc0-1.0"]


def test_space_feedback_export_format_revalidation_and_output_safety(tmp_path, mini, capsys):
    """A folder written by modeling.manifest.write_manifest (the Space's feedback export) validates;
    validating twice gives the same result (the cleaned copy is not mistaken for unlisted files);
    an unrelated --output folder is never replaced."""
    from modeling.manifest import write_manifest

    _, index = mini
    sub = tmp_path / "export"
    (sub / "img").mkdir(parents=True)
    chest_like(70).save(sub / "img" / "a.png")
    chest_like(71).save(sub / "img" / "b.png")
    chest_like(72).save(sub / "stray.png")  # in the folder, not in the manifest
    write_manifest(sub, [
        {"path": "img/a.png", "label": "bacterial_pneumonia", "patient_id": "case-1", "license": "cc-by-4.0",
         "contributor": "Space feedback", "note": "model said normal", "source": "space-feedback"},
        {"path": "img/b.png", "label": "normal", "patient_id": "case-2", "license": "cc-by-4.0",
         "contributor": "Space feedback", "note": "", "source": "space-feedback"}])
    first = validate(sub, test_index=index)
    second = validate(sub, test_index=index)
    assert first.ok and [f.status for f in first.files] == ["ok", "ok"]
    assert first.warnings == second.warnings == [
        "1 file(s) in the folder are not listed in manifest.csv and are not submitted"]
    assert first.submission_id == second.submission_id == "space-feedback-" + first.submission_id.split("-")[-1]
    assert sorted(p.name for p in sub.iterdir()) == ["_clean", "img", "manifest.csv", "stray.png"]  # no staging left
    other = tmp_path / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["validate", str(sub), "--output-dir", str(other), "--test-index", str(index)]) == 2
    assert "refusing to replace it" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine"


def test_broken_dicom_and_oversized_files_leak_nothing(tmp_path, mini, monkeypatch):
    """Error texts go into the report: a truncated DICOM full of patient tags is blocked without
    any of their values (or the file name) appearing; an oversized file is refused before reading."""
    from modeling import image_io

    _, index = mini
    full = dicom_bytes(chest_like(80), **PHI)
    sub = write_submission(tmp_path / "sub", [
        {"path": "Doe_Jane_cut.dcm", "label": "normal"},
        {"path": "huge.png", "label": "normal"},
    ], {"Doe_Jane_cut.dcm": full[: len(full) - 50_000],
        "huge.png": Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512), dtype=np.uint8))})
    assert len(full) - 50_000 < 120_000 < (tmp_path / "sub" / "huge.png").stat().st_size
    monkeypatch.setattr(image_io, "MAX_FILE_BYTES", 120_000)
    report = validate(sub, test_index=index)
    f = by_line(report)
    assert f[2].status == "blocked" and f[2].problems[0].startswith("cannot be decoded (truncated)")
    assert f[3].status == "blocked" and f[3].problems[0].startswith("cannot be decoded (too_large)")
    text = json.dumps(report.to_dict()) + report.markdown() + (sub / "_clean/REPORT.md").read_text()
    for s in [*PHI.values(), "Doe_Jane"]:
        assert s not in text, s


def test_real_full_resolution_copies_and_real_dicoms_against_the_real_dataset(tmp_path, real_dataset):
    """The 24 full-resolution originals of Kermany train images (400-2,900 px, other aspect ratios)
    are found in the real build's 224x224 copies and dropped; one of them relabelled is blocked; the
    real chest DICOMs pass with their identifying tags listed, the secondary capture gets a warning."""
    out, report, _ = real_dataset
    fullres = sorted(shared_path("data", "kermany-fullres-sample", "chest_xray", "train").glob("*/*.jpeg"))
    dicoms = ["nhsx_nih_dx_chest_nofinding_uncompressed.dcm", "dcmfx_fodicom_CR-MONO1-10-chest.dcm",
              "nhsx_sample_OT_not_chest.dcm"]
    files = {p.name: p.read_bytes() for p in fullres}
    files.update({f"d{i}.dcm": shared_path("data", "dicom", n).read_bytes() for i, n in enumerate(dicoms)})
    files["relabelled.jpeg"] = fullres[0].read_bytes()  # an IM-... normal film
    rows = [{"path": p.name, "label": "normal" if p.name.startswith(("IM-", "NORMAL2")) else
             "bacterial" if "bacteria" in p.name else "viral"} for p in fullres]
    rows += [{"path": f"d{i}.dcm", "label": "normal"} for i in range(3)]
    rows += [{"path": "relabelled.jpeg", "label": "viral"}]
    sub = write_submission(tmp_path / "sub", rows, files)
    rep = validate(sub, dataset=str(out))
    f = by_line(rep)
    dropped_by_build = {d["image"] for d in report["dropped"]}
    for line, p in enumerate(fullres, start=2):
        if f"kermany:chest_xray/train/{p.parent.name}/{p.name}" in dropped_by_build:
            assert f[line].status in ("ok", "warning")  # not in the dataset (the build drops it again)
        else:
            assert f[line].status == "dropped" and f[line].dropped.endswith(f"/{p.name} ({f[line].matches[0]['distance_bits']} bits)")
            assert f[line].matches[0]["distance_bits"] <= 14
    assert sum(f[line].status == "dropped" for line in range(2, 26)) >= 20
    nih, cr, ot, relabelled = f[26], f[27], f[28], f[29]
    assert nih.status == cr.status == "ok" and ot.status == "warning"
    assert {"PatientName", "PatientID"} <= set(nih.identifying_tags_removed)
    assert {"PatientName", "InstitutionName", "AccessionNumber"} <= set(cr.identifying_tags_removed)
    assert relabelled.status == "blocked" and "label conflict" in relabelled.problems[0]
    assert not rep.ok
