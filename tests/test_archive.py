"""Archive-scale prediction (modeling.archive, `cxr-predict DIR --output F`): a real small archive made
here (nested folders, JPEG/PNG/16-bit PNG, DICOM with and without an extension and with a patient's
identifiers, a truncated file, a colour photo, files that are not films) through the real command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from synthetic import PATIENT, make_dicom, sixteen_bit, xray_like
from tiny_models import save_tiny_classifier

from modeling.archive import COLUMNS, ArchiveConfig, find_films, predict_archive, read_rows
from modeling.predict import Predictor

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
FILMS = {  # relative path -> what its row must say (None: predicted)
    "a/normal.png": None,
    "a/deep/film.jpg": None,
    "a/deep/sixteen.png": None,
    "b/IM0001": None,  # a DICOM without an extension
    "b/named.dcm": None,  # a DICOM whose header names the patient
    "b/broken.jpeg": "truncated",
    "c/photo.png": "not_a_chest_xray",
}


def make_archive(root: Path, n_extra: int = 0) -> Path:
    (root / "a" / "deep").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "c").mkdir()
    xray_like(1, (80, 96)).save(root / "a" / "normal.png")
    xray_like(2, (90, 90)).convert("RGB").save(root / "a" / "deep" / "film.jpg", quality=92)
    sixteen_bit(xray_like(3, (70, 84))).save(root / "a" / "deep" / "sixteen.png")
    pixels = (np.asarray(xray_like(4, (88, 100)), dtype=np.uint16) * 16)
    (root / "b" / "IM0001").write_bytes(make_dicom(pixels, bits_stored=12))
    (root / "b" / "named.dcm").write_bytes(make_dicom(pixels[:, ::-1].copy(), bits_stored=12, **PATIENT))
    good = (root / "a" / "normal.png").read_bytes()
    (root / "b" / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    rgb = np.zeros((80, 80, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = np.linspace(0, 255, 80)[None, :], np.linspace(255, 0, 80)[:, None]
    Image.fromarray(rgb).save(root / "c" / "photo.png")
    (root / "c" / "report.txt").write_text("not a film")
    (root / "c" / ".hidden.png").write_bytes(good)
    (root / ".cache").mkdir()
    (root / ".cache" / "thumb.png").write_bytes(good)
    if n_extra:
        (root / "extra").mkdir()
    for i in range(n_extra):
        xray_like(100 + i, (64, 72)).save(root / "extra" / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("archive-model") / "m", image_size=32)


def test_find_films_walks_folders_and_takes_dicom_without_an_extension(tmp_path):
    root = make_archive(tmp_path / "arch")
    keys = [s.key for s in find_films([root])]
    assert keys == sorted(FILMS)  # stable order; no .txt, no hidden file or folder
    single = find_films([root / "a" / "normal.png"])
    assert [s.key for s in single] == [str(root / "a" / "normal.png")]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_film_gets_one_row_like_the_predictor_and_no_identifier_is_copied(tmp_path, model_dir, workers):
    root = make_archive(tmp_path / "arch")
    out = tmp_path / "results.parquet"
    predictor = Predictor.from_pretrained(str(model_dir))
    summary = predict_archive(ArchiveConfig(inputs=[str(root)], output=str(out), workers=workers, batch_size=3,
                                            progress=False), predictor)
    rows = {r["path"]: r for r in read_rows(out)}
    assert set(rows) == set(FILMS) and summary.written == len(FILMS) == summary.predicted + summary.failed
    assert list(read_rows(out)[0]) == COLUMNS
    for key, reason in FILMS.items():
        r = rows[key]
        assert r["model_revision"] == predictor.revision and len(r["file_sha256"]) == 64
        if reason:
            assert r["reason"] == reason and r["error"] and r["p_pneumonia"] is None and r["decision"] == ""
            continue
        direct = predictor.predict_one(root / key)
        assert r["reason"] == "" and r["p_pneumonia"] == pytest.approx(direct.pneumonia_probability, abs=1e-4)
        assert r["label"] == direct.label and r["pneumonia"] == direct.pneumonia
        assert r["decision"] in ("no_pneumonia", "uncertain", "pneumonia")
        assert (r["width"], r["height"]) == direct.image_size and len(r["image_sha256"]) == 64
    raw = out.read_bytes()
    for value in PATIENT.values():  # DICOM headers are never copied
        assert value.encode() not in raw and value.split("^")[0].encode() not in raw
    assert not list(tmp_path.glob("*.partial"))


def test_the_three_formats_hold_the_same_rows(tmp_path, model_dir):
    root = make_archive(tmp_path / "arch")
    predictor = Predictor.from_pretrained(str(model_dir))
    tables = {}
    for suffix in (".parquet", ".csv", ".jsonl"):
        out = tmp_path / f"r{suffix}"
        predict_archive(ArchiveConfig(inputs=[str(root)], output=str(out), workers=0, progress=False), predictor)
        tables[suffix] = sorted(read_rows(out), key=lambda r: r["path"])
    for suffix in (".csv", ".jsonl"):
        for a, b in zip(tables[".parquet"], tables[suffix]):
            assert {k: v for k, v in a.items() if v not in ("", None)} == pytest.approx(
                {k: v for k, v in b.items() if v not in ("", None)})
    with pytest.raises(ValueError, match="parquet"):
        predict_archive(ArchiveConfig(inputs=[str(root)], output=str(tmp_path / "r.xlsx"), workers=0), predictor)


def test_an_interrupted_run_leaves_a_valid_file_and_resume_does_only_the_rest(tmp_path, model_dir, monkeypatch):
    import modeling.archive as archive

    root = make_archive(tmp_path / "arch")
    out = tmp_path / "results.parquet"
    predictor = Predictor.from_pretrained(str(model_dir))
    real = archive._rows_for_batch
    batches = []

    def stop_after_two(*a, **kw):
        if len(batches) == 2:
            raise KeyboardInterrupt
        batches.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(archive, "_rows_for_batch", stop_after_two)
    cfg = ArchiveConfig(inputs=[str(root)], output=str(out), workers=0, batch_size=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        predict_archive(cfg, predictor)
    first = read_rows(out)  # a readable table with the two finished batches
    assert len(first) == 4 and not Path(str(out) + ".partial").exists()
    monkeypatch.setattr(archive, "_rows_for_batch", real)
    decoded = []
    real_read = archive.read_film
    monkeypatch.setattr(archive, "read_film", lambda data, **kw: decoded.append(1) or real_read(data, **kw))
    summary = predict_archive(ArchiveConfig(**{**cfg.__dict__, "resume": True}), predictor)
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(FILMS) and summary.skipped == 4
    assert len(decoded) == len(FILMS) - 4  # only the rest is decoded again, each once
    assert rows[:4] == first


def test_no_paths_keeps_the_path_out_and_resumes_by_the_files_hash(tmp_path, model_dir):
    root = make_archive(tmp_path / "arch")
    out = tmp_path / "results.csv"
    predictor = Predictor.from_pretrained(str(model_dir))
    cfg = ArchiveConfig(inputs=[str(root)], output=str(out), workers=0, paths=False, progress=False)
    predict_archive(cfg, predictor)
    rows = read_rows(out)
    assert len(rows) == len(FILMS) and not any(r["path"] for r in rows)
    assert "named.dcm" not in out.read_text() and "IM0001" not in out.read_text()
    xray_like(9, (80, 80)).save(root / "a" / "new.png")
    summary = predict_archive(ArchiveConfig(**{**cfg.__dict__, "resume": True}), predictor)
    assert summary.skipped == len(FILMS) and summary.written == 1 and len(read_rows(out)) == len(FILMS) + 1


def test_a_torn_last_line_of_a_killed_run_is_dropped_on_resume(tmp_path, model_dir):
    root = make_archive(tmp_path / "arch")
    out = tmp_path / "results.jsonl"
    predictor = Predictor.from_pretrained(str(model_dir))
    cfg = ArchiveConfig(inputs=[str(root)], output=str(out), workers=0, progress=False)
    predict_archive(cfg, predictor)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:25])  # what kill -9 mid-write leaves
    predict_archive(ArchiveConfig(**{**cfg.__dict__, "resume": True}), predictor)
    assert sorted(r["path"] for r in read_rows(out)) == sorted(FILMS)


STOP_EXTRA = 200


def _as_in_a_terminal() -> None:
    """The child's SIGINT as a terminal's foreground job has it. A suite started in the background by a
    script (`bash scripts/dev.sh test &`) inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler: the run went on to exit 0 and this test failed only there."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop_mid_run(tmp_path, model_dir, workers: int, sig: int) -> tuple[list[str], Path, list[dict]]:
    """Start `cxr-predict DIR --output F.jsonl` on a 207-film archive, send ``sig`` once 5 rows are
    written, check it ended like Ctrl-C (exit 130, the --resume hint, every row whole); the kept rows."""
    root = make_archive(tmp_path / "arch", n_extra=STOP_EXTRA)
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "modeling", "predict", "--model", str(model_dir), str(root), "--output", str(out),
           "--workers", str(workers), "--batch-size", "1", "--no-progress", "--precision", "float32"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_in_a_terminal)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 5):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted: give it more films"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in err, err[-2000:]
    kept = read_rows(out)
    assert 5 <= len(kept) < len(FILMS) + STOP_EXTRA and out.read_text().endswith("\n")  # every row whole
    return cmd, out, kept


def test_the_cli_writes_the_table_and_ctrl_c_leaves_a_valid_file(tmp_path, model_dir):
    cmd, out, kept = _stop_mid_run(tmp_path, model_dir, 1, signal.SIGINT)  # what Ctrl-C in a terminal sends
    done = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    rows = read_rows(out)
    assert summary["skipped"] == len(kept) and len(rows) == len(FILMS) + STOP_EXTRA
    assert len({r["path"] for r in rows}) == len(rows)


def test_two_processes_split_the_files_and_merge_one_table(tmp_path, model_dir):
    """What `accelerate launch` does on several GPUs or machines, on two CPU processes."""
    root = make_archive(tmp_path / "arch", n_extra=5)
    out = tmp_path / "results.parquet"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "modeling",
         "predict", "--model", str(model_dir), str(root), "--output", str(out), "--workers", "0", "--no-progress"],
        cwd=ROOT, env={**ENV, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted([*FILMS, *(f"extra/{i:04d}.png" for i in range(5))])
    assert not list(tmp_path.glob("*.shard-*"))
    # each process prints its summary; two prints can land on one line of the shared stdout
    decoder, text, summaries, i = json.JSONDecoder(), proc.stdout, [], 0
    while (i := text.find("{", i)) >= 0:
        obj, i = decoder.raw_decode(text, i)
        summaries.append(obj)
    assert len(summaries) == 2 and sum(s["written"] for s in summaries) == len(rows)


def test_the_spaces_batch_rows_are_the_archives_rows(tmp_path, model_dir):
    from space.service import CxrService
    from space.store import FeedbackStore

    root = make_archive(tmp_path / "arch")
    predictor = Predictor.from_pretrained(str(model_dir))
    out = tmp_path / "results.jsonl"
    predict_archive(ArchiveConfig(inputs=[str(root)], output=str(out), workers=0, progress=False), predictor)
    ours = {r["path"]: r for r in read_rows(out)}
    service = CxrService(predictor, FeedbackStore(tmp_path / "store"))
    try:
        keys = sorted(FILMS)
        space_rows = service.batch([root / k for k in keys])
    finally:
        service.close()
    for key, row in zip(keys, space_rows):
        cols = ["label", "p_normal", "p_bacterial_pneumonia", "p_viral_pneumonia", "p_pneumonia", "decision", "reason"]
        for col in cols + ([] if FILMS[key] else ["image_sha256"]):
            assert (row.get(col) or None) == pytest.approx(ours[key][col] or None, abs=1e-4), (key, col)


def test_two_folders_with_the_same_inner_paths_keep_their_rows_apart(tmp_path, model_dir):
    for name in ("site-a", "site-b"):
        (tmp_path / name / "x").mkdir(parents=True)
        xray_like(len(name), (70, 70)).save(tmp_path / name / "x" / "1.png")
    keys = [s.key for s in find_films([tmp_path / "site-a", tmp_path / "site-b"])]
    assert len(set(keys)) == 2 and all(k.endswith("x/1.png") for k in keys)


def test_a_file_name_that_is_not_utf8_gets_its_row(tmp_path, model_dir):
    root = tmp_path / "arch"
    root.mkdir()
    name = os.fsdecode(b"M\xfcller.png")  # Latin-1 from an old Windows share
    xray_like(5, (70, 70)).save(root / name)
    predictor = Predictor.from_pretrained(str(model_dir))
    for suffix in (".parquet", ".csv"):
        out = tmp_path / f"r{suffix}"
        predict_archive(ArchiveConfig(inputs=[str(root)], output=str(out), workers=0, progress=False), predictor)
        [row] = read_rows(out)
        assert row["path"] == "M\\xfcller.png" and row["reason"] == ""


def test_sigterm_ends_a_run_like_ctrl_c(tmp_path, model_dir):
    """SLURM's time limit, a Kubernetes stop or `timeout` send SIGTERM: the rows so far are kept (the
    same path as Ctrl-C, whose Parquet case the in-process test covers) and --resume continues."""
    _stop_mid_run(tmp_path, model_dir, 0, signal.SIGTERM)


@pytest.mark.slow
def test_compile_predicts_single_films_on_the_compiled_copy_with_the_same_rows(tmp_path, model_dir, capsys):
    """--compile (ArchiveConfig.compile): with --batch-size 1 the forward pass runs on the compiled copy
    (Predictor.compile), the rows within bf16 arithmetic of the eager run's; the run says it compiled."""
    root = make_archive(tmp_path / "arch")
    eager_out, compiled_out = tmp_path / "eager.jsonl", tmp_path / "compiled.jsonl"
    common = dict(inputs=[str(root)], workers=0, progress=False, batch_size=1, precision="bfloat16",
                  model=str(model_dir))
    predict_archive(ArchiveConfig(output=str(eager_out), **common))
    predictor = Predictor.from_pretrained(str(model_dir), precision="bfloat16")
    calls = []
    predictor._fast.register_forward_hook(lambda *a: calls.append(1))
    predict_archive(ArchiveConfig(output=str(compiled_out), compile=True, **common), predictor)
    # one eager pass: compile()'s reference for its agreement check; every film went to the compiled copy
    assert predictor._compiled is not None and len(calls) == 1
    eager = {r["path"]: r for r in read_rows(eager_out)}
    for r in read_rows(compiled_out):
        e = eager[r["path"]]
        assert r["label"] == e["label"] and r["error"] == e["error"]
        if r["p_pneumonia"] not in ("", None):
            assert r["p_pneumonia"] == pytest.approx(e["p_pneumonia"], abs=0.02)


# ---- review of issue 19: films named by UID, untraceable rows, paths in errors, burned-in text, shards ----

def _dicom_bytes(seed: int = 4, **tags) -> bytes:
    pixels = np.asarray(xray_like(seed, (88, 100)), dtype=np.uint16) * 16
    return make_dicom(pixels, bits_stored=12, **tags)


def test_a_dicom_is_found_by_its_bytes_whatever_its_suffix(tmp_path, model_dir):
    """PACS exports name files by their UID (`1.2.840...12345`: suffix `.12345`), Siemens by `.IMA`; a
    file whose suffix is unknown is read when its bytes say DICOM, and skipped when they do not."""
    root = tmp_path / "pacs"
    root.mkdir()
    dicoms = ["1.2.840.113619.2.55.3.12345", "IMG0001.IMA", "film.dcm1"]
    for i, name in enumerate(dicoms):
        (root / name).write_bytes(_dicom_bytes(4 + i))
    (root / "notes.xyz").write_text("a report, not a film " * 20)
    (root / "data.bin").write_bytes(bytes(range(256)) * 4)
    (root / "tiny.x").write_bytes(b"DICM")
    (root / ".1.2.840.99").write_bytes(_dicom_bytes(9))  # hidden: skipped as before
    assert [s.key for s in find_films([root])] == sorted(dicoms)
    out = tmp_path / "r.jsonl"
    predict_archive(ArchiveConfig(inputs=[str(root)], output=str(out), workers=0, progress=False),
                    Predictor.from_pretrained(str(model_dir)))
    rows = {r["path"]: r for r in read_rows(out)}
    assert set(rows) == set(dicoms) and all(r["reason"] == "" and r["p_pneumonia"] is not None for r in rows.values())


def test_no_paths_rows_of_unhashable_files_have_a_key_and_resume_adds_no_duplicate(tmp_path, model_dir, monkeypatch):
    """Under --no-paths a too-large file and a file that cannot be read at all still get a key that
    names neither the file nor its folder (the bytes' hash; else the hash of the relative path), and a
    --resume does not append their rows again."""
    import hashlib

    import modeling.archive as archive

    root = make_archive(tmp_path / "arch")
    big = os.urandom(70_000)
    (root / "b" / "huge.dcm").write_bytes(big)
    monkeypatch.setattr(archive, "MAX_FILE_BYTES", 60_000)  # every other film of the archive is smaller
    gone = tmp_path / "Doe_Jane_scans" / "chest.png"  # listed, but not there: io_error
    out = tmp_path / "results.csv"
    predictor = Predictor.from_pretrained(str(model_dir))
    cfg = ArchiveConfig(inputs=[str(root), str(gone)], output=str(out), workers=0, paths=False, progress=False)
    predict_archive(cfg, predictor)
    rows = read_rows(out)
    assert len(rows) == len(FILMS) + 2 and not any(r["path"] for r in rows)
    by_reason = {r["reason"]: r for r in rows}
    assert by_reason["too_large"]["file_sha256"] == hashlib.sha256(big).hexdigest()
    assert by_reason["io_error"]["path_sha256"] and not by_reason["io_error"]["file_sha256"]
    assert "Doe_Jane" not in out.read_text() and str(tmp_path) not in out.read_text()
    summary = predict_archive(ArchiveConfig(**{**cfg.__dict__, "resume": True}), predictor)
    again = read_rows(out)
    keys = [r["file_sha256"] or r["path_sha256"] for r in again]
    assert len(again) == len(rows) and len(set(keys)) == len(keys) and all(keys)
    assert summary.skipped == len(FILMS) + 1  # the unreadable file is tried again (io_error), nothing else


def test_an_io_error_row_is_retried_on_resume_and_replaced(tmp_path, model_dir):
    """io_error is transient (a share that dropped, a file still being copied): --resume tries the
    file again and its new row takes the old one's place."""
    root = make_archive(tmp_path / "arch")
    late = tmp_path / "late" / "film.png"
    out = tmp_path / "results.jsonl"
    predictor = Predictor.from_pretrained(str(model_dir))
    cfg = ArchiveConfig(inputs=[str(root), str(late)], output=str(out), workers=0, progress=False)
    predict_archive(cfg, predictor)
    [failed] = [r for r in read_rows(out) if r["path"] == str(late)]
    assert failed["reason"] == "io_error"
    late.parent.mkdir()
    xray_like(7, (80, 80)).save(late)
    summary = predict_archive(ArchiveConfig(**{**cfg.__dict__, "resume": True}), predictor)
    rows = read_rows(out)
    assert len(rows) == len(FILMS) + 1 and summary.written == 1 and summary.skipped == len(FILMS)
    [row] = [r for r in rows if r["path"] == str(late)]
    assert row["reason"] == "" and row["p_pneumonia"] is not None


def _turned_and_then_gone(predictor, film: Path, monkeypatch):
    """The gate finds every film turned (so the archive reads it again to put it right), and by then
    the file has become a folder: the re-read raises an OSError whose text holds the absolute path."""
    from modeling.gate import GateVerdict

    real = predictor.predict_pixel_values

    def turned(*a, **kw):
        preds = real(*a, **kw)
        for p in preds:
            p.gate = GateVerdict(90, 0.99, False, 0.01, 1.0, 10.0, 5.0)
        film.unlink()
        film.mkdir()
        return preds

    monkeypatch.setattr(predictor, "predict_pixel_values", turned)


@pytest.mark.parametrize("paths", [True, False])
def test_an_error_message_never_carries_the_path(tmp_path, model_dir, monkeypatch, paths):
    root = tmp_path / "arch"
    film = root / "Doe_Jane_1970" / "chest.png"
    film.parent.mkdir(parents=True)
    xray_like(3, (80, 80)).save(film)
    predictor = Predictor.from_pretrained(str(model_dir))
    _turned_and_then_gone(predictor, film, monkeypatch)
    out = tmp_path / "results.jsonl"
    predict_archive(ArchiveConfig(inputs=[str(root)], output=str(out), workers=0, paths=paths, progress=False),
                    predictor)
    [row] = read_rows(out)
    assert row["reason"] == "io_error" and row["error"]
    text = out.read_text()
    assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text  # never an absolute path
    if not paths:
        assert "Doe_Jane" not in text and "chest.png" not in text


def test_a_dicom_with_burned_in_text_is_refused_not_predicted(tmp_path, model_dir):
    """BurnedInAnnotation YES: text in the pixels can name the patient; the Space refuses such a film
    and so does the archive, with the same reason code."""
    root = tmp_path / "arch"
    root.mkdir()
    (root / "burned.dcm").write_bytes(_dicom_bytes(BurnedInAnnotation="YES"))
    (root / "clean.dcm").write_bytes(_dicom_bytes(BurnedInAnnotation="NO"))
    out = tmp_path / "results.jsonl"
    summary = predict_archive(ArchiveConfig(inputs=[str(root)], output=str(out), workers=0, progress=False),
                              Predictor.from_pretrained(str(model_dir)))
    rows = {r["path"]: r for r in read_rows(out)}
    burned = rows["burned.dcm"]
    assert burned["reason"] == "burned_in_annotation" and "BurnedInAnnotation" in burned["error"]
    assert burned["p_pneumonia"] is None and burned["decision"] == ""
    assert rows["clean.dcm"]["reason"] == "" and summary.failed == 1


def test_resume_merges_the_shards_of_a_run_with_another_process_count(tmp_path, model_dir, monkeypatch):
    """A 2-process run stopped and resumed in one process (or 4): its shards are read, their files not
    done again, merged into the output and removed. A fresh run removes stale shards of the output."""
    import modeling.archive as archive
    from modeling.archive import RowWriter, shard_path

    root = make_archive(tmp_path / "arch")
    predictor = Predictor.from_pretrained(str(model_dir))
    whole = tmp_path / "whole.jsonl"
    predict_archive(ArchiveConfig(inputs=[str(root)], output=str(whole), workers=0, progress=False), predictor)
    earlier = read_rows(whole)
    out = tmp_path / "results.jsonl"
    for rank, part in enumerate((earlier[:3], earlier[3:5])):  # what the stopped 2-process run left
        w = RowWriter(shard_path(out, rank, 2))
        w.write(part)
        w.close()
    decoded = []
    real_read = archive.read_film
    monkeypatch.setattr(archive, "read_film", lambda data, **kw: decoded.append(1) or real_read(data, **kw))
    cfg = ArchiveConfig(inputs=[str(root)], output=str(out), workers=0, progress=False)
    summary = predict_archive(ArchiveConfig(**{**cfg.__dict__, "resume": True}), predictor)
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(FILMS) and summary.skipped == 5
    assert len(decoded) == len(FILMS) - 5 and not list(tmp_path.glob("results.shard-*"))
    stale = RowWriter(shard_path(out, 1, 3))
    stale.write(earlier[:2])
    stale.close()
    predict_archive(cfg, predictor)  # not --resume: the stale shard must not come back on a later --resume
    assert not list(tmp_path.glob("results.shard-*"))
    predict_archive(ArchiveConfig(**{**cfg.__dict__, "resume": True}), predictor)
    assert sorted(r["path"] for r in read_rows(out)) == sorted(FILMS)


def test_each_process_of_a_gpu_launch_predicts_on_its_own_device(model_dir):
    """Review of issue 19: the docs showed `accelerate launch` on several GPUs, but every process predicted
    on the CPU. A process's predictor goes to the device accelerate gives it (the "meta" device stands in
    for a GPU here: it moves the weights without any hardware) and shares the host's cores with the
    other processes on the machine; a CPU process stays put."""
    import torch

    from modeling.archive import forward_threads, place_predictor

    class State:
        def __init__(self, device):
            self.device = torch.device(device)

    p = Predictor.from_pretrained(str(model_dir), precision="bfloat16")
    assert place_predictor(p, State("cpu")).device.type == "cpu"
    place_predictor(p, State("meta"))
    assert p.device.type == "meta" and next(p._fast.parameters()).device.type == "meta"
    assert place_predictor(p, None) is p
    # 4 cores: one process with 2 decoding workers forwards on 2 threads; 2 processes on the machine share them
    assert forward_threads(cores=4, workers=2, local_processes=1) == 2
    assert forward_threads(cores=4, workers=1, local_processes=2) == 1
    assert forward_threads(cores=2, workers=2, local_processes=2) == 1



def test_a_dataset_of_films_gets_the_archives_rows_through_dataset_map(tmp_path, model_dir):
    """Issue 19's datasets route: films already in a (Hub) dataset are predicted with Dataset.map, batched,
    and each example gets the archive's row (prefixed, beside the dataset's own label), the same as the
    archive gives the same files: probabilities, decision, reason codes for a broken file and a photo,
    and no identifier from a DICOM header. The images themselves are left as they were."""
    from datasets import Dataset, Features, Image as ImageFeature, Value

    from modeling.archive import predict_dataset

    root = make_archive(tmp_path / "arch")
    out = tmp_path / "results.jsonl"
    predictor = Predictor.from_pretrained(str(model_dir))
    predict_archive(ArchiveConfig(inputs=[str(root)], output=str(out), workers=0, batch_size=4, progress=False),
                    predictor)
    archive = {r["path"]: r for r in read_rows(out)}
    keys = sorted(FILMS)
    ds = Dataset.from_dict({"image": [{"bytes": (root / k).read_bytes(), "path": None} for k in keys],
                            "label": list(range(len(keys)))},
                           features=Features({"image": ImageFeature(), "label": Value("int64")}))
    got = predict_dataset(ds, predictor, batch_size=3)
    assert got.features["image"] == ds.features["image"] and got["label"] == ds["label"]
    rows = got.remove_columns("image")  # a DICOM or a broken file is no image Pillow decodes
    for key, row in zip(keys, rows):
        want = archive[key]
        for c in ("file_sha256", "image_sha256", "width", "height", "label", "decision", "reason", "gate",
                  "p_pneumonia", "model_revision"):
            assert row[f"pred_{c}"] == (want[c] if c != "p_pneumonia" or want[c] is None
                                        else pytest.approx(want[c], abs=1e-4)), (key, c)
    text = json.dumps(rows.to_list())
    for value in PATIENT.values():
        assert value not in text and value.split("^")[0] not in text
    # an example without an image (None in the column) is a row with a reason, not a failed map
    holes = Dataset.from_dict({"image": [None, {"bytes": (root / keys[0]).read_bytes(), "path": None}],
                               "label": [0, 1]}, features=Features({"image": ImageFeature(), "label": Value("int64")}))
    got = predict_dataset(holes, predictor).remove_columns("image")
    assert got[0]["pred_reason"] == "io_error" and got[1]["pred_reason"] == archive[keys[0]]["reason"]
