"""Space hardening (issue 13), in-process part: corrections are never lost, batches stream and give every
input a row, single predictions are not starved by a batch. The running-app part (file lifecycle,
identical concurrent uploads, limits, access control) is in test_space_hardening_app.py."""

from __future__ import annotations

import io
import os
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthetic import jpeg_bytes, xray_like
from tiny_models import save_tiny_classifier

from modeling.predict import Predictor


def xray_bytes(seed: int = 0) -> bytes:
    return jpeg_bytes(xray_like(seed, (256, 256)))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("hardening-model") / "model", image_size=32, threshold=0.4)


def make_service(model_dir, data_dir, **kwargs):
    from space.service import CxrService
    from space.store import FeedbackStore

    return CxrService(Predictor.from_pretrained(str(model_dir)), FeedbackStore(data_dir, **kwargs))


# ---- corrections are never lost ---------------------------------------------------------------------

def test_api_feedback_has_its_pixels_after_many_predictions_and_a_restart(model_dir, tmp_path):
    service = make_service(model_dir, tmp_path / "data")
    first = service.analyze(xray_bytes(1), channel="api")
    for seed in range(2, 140):  # far more than any in-memory cache would hold
        service.analyze(png_bytes(xray_like(seed, (64, 64))), channel="api", heatmap=False)
    restarted = make_service(model_dir, tmp_path / "data")  # a new process on the same data folder
    restarted.feedback(first.prediction_id, "viral_pneumonia", "radiologist", consent=True)
    fb = restarted.store.feedback_frame()
    assert fb["image_path"].notna().all()
    stored = restarted.store.root / fb.iloc[0]["image_path"]
    from modeling.image_io import load_image, pixel_sha256

    assert pixel_sha256(load_image(stored)) == first.image_sha256


def test_feedback_for_an_expired_staged_image_is_refused_not_stored_without_pixels(model_dir, tmp_path):
    from space.store import StoreError

    service = make_service(model_dir, tmp_path / "data", staging_max_age_s=0.0)
    a = service.analyze(xray_bytes(3), channel="api")
    service.flush()  # the pixels are staged after the answer
    service.store.purge_staging()
    with pytest.raises(StoreError, match="no longer available"):
        service.feedback(a.prediction_id, "normal", "radiologist", consent=True)
    assert service.store.count("feedback") == 0


def test_staging_is_bounded_in_size_oldest_first(model_dir, tmp_path):
    service = make_service(model_dir, tmp_path / "data")
    a = service.analyze(xray_bytes(4), channel="api", heatmap=False)
    time.sleep(0.05)
    b = service.analyze(xray_bytes(5), channel="api", heatmap=False)
    service.flush()
    sizes = {p.stem: p.stat().st_size for p in service.store.staging.glob("*.png")}
    service.store.staging_max_bytes = sizes[b.image_sha256] + 10  # room for one: the newer one stays
    service.store.purge_staging()
    assert service.store.staged_image(a.image_sha256) is None and service.store.staged_image(b.image_sha256) is not None
    service.analyze(xray_bytes(6), channel="batch", heatmap=False)  # batch rows cannot get feedback: not kept
    service.flush()
    assert len(list(service.store.staging.glob("*.png"))) == 1


def test_feedback_needs_consent(model_dir, tmp_path):
    from space.store import StoreError

    service = make_service(model_dir, tmp_path / "data")
    a = service.analyze(xray_bytes(3), channel="api")
    with pytest.raises(StoreError, match="consent"):
        service.feedback(a.prediction_id, "normal", "radiologist")
    assert service.store.count("feedback") == 0 and not list(service.store.images.iterdir())


def test_export_ships_the_newest_label_and_accounts_for_every_feedback_row(model_dir, tmp_path):
    from dataset_scripts.sources import read_manifest

    service = make_service(model_dir, tmp_path / "data")
    a = service.analyze(xray_bytes(7))
    service.feedback(a.prediction_id, "normal", "resident", image=a.image, consent=True)  # UI feedback, with the pixels
    b = service.analyze(xray_bytes(7), channel="api")  # the same film again, over the API
    service.feedback(b.prediction_id, "viral_pneumonia", "radiologist", consent=True)  # the newest reading: a correction
    c = service.analyze(xray_bytes(8), channel="api")
    service.feedback(c.prediction_id, "bacterial_pneumonia", consent=True)
    summary = service.store.export_manifest(tmp_path / "export")
    listing = read_manifest(tmp_path / "export", [])
    labels = {Path(r.path).stem: r.label for r in listing.records}
    assert labels == {a.image_sha256: "viral_pneumonia", c.image_sha256: "bacterial_pneumonia"}
    assert summary["feedback_rows"] == 3 and summary["images"] == 2
    assert summary["superseded_rows"] == 1 and summary["left_out"] == {}
    assert summary["images"] + summary["superseded_rows"] + sum(summary["left_out"].values()) == summary["feedback_rows"]


def test_export_says_what_was_left_out_and_why(model_dir, tmp_path):
    service = make_service(model_dir, tmp_path / "data")
    a = service.analyze(xray_bytes(9))
    service.feedback(a.prediction_id, "normal", image=a.image, consent=True)
    (service.store.root / "images" / f"{a.image_sha256}.png").unlink()  # lost on disk (or removed by hand)
    summary = service.store.export_manifest(tmp_path / "export")
    assert summary["images"] == 0 and summary["feedback_rows"] == 1
    assert summary["left_out"] == {"image file missing": 1}


# ---- batch: every input a row, decompression errors are rows, members streamed ----------------------

def corrupt_zip(path: Path, method: int) -> Path:
    """A zip whose first member's compressed stream is damaged (CRC and headers intact)."""
    good = xray_bytes(20)
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        zf.writestr("a_broken.png", png_bytes(xray_like(21, (256, 256))))
        zf.writestr("b_good.jpg", good)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("a_broken.png")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for i in range(start + 8, start + min(info.compress_size, 400), 3):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA],
                         ids=["deflate", "bzip2", "lzma"])
def test_a_corrupt_member_is_a_row_and_the_batch_goes_on(model_dir, tmp_path, method):
    service = make_service(model_dir, tmp_path / "data")
    z = corrupt_zip(tmp_path / "studies.zip", method)
    after = tmp_path / "after.jpg"
    after.write_bytes(xray_bytes(22))
    rows = service.batch([str(z), str(after)])
    assert [r["file"] for r in rows] == ["a_broken.png", "b_good.jpg", "after.jpg"]
    assert rows[0]["error"] and "compressed data" in rows[0]["error"]
    assert not rows[1]["error"] and not rows[2]["error"]


def test_files_past_the_batch_limit_get_a_row_and_are_deleted(model_dir, tmp_path, monkeypatch):
    import space.service as svc

    monkeypatch.setattr(svc, "MAX_BATCH_FILES", 3)
    service = make_service(model_dir, tmp_path / "data")
    paths = []
    for i in range(5):
        p = tmp_path / f"up{i}" / f"Doe_Jane_{i}.jpg"
        p.parent.mkdir()
        p.write_bytes(xray_bytes(30 + i))
        paths.append(str(p))
    rows = service.batch(paths, release=lambda p: p.unlink(missing_ok=True))
    assert len(rows) == 5
    assert [bool(r["error"]) for r in rows] == [False, False, False, True, True]
    assert all("limit" in r["error"] for r in rows[3:])
    assert not any(Path(p).exists() for p in paths)  # read or not, every upload is gone
    assert service.store.count("predictions") == 3


def test_zip_members_are_read_one_at_a_time(model_dir, tmp_path, monkeypatch):
    """Memory is bounded by one member: the archive is not loaded whole and members are not all read
    before the first prediction."""
    import space.service as svc

    z = tmp_path / "many.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i in range(4):
            zf.writestr(f"{i}.jpg", xray_bytes(40 + i))
    service = make_service(model_dir, tmp_path / "data")
    events = []
    real_read = svc.read_member

    def spy_read(zf, info):
        events.append(("read", info.filename))
        return real_read(zf, info)

    real_analyze = service.analyze

    def spy_analyze(payload, **kw):
        events.append(("predict", None))
        return real_analyze(payload, **kw)

    monkeypatch.setattr(svc, "read_member", spy_read)
    monkeypatch.setattr(service, "analyze", spy_analyze)
    real_upload = svc.read_upload

    def spy_upload(source, **kw):
        if not isinstance(source, (bytes, bytearray)):
            pytest.fail("the archive was read into memory whole")
        return real_upload(source, **kw)

    monkeypatch.setattr(svc, "read_upload", spy_upload)
    rows = service.batch([str(z)])
    assert len(rows) == 4 and not any(r["error"] for r in rows)
    assert [e[0] for e in events] == ["read", "predict"] * 4


# ---- a batch does not starve single predictions (the app test checks the concurrency groups) --------

def test_model_lock_gives_waiting_interactive_calls_priority():
    from space.service import ModelLock

    lock = ModelLock()
    order = []
    with lock.background():
        threads = [threading.Thread(target=lambda: _hold(lock.background, order, "batch")),
                   threading.Thread(target=lambda: _hold(lock.interactive, order, "single"))]
        threads[0].start()
        time.sleep(0.05)
        threads[1].start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert order == ["single", "batch"]


def _hold(ctx, order, name):
    with ctx():
        order.append(name)


def test_space_applies_the_de_identification_and_symmetry_policies(model_dir, tmp_path):
    """The policies the contributor validator applies (modeling.dicom, modeling.quality) hold in the
    Space too: identifying DICOM tags are named (never their values), burned-in text is refused, an
    asymmetric film gets a note."""
    from synthetic import PATIENT, make_dicom

    from space.service import InputError

    service = make_service(model_dir, tmp_path / "data")
    film = np.asarray(xray_like(7, (256, 256)), dtype=np.uint8)
    a = service.analyze(make_dicom(film, **PATIENT))
    note = next(n for n in a.notes if "identifying DICOM tags" in n)
    assert "PatientName" in note and "PatientID" in note
    assert not any(v in " ".join(a.notes) for v in PATIENT.values())
    with pytest.raises(InputError, match="BurnedInAnnotation"):
        service.analyze(make_dicom(film, BurnedInAnnotation="YES"))
    half = np.zeros((256, 256), np.uint8)
    half[:, :128] = film[:, :128]  # one side only: far from left-right symmetric
    b = service.analyze(png_bytes(Image.fromarray(half)))
    assert any("not left-right symmetric" in n for n in b.notes)


def test_an_archive_listing_too_many_entries_is_one_row_and_not_parsed(model_dir, tmp_path, monkeypatch):
    import space.service as svc

    monkeypatch.setattr(svc, "MAX_ZIP_ENTRIES", 5)
    z = tmp_path / "flood.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i in range(8):
            zf.writestr(f"{i}.txt", b"")
    monkeypatch.setattr(zipfile.ZipFile, "infolist", lambda self: pytest.fail("the directory was parsed"))
    rows = make_service(model_dir, tmp_path / "data").batch([str(z)])
    assert len(rows) == 1 and "8 entries" in rows[0]["error"]
    assert svc.zip_entry_count(z) == 8


def test_rows_past_the_row_cap_are_counted_in_one_row(model_dir, tmp_path, monkeypatch):
    import space.service as svc

    monkeypatch.setattr(svc, "MAX_BATCH_FILES", 2)
    monkeypatch.setattr(svc, "MAX_BATCH_ROWS", 4)
    z = tmp_path / "many.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i in range(10):
            zf.writestr(f"{i:02d}.jpg", xray_bytes(60 + i))
    rows = make_service(model_dir, tmp_path / "data").batch([str(z)])
    assert len(rows) == 5 and [bool(r["error"]) for r in rows] == [False, False, True, True, True]
    assert rows[-1]["file"] == "... and 6 more" and "6 more inputs" in rows[-1]["error"]


def test_an_archive_removed_during_its_batch_is_still_read(model_dir, tmp_path):
    """Each archive is opened once; the open handle survives the file being deleted (by the sweeper,
    or by an identical upload's batch finishing first)."""
    z = tmp_path / "studies.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i in range(3):
            zf.writestr(f"{i}.jpg", xray_bytes(80 + i))
    service = make_service(model_dir, tmp_path / "data")
    real = service.analyze

    def analyze_then_delete(payload, **kw):
        z.unlink(missing_ok=True)
        return real(payload, **kw)

    service.analyze = analyze_then_delete
    rows = service.batch([str(z)])
    assert len(rows) == 3 and not any(r["error"] for r in rows)
    gone = service.batch([str(z)])
    assert len(gone) == 1 and "gone" in gone[0]["error"]


def test_private_temp_folder_is_a_subfolder_of_an_operators_temp_dir(tmp_path, monkeypatch):
    from space.files import private_temp_dir

    monkeypatch.delenv("CXR_TMP_DIR", raising=False)
    root = private_temp_dir(tmp_path)
    assert root.parent == tmp_path and root.name.startswith("cxr-space-") and (root.stat().st_mode & 0o777) == 0o700
    assert private_temp_dir(root) == root  # idempotent: importing the app twice does not nest folders
    # an operator's CXR_TMP_DIR too (review of issue 21): the sweeper deletes everything old in the folder,
    # so CXR_TMP_DIR=/tmp must not make it sweep /tmp; the app's folder is one of its own inside it
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    (shared / "someone-elses-file").write_text("x")
    monkeypatch.setenv("CXR_TMP_DIR", str(shared))
    own = private_temp_dir()
    assert own.parent == shared and own.name.startswith("cxr-space-") and (own.stat().st_mode & 0o777) == 0o700
    monkeypatch.setenv("CXR_TMP_DIR", str(own))
    assert private_temp_dir() == own


def test_an_upload_given_to_several_events_is_deleted_by_the_last_one(tmp_path):
    """Gradio's upload paths are content-addressed: identical uploads share one path, so each upload is
    counted and the file goes when the last event given it releases it."""
    from space.files import TempFiles

    files = TempFiles(tmp_path / "tmp")
    up = files.root / "3f2a" / "same.jpg"
    up.parent.mkdir()
    up.write_bytes(b"film")
    files.claim([up, up, tmp_path / "elsewhere.jpg"])  # two uploads; a path outside the folder is not counted
    files.release(up)
    assert up.exists() and files.claims(up) == 1
    assert files.consume(up) == b"film" and not up.exists() and files.claims(up) == 0

    up.write_bytes(b"film")
    files.claim([up])
    new = up.with_name("incoming")  # another identical upload renamed in before its count arrives
    new.write_bytes(b"film")
    os.replace(new, up)
    files.release(up)
    assert up.exists()  # left to the event on its way...
    files.claim([up])
    files.release(up)
    assert not up.exists()  # ...which deletes it

    unclaimed = files.root / "9c1b" / "fetched.jpg"  # e.g. a URL Gradio fetched for an API call
    unclaimed.parent.mkdir()
    unclaimed.write_bytes(b"film")
    files.release(unclaimed)
    assert not unclaimed.exists()
    up.write_bytes(b"film")
    files.claim([up])
    files.sweep(now=time.time() + 10 * files.max_age_s)  # the sweeper still bounds a forgotten upload's age
    assert not up.exists() and files.claims(up) == 0


def test_uploads_are_counted_by_absolute_path(tmp_path, monkeypatch):
    """An operator's relative temp folder: Gradio answers the upload with a relative path and hands the
    handler the absolute one; both must name one upload."""
    from space.files import TempFiles

    monkeypatch.chdir(tmp_path)
    files = TempFiles("tmp")
    up = Path("tmp") / "ab" / "x.jpg"
    up.parent.mkdir(parents=True)
    up.write_bytes(b"film")
    files.claim([up, up])
    files.release(up.absolute())
    assert up.exists() and files.claims(up.absolute()) == 1
    files.release(up)
    assert not up.exists()


def test_the_upload_middleware_counts_each_answered_upload(tmp_path):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from space.files import ClaimUploads, TempFiles

    files = TempFiles(tmp_path / "tmp")
    up = files.root / "ab" / "x.jpg"
    up.parent.mkdir()
    up.write_bytes(b"film")

    async def upload(request):
        if request.query_params.get("fail"):
            return PlainTextResponse("too large", status_code=413)
        return JSONResponse([str(up)])

    app = ClaimUploads(Starlette(routes=[Route("/gradio_api/upload", upload, methods=["POST", "GET"])]), files)
    with TestClient(app) as client:
        assert client.post("/gradio_api/upload").json() == [str(up)]
        client.post("/gradio_api/upload?fail=1")  # refused: no event will come for it
        client.get("/gradio_api/upload")
        assert files.claims(up) == 1
        client.post("/gradio_api/upload")
        assert files.claims(up) == 2


async def _post_upload(app, length: int) -> int:
    """One upload request of ``length`` declared bytes through an ASGI app; its status (500 when the app
    raised)."""
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/gradio_api/upload",
             "headers": [(b"content-length", str(length).encode())]}
    try:
        await app(scope, receive, send)
    except RuntimeError:
        return 500
    return sent[0]["status"]


async def _answers_nothing(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"[]"})


def test_uploads_streaming_at_the_same_moment_share_the_pending_budget(tmp_path):
    """Review of issue 21: the budget counted only uploads already in place, so uploads arriving together
    each passed the check against the same total. An admitted upload's declared length is held
    against the budget until its request is done; a failing upload gives it back; one declaring more
    than the whole budget is told so at once (413)."""
    import asyncio

    from space.files import ClaimUploads, TempFiles

    files = TempFiles(tmp_path / "tmp", pending_max_bytes=100)
    calls = []

    async def scenario():
        first_may_finish = asyncio.Event()

        async def gradio_upload(scope, receive, send):
            calls.append(scope)
            if len(calls) == 1:
                await first_may_finish.wait()  # still streaming its body
            await _answers_nothing(scope, receive, send)

        app = ClaimUploads(gradio_upload, files)
        first = asyncio.create_task(_post_upload(app, 60))
        while not calls:
            await asyncio.sleep(0.01)
        second = await _post_upload(app, 60)  # 60 + 60 > 100 while the first is still in flight
        first_may_finish.set()
        return await first, second, await _post_upload(app, 60)  # the first is done: room again

    assert asyncio.run(scenario()) == (200, 503, 200)
    assert len(calls) == 2

    async def failing(scope, receive, send):
        raise RuntimeError("Gradio's upload route failed")

    async def more():
        return (await _post_upload(ClaimUploads(failing, files), 90),
                await _post_upload(ClaimUploads(_answers_nothing, files), 90),
                await _post_upload(ClaimUploads(_answers_nothing, files), 101))

    assert asyncio.run(more()) == (500, 200, 413)


def test_only_uploaded_files_are_accepted_and_released_never_folders_links_or_outputs(tmp_path):
    """Issue 21: Gradio accepts any path inside its upload folder, the folder itself included. An upload
    is a regular file at <root>/<hash>/<name>; anything else is refused by consume and left alone by
    release (which used to rename the whole temp folder away, out of the sweeper's reach)."""
    import stat

    from space.files import NotAnUpload, TempFiles, private_temp_dir

    root = private_temp_dir(tmp_path / "gradio")
    files = TempFiles(root)
    upload = root / "abc123" / "film.png"
    upload.parent.mkdir()
    upload.write_bytes(b"film")
    link = root / "abc123" / "link.png"
    os.symlink(upload, link)
    out = files.scratch("batch") / "predictions.csv"
    out.write_text("x")
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(b"x")
    for bad, why in ((root, "not an uploaded file"), (upload.parent, "not an uploaded file"),
                     (link, "folder or a link"), (out, "not an uploaded file"), (outside, "outside")):
        assert why in files.upload_problem(bad)
        with pytest.raises(NotAnUpload, match="not accepted"):
            files.consume(bad)
        files.release(bad)
        assert os.path.lexists(bad)
    assert root.is_dir() and stat.S_IMODE(root.stat().st_mode) == 0o700
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # nothing renamed beside it
    assert files.upload_problem(upload) is None and files.consume(upload) == b"film" and not upload.exists()


def test_the_apps_settings_reach_what_they_configure(tmp_path, monkeypatch):
    """Issue 21: CXR_UNCERTAIN_HIGH, CXR_STAGING_DAYS / _MB, CXR_QUEUE_SIZE, CXR_ADMINS, CXR_PENDING_UPLOADS_MB
    are read where the app reads them (AppConfig.from_env, make_service, AccessPolicy.from_env)."""
    from space.access import AccessPolicy
    from space.app import AppConfig, make_service

    model = save_tiny_classifier(tmp_path / "m", image_size=32, threshold=0.3)
    for k, v in {"MODEL_ID": str(model), "CXR_DATA_DIR": str(tmp_path / "data"), "CXR_UNCERTAIN_HIGH": "0.8",
                 "CXR_STAGING_DAYS": "2", "CXR_STAGING_MAX_MB": "5", "CXR_QUEUE_SIZE": "7", "CXR_ADMINS": "Dr-Lee, mo",
                 "CXR_PENDING_UPLOADS_MB": "3", "CXR_PRECISION": "float32"}.items():
        monkeypatch.setenv(k, v)
    cfg = AppConfig.from_env()
    assert (cfg.uncertain_high, cfg.staging_days, cfg.staging_max_mb, cfg.queue_size, cfg.pending_uploads_mb) == (
        0.8, 2.0, 5.0, 7, 3.0)
    service = make_service(cfg)
    assert service.uncertain_high == 0.8
    assert service.store.staging_max_age_s == 2 * 86400 and service.store.staging_max_bytes == 5 * 2**20
    assert AccessPolicy.from_env().admins == frozenset({"dr-lee", "mo"})
    monkeypatch.setenv("CXR_UNCERTAIN_HIGH", "0.1")  # below the threshold: the band starts at the threshold
    assert make_service(AppConfig.from_env()).uncertain_high == 0.3
    assert cfg.compile is True  # CXR_COMPILE: on unless switched off
    for off in ("0", "false", "off"):
        monkeypatch.setenv("CXR_COMPILE", off)
        assert AppConfig.from_env().compile is False


def test_the_warmup_compiles_when_asked_and_the_service_still_answers(tmp_path, monkeypatch):
    """service.warmup(compile=True) (CXR_COMPILE=1 at start-up) compiles the plain path; a compiler that
    fails leaves the service answering on the eager network."""
    import torch

    from space.app import AppConfig, make_service

    model = save_tiny_classifier(tmp_path / "m", image_size=32)
    cfg = AppConfig(model_id=str(model), revision=None, data_dir=tmp_path / "data", precision="float32")
    calls = []
    monkeypatch.setattr(torch, "compile", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(OSError("no cc")))
    service = make_service(cfg)
    service.warmup(compile=True)
    assert calls == [1] and service.predictor._compiled is None
    assert service.analyze(xray_bytes(3), heatmap=False).prediction.label
    service.warmup(compile=False)
    assert calls == [1]


def test_pixels_are_staged_after_the_answer_and_feedback_waits_for_them(model_dir, tmp_path):
    """Issue 21 (the request path): staging the PNG is not on the request's path any more; feedback sent
    right after the answer still finds the pixels (it waits for the writer), in order."""
    import threading

    service = make_service(model_dir, tmp_path / "data")
    gate = threading.Event()
    service._after(gate.wait)  # hold the writer: the next staging waits behind it
    try:
        a = service.analyze(xray_bytes(7), channel="api", heatmap=False)
        assert service.store.staged_image(a.image_sha256) is None  # the answer came before the staging
        threading.Timer(0.2, gate.set).start()
        service.feedback(a.prediction_id, "normal", "radiologist", consent=True)  # waits, then finds the pixels
        assert service.store.count("feedback") == 1 and service.store.staged_image(a.image_sha256) is not None
    finally:
        gate.set()
        service.close()


def test_the_output_route_serves_only_a_regular_file_directly_in_an_output_folder(tmp_path):
    """TempFiles.output_file: the output URL names one file of a scratch folder; a climb out, a link, a
    nested folder, a made-up folder or an upload is nothing (the route answers 404); HEAD leaves a
    serve-once file in place, and of two GETs only one gets it."""
    import asyncio
    import os

    from space.files import ClaimUploads, TempFiles

    files = TempFiles(tmp_path / "tmp")
    out = files.scratch("batch")
    (out / "predictions.csv").write_text("a,b\n")
    (out / "sub").mkdir()
    (out / "sub" / "x.csv").write_text("x")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    os.symlink(secret, out / "link.csv")
    route = files.output_route(out / "predictions.csv")
    folder, name = route.rsplit("/", 2)[-2:]
    assert files.output_file(folder, name) == out / "predictions.csv"
    for f, n in ((folder, "link.csv"), (folder, "sub"), (folder, ".."), ("..", "secret.txt"),
                 (folder, "../../secret.txt"), ("batch-" + "0" * 32, "predictions.csv"), ("cxr-scratch", folder)):
        assert files.output_file(f, n) is None, (f, n)
    with pytest.raises(ValueError):
        files.output_route(secret)

    once = files.scratch("export", serve_once=True)
    (once / "feedback.zip").write_bytes(b"PK" + b"0" * 100)
    app = ClaimUploads(None, files)

    async def get(method: str, path: str) -> tuple[int, bytes]:
        sent, body, asked = {}, bytearray(), []

        async def receive():  # the request's (empty) body, then nothing until the response is done
            if asked:
                await asyncio.Event().wait()
            asked.append(1)
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            else:
                body.extend(message.get("body", b""))

        await app({"type": "http", "method": method, "path": path, "headers": [], "query_string": b"",
                   "root_path": ""}, receive, send)
        return sent["status"], bytes(body)

    url = files.output_route(once / "feedback.zip")
    assert asyncio.run(get("HEAD", url))[0] == 200 and (once / "feedback.zip").exists()
    async def two():
        return await asyncio.gather(get("GET", url), get("GET", url))

    statuses = sorted(status for status, _ in asyncio.run(two()))
    assert statuses == [200, 404] and not list(once.iterdir())
    assert asyncio.run(get("GET", "/cxr-output/../secret.txt"))[0] == 404


def test_staged_pixels_expire_without_any_new_prediction(model_dir, tmp_path):
    """Review of issue 21: the staging purge ran only from analyze (at most once a minute), so with no new
    prediction the staged pixels of a quiet Space stayed past CXR_STAGING_DAYS. The service's
    housekeeping timer purges them whatever the traffic, and once when it starts."""
    service = make_service(model_dir, tmp_path / "data", staging_max_age_s=0.5)
    a = service.analyze(xray_bytes(8), channel="api", heatmap=False)
    service.flush()
    assert service.store.staged_image(a.image_sha256) is not None
    service.start_housekeeping(every_s=0.2)
    try:
        deadline = time.time() + 10
        while service.store.staged_image(a.image_sha256) is not None and time.time() < deadline:
            time.sleep(0.1)
        assert service.store.staged_image(a.image_sha256) is None
    finally:
        service.close()
    assert not any(t.name == "cxr-housekeeping" and t.is_alive() for t in threading.enumerate())


def test_the_app_starts_the_housekeeping_and_queues_with_the_configured_size(tmp_path, monkeypatch):
    """CXR_QUEUE_SIZE reaches Gradio's queue and the staging purge runs on a timer, through the one function
    the app's main() serves with (prepare_serving)."""
    from space.app import AppConfig, build_app, make_service, prepare_serving

    model = save_tiny_classifier(tmp_path / "m", image_size=32)
    cfg = AppConfig(model_id=str(model), revision=None, data_dir=tmp_path / "data", precision="float32",
                    queue_size=7, staging_days=0.5 / 86400)
    service = make_service(cfg)
    demo = build_app(service, cfg)
    started = []
    monkeypatch.setattr(type(service), "start_housekeeping", lambda self, **k: started.append(k))
    queued = prepare_serving(demo, service, cfg)
    assert queued._queue.max_size == 7 and started
    service.close()


@pytest.mark.parametrize("consent", [False, None, "true", "yes", 1, {"a": 0}])
def test_the_ui_feedback_handler_stores_only_for_a_ticked_box(model_dir, tmp_path, consent):
    """Review of issue 21: consent was tested over /feedback and in the service, never in the UI handler,
    which checks it itself before passing it on. Anything but the ticked box (True) is refused with the
    reason, and nothing is written."""
    import gradio as gr

    from space.app import AppConfig, build_app

    service = make_service(model_dir, tmp_path / "data")
    demo = build_app(service, AppConfig(model_id="m", revision=None, data_dir=tmp_path / "data"))
    ui_feedback = next(f.fn for f in demo.fns.values() if f.name == "ui_feedback")
    a = service.analyze(xray_bytes(9), channel="ui")
    state = {"prediction_id": a.prediction_id, "label": a.prediction.label, "image_sha256": a.image_sha256}
    with pytest.raises(gr.Error, match="confirm that the image carries no identifying information"):
        ui_feedback(state, "normal", "radiologist", "", consent)
    assert service.store.count("feedback") == 0 and not list(service.store.images.iterdir())
    assert "stored" in ui_feedback(state, "normal", "radiologist", "", True)
    assert service.store.count("feedback") == 1
    service.close()


def test_the_overlay_is_blended_and_sent_at_display_size():
    """Issue 21 item 6: the overlay is brought to display size before blending and encoding (a 3000 px film
    was blended and encoded whole): the answer's PNG is at most 1024 px (768 in the page), keeps the
    film's shape, and a small film is sent at its own size."""
    import base64
    import re

    from space.app import overlay_html, overlay_png

    film = xray_like(11, (3000, 2400))
    heat = np.random.default_rng(0).random((2400, 3000)).astype(np.float32)
    big = Image.open(io.BytesIO(overlay_png(film, heat, 0.4)))
    assert big.size == (1024, 819) and big.mode == "RGB"
    html = overlay_html(film, heat, 0.4)
    page = Image.open(io.BytesIO(base64.b64decode(re.search(r'base64,([^"]+)"', html).group(1))))
    assert page.size == (768, 614)
    small = xray_like(12, (320, 256))
    assert Image.open(io.BytesIO(overlay_png(small, np.zeros((256, 320), np.float32), 0.4))).size == (320, 256)
