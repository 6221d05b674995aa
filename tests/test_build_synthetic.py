"""End-to-end build on a synthetic mini-source with planted copies, leaks, conflicts and bad files,
with the exact expected outcome worked out by hand (see the comments in `mini_sources`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from dataset_scripts.build import BuildConfig, build, main
from synthetic import make_mini_sources, save, xray_like


@pytest.fixture(scope="module")
def mini_sources(tmp_path_factory):
    return make_mini_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module")
def built(mini_sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "ds"
    cfg = BuildConfig(sources=[f"kermany:{mini_sources / 'kermany'}", f"folders:{mini_sources / 'other'}"],
                      out=out, val_fraction=0.25, seed=0, cache_dir=tmp_path_factory.mktemp("cache"),
                      workers=1, progress=False)
    result = build(cfg)
    return out, result.report, cfg


def _dropped(report):
    return {d["image"].split(":", 1)[1].split("/")[-1]: d["reason"] for d in report["dropped"]}


def test_bad_files_reported_and_skipped(built):
    _, rep, _ = built
    by_name = {u["image"].split("/")[-1]: u["reason"] for u in rep["unreadable"]}
    assert by_name == {"zero.jpeg": "empty", "truncated.jpeg": "truncated",
                       "notimage.png": "not_an_image", "bomb.png": "too_large"}
    assert rep["files"] == {**rep["files"], "listed": 40, "readable": 36, "unreadable": 4}
    assert [i["path"].split("/")[-1] for i in rep["ignored"]] == ["notes.txt"]


def test_planted_copies_conflicts_and_leaks_are_dropped(built):
    _, rep, _ = built
    assert _dropped(rep) == {
        "a_small.jpeg": "duplicate", "b_q60.jpeg": "duplicate", "c_renamed.jpeg": "duplicate",
        "d_flip.jpeg": "duplicate", "e_rot.jpeg": "duplicate",
        "person8_bacteria_9.jpeg": "duplicate",  # same bytes as _10; ties broken by path
        "t2_copy.jpeg": "copy of an official test image",
        "IM-0006-0001.jpeg": "label conflict between copies", "f_conflict.jpeg": "label conflict between copies",
        "person5_bacteria_6.jpeg": "same patient as an official test image",
    }
    [conflict] = rep["dedup"]["label_conflicts"]
    assert {m["label"] for m in conflict["members"]} == {"normal", "viral_pneumonia"}
    # copies keep pointing at the image that stands for them
    dup_of = {d["image"].split("/")[-1]: d["duplicate_of"] for d in rep["dropped"]}
    assert dup_of["a_small.jpeg"] == "kermany:chest_xray/train/NORMAL/IM-0001-0001.jpeg"


def test_splits_exact_counts_and_grouping(built):
    from datasets import load_from_disk

    out, rep, _ = built
    dsd = load_from_disk(str(out))
    assert set(dsd) == {"train", "validation", "test"}
    names = dsd["train"].features["label"].names
    assert names == ["normal", "bacterial_pneumonia", "viral_pneumonia"]
    def count(split):
        return {n: sum(1 for y in dsd[split]["label"] if y == i) for i, n in enumerate(names)}
    assert count("test") == {"normal": 1, "bacterial_pneumonia": 2, "viral_pneumonia": 1}
    pool = {n: count("train")[n] + count("validation")[n] for n in names}
    assert pool == {"normal": 11, "bacterial_pneumonia": 5, "viral_pneumonia": 6}
    assert len(dsd["validation"]) > 0 and len(dsd["train"]) > len(dsd["validation"])
    # the same patient (person1: bacteria + virus) never straddles train and validation
    patients = {s: set(dsd[s]["patient_id"]) for s in dsd}
    assert not patients["train"] & patients["validation"]
    assert not (patients["train"] | patients["validation"]) & patients["test"]
    p1 = [s for s in ("train", "validation") if "kermany:person1" in patients[s]]
    assert len(p1) == 1
    assert sorted(dsd["test"]["source_path"]) == sorted(
        f"chest_xray/test/{p}" for p in ["NORMAL/IM-0200-0001.jpeg", "PNEUMONIA/person60_bacteria_12.jpeg",
                                         "PNEUMONIA/person61_virus_13.jpeg", "PNEUMONIA/person5_bacteria_14.jpeg"])
    assert rep["leak_check"]["passed"]


def test_converted_files_are_stored_as_8bit_and_originals_byte_for_byte(built, mini_sources):
    from datasets import Image as ImageFeature, load_from_disk

    out, rep, _ = built
    assert sorted(r["image"].split("/")[-1] for r in rep["reencoded"]) == ["cmyk.jpg", "palette.png", "sixteen.png"]
    ds = load_from_disk(str(out))["train"]
    raw = ds.cast_column("image", ImageFeature(decode=False))
    for row, enc in zip(ds, raw):
        name = row["source_path"].split("/")[-1]
        if name in ("cmyk.jpg", "palette.png", "sixteen.png"):
            assert row["image"].mode == "L" and enc["image"]["bytes"][:4] == b"\x89PNG"
        elif row["source"] == "kermany":
            src = mini_sources / "kermany" / row["source_path"]
            assert enc["image"]["bytes"] == src.read_bytes()


def test_card_and_report_agree(built):
    import yaml

    out, rep, _ = built
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["task_categories"] == ["image-classification"]
    assert meta["license"] == "other" and "CC BY 4.0" in meta["license_details"]
    assert json.loads((out / "build_report.json").read_text())["splits"] == rep["splits"]
    assert "| test | 4 | 1 | 2 | 1 |" in card
    assert "result: **passed**" in card
    assert "Label conflicts (1)" in card


def test_rebuild_with_new_source_hashes_only_new_files(built, mini_sources, tmp_path):
    _, _, cfg = built
    extra = tmp_path / "contrib"
    save(xray_like(1001), extra / "img1.png")
    save(xray_like(1002), extra / "img2.png")
    (extra / "manifest.csv").write_text("path,label,patient_id,license\nimg1.png,normal,p1,cc-by-4.0\n"
                                        "img2.png,viral_pneumonia,p2,cc-by-4.0\n")
    cfg2 = BuildConfig(**{**cfg.__dict__, "sources": cfg.sources + [f"manifest:{extra / 'manifest.csv'}"],
                          "out": tmp_path / "ds2"})
    rep = build(cfg2).report
    assert rep["files"]["fingerprints_computed"] == 2
    assert rep["files"]["fingerprints_from_cache"] == 40
    pool = sum(rep["splits"][s]["images"] for s in ("train", "validation"))
    assert pool == 24
    assert rep["splits"]["train"]["by_source"].get("contrib", 0) + rep["splits"]["validation"]["by_source"].get("contrib", 0) == 2


def test_cli_unknown_class_folder_is_a_clear_error(tmp_path, capsys):
    save(xray_like(1), tmp_path / "src" / "Pneumonia" / "x.png")
    code = main(["--source", f"folders:{tmp_path / 'src'}", "--output-dir", str(tmp_path / "o"), "--no-cache", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "'Pneumonia'" in err and "viralpneumonia" in err and "normal" in err
    assert not (tmp_path / "o").exists()


def test_cli_module_entry_point(mini_sources, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "dataset_scripts.build", "--source", f"kermany:{mini_sources / 'kermany'}",
         "--output-dir", str(out), "--val-fraction", "0.25", "--no-cache", "--workers", "1", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "leak check: passed" in proc.stdout
    assert (out / "dataset_dict.json").exists() and (out / "README.md").exists()


@pytest.mark.parametrize("case", ["empty_source", "all_unreadable", "too_few_patients"])
def test_cli_sources_that_cannot_make_a_dataset_exit_2_with_a_message(tmp_path, capsys, case):
    src = tmp_path / "src"
    (src / "Normal").mkdir(parents=True)
    (src / "LICENSE").write_text("MIT License")
    if case == "all_unreadable":
        for i in range(3):
            (src / "Normal" / f"{i}.png").write_bytes(b"")
    if case == "too_few_patients":
        for i in range(3):
            save(xray_like(100 + i), src / ("Normal" if i else "COVID-19") / f"{i}.png")
    code = main(["--source", f"folders:{src}", "--output-dir", str(tmp_path / "o"), "--no-cache", "--no-progress",
                 "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2
    expected = {"empty_source": "no image files found", "all_unreadable": "could be decoded",
                "too_few_patients": "too few"}[case]
    assert expected in err
    assert not (tmp_path / "o" / "dataset_dict.json").exists()


@pytest.mark.parametrize("fraction", ["0", "-0.1", "0.6"])
def test_cli_rejects_validation_fraction_out_of_range(tmp_path, fraction):
    with pytest.raises(SystemExit) as e:
        main(["--source", f"folders:{tmp_path}", "--output-dir", str(tmp_path / "o"), "--val-fraction", fraction])
    assert e.value.code == 2


def test_card_states_measured_validation_share(built):
    out, rep, _ = built
    card = (out / "README.md").read_text()
    n_val, n_train = rep["splits"]["validation"]["images"], rep["splits"]["train"]["images"]
    assert rep["validation_share"] == round(n_val / (n_val + n_train), 4)
    assert f"{rep['validation_share']:.1%} of the" in card
    assert "this build dropped 1 such pool images" in card
