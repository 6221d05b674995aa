"""What the Space does, without the UI: analyse a file, record it, take feedback, run a batch.

Kept apart from :mod:`app` (Gradio layout) so each piece is a plain function that tests call directly
and that the UI and the API endpoints share: the UI tab, ``/predict`` and the batch tab go through
:meth:`CxrService.analyze`, so they cannot disagree.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import lzma
import os
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from modeling.archive import (NOT_A_CHEST_FILM, correct_and_repredict, decision_for, error_row, film_refusal,
                              prediction_row, read_film)
from modeling.image_io import ImageLoadError, pixel_sha256
from modeling.labels import DISPLAY_NAMES, LABELS
from modeling.decision import decide, default_uncertain_high  # noqa: F401 (re-exported)
from modeling.model_thread import ModelThread
from modeling.predict import Prediction, Predictor

from .store import FeedbackStore, PredictionRecord, StoreError

LABEL_NAMES = DISPLAY_NAMES  # modeling.labels: one place
logger = logging.getLogger(__name__)
MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # a large uncompressed DICOM CR is ~30 MB
MAX_BATCH_FILES = 200
MAX_ZIP_UNCOMPRESSED = 1024 * 1024 * 1024


class InputError(ValueError):
    """An upload the Space will not analyse; ``str()`` is the message shown to the user, ``reason`` a
    stable code (the archive's, :data:`modeling.archive.COLUMNS`' ``reason``)."""

    def __init__(self, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Analysis:
    prediction: Prediction
    prediction_id: str
    decision: str  # no_pneumonia | uncertain | pneumonia | out_of_scope (no label, no call: modeling.scope)
    verdict: str  # one readable sentence
    latency_ms: float
    image_sha256: str
    notes: list[str] = field(default_factory=list)
    image: Image.Image | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        p = self.prediction
        return {
            "prediction_id": self.prediction_id,
            "label": p.label,
            "probabilities": p.probabilities,
            "pneumonia_probability": p.pneumonia_probability,
            "threshold": p.threshold,
            "decision": self.decision,
            "verdict": self.verdict,
            "heatmap_class": p.heatmap_class,
            "latency_ms": round(self.latency_ms, 1),
            "image_size": list(p.image_size),
            "image_sha256": self.image_sha256,
            "notes": self.notes,
            "gate": None if p.gate is None else p.gate.to_dict(),
            "scope": None if p.scope is None else p.scope.to_dict(),
        }


def read_upload(path_or_bytes: str | os.PathLike | bytes) -> bytes:
    """The bytes of a file (or bytes as given), size-checked before reading. Deleting uploads is
    space.files' job (the app takes uploads through ``TempFiles.consume``)."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        data = bytes(path_or_bytes)
    else:
        path = Path(path_or_bytes)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise InputError("The uploaded file is gone: uploads are deleted once analysed (they are never kept). "
                             "Upload it again.") from None
        if size > MAX_UPLOAD_BYTES:
            raise InputError(f"The file is {size / 2**20:.0f} MB; the limit is {MAX_UPLOAD_BYTES / 2**20:.0f} MB.")
        data = path.read_bytes()
    if not data:
        raise InputError("The file is empty (0 bytes).")
    return data


class ModelLock:
    """One model call at a time, and single predictions first: a batch takes the model image by image
    (:meth:`background`) and yields it to any waiting interactive call (:meth:`interactive`), so a
    /predict waits for at most one batch image, not for the whole batch. (A plain ``threading.Lock``
    gives no such order: the batch thread often re-acquires it first.)"""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._waiting = 0

    @contextlib.contextmanager
    def interactive(self):
        with self._cond:
            self._waiting += 1
            try:
                self._cond.wait_for(lambda: not self._busy)
            finally:
                self._waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            self._release()

    @contextlib.contextmanager
    def background(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._busy and not self._waiting)
            self._busy = True
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()


class CxrService:
    """The Space's behaviour. Thread-safe: the model is used by one call at a time (:class:`ModelLock`;
    the Gradio queue limits concurrency too, this also covers direct Python use)."""

    def __init__(self, predictor: Predictor, store: FeedbackStore, *, uncertain_high: float | None = None,
                 max_side: int | None = 2048, max_batch_files: int | None = None,
                 model_thread: ModelThread | None = None) -> None:
        self.predictor = predictor
        # Every model call runs on this one thread, whichever request thread asks: Gradio's pool of
        # handler threads would otherwise start an OpenMP team each and slow every pass by ~1.7x
        # (modeling.model_thread). make_service loads the model on it as well.
        self.model_thread = model_thread or ModelThread()
        self.store = store
        self.max_side = max_side  # working size: larger films are reduced while decoding (memory, time)
        self.max_batch_files = max_batch_files
        t = predictor.threshold
        # Default band: from the threshold halfway to 1, and at least to 0.5. A fixed 0.5 would leave no
        # band at all for a model whose validation threshold is above 0.5 (the v2 release's is 0.59).
        self.uncertain_high = default_uncertain_high(t) if uncertain_high is None else max(float(uncertain_high), t)
        self._lock = ModelLock()
        self._last_purge = 0.0
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-staging")
        self._stop_housekeeping = threading.Event()
        self._housekeeping: threading.Thread | None = None

    def _after(self, fn, *args) -> None:
        """Run a store write after the answer, in order, on the writer thread (a failure is logged)."""
        def run() -> None:
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a failed staging must not take the writer down
                logger.exception("background store write failed")
        self._writer.submit(run)

    def start_housekeeping(self, every_s: float = 600.0) -> threading.Thread:
        """Purge expired staged pixels now and every ``every_s`` seconds, on the writer thread (after any
        staging queued before it). :meth:`analyze` also purges at most once a minute, but a quiet Space
        makes no predictions: without this timer its staged pixels would outlive ``CXR_STAGING_DAYS``."""
        def loop() -> None:
            while True:
                self._after(self.store.purge_staging)
                if self._stop_housekeeping.wait(every_s):
                    return

        t = threading.Thread(target=loop, name="cxr-housekeeping", daemon=True)
        t.start()
        self._housekeeping = t
        return t

    def close(self) -> None:
        """Stop the housekeeping timer, finish the queued store writes, stop the writer and model threads."""
        self._stop_housekeeping.set()
        if self._housekeeping is not None:
            self._housekeeping.join()
        self._writer.shutdown(wait=True)
        self.model_thread.close()

    def flush(self) -> None:
        """Wait for the store writes queued so far (staged pixels) to land."""
        self._writer.submit(lambda: None).result()

    def staged_image(self, sha256: str) -> Image.Image | None:
        """The staged pixels of an analysed film (after any pending write of them)."""
        self.flush()
        return self.store.staged_image(sha256)

    def warmup(self, compile: bool = False) -> None:
        """One unrecorded prediction with Grad-CAM, so the first user does not pay for lazy imports
        and first-call allocations (~1 s on 2 cores); with ``compile``, the plain-prediction network is
        compiled first (:meth:`Predictor.compile`: tens of seconds, once)."""
        img = Image.fromarray((np.indices((256, 256)).sum(0) % 256).astype(np.uint8), "L")
        def run() -> None:
            self.predictor.predict_one(img, heatmap=True)
            if compile:
                info = self.predictor.compile(img)
                (logger.info if info["compiled"] else logger.warning)("compilation: %s", info)
            # CXR_BACKEND=auto: keep whichever plain-prediction path is faster on this machine
            if timings := self.predictor.choose_backend(img):
                logger.info("backend %s chosen (median ms: %s)", self.predictor.backend, timings)

        with self._lock.interactive():
            self.model_thread.call(run)

    # --- single image --------------------------------------------------------------------------
    def load(self, data: bytes) -> tuple[Image.Image, list[str]]:
        """Decode and gate an upload. Raises :class:`InputError` with a readable message."""
        try:
            film = read_film(data, max_side=self.max_side)
        except ImageLoadError as exc:
            raise InputError(f"Cannot read this file: {exc.detail}", exc.reason) from None
        if refusal := film_refusal(film):  # the archive refuses the same films, with the same codes
            reason, why = refusal
            raise InputError(f"This {why}." if reason == "not_a_chest_xray" else
                             f"{why[0].upper()}{why[1:]}: upload a film without it.", reason)
        notes = list(film.notes)
        if film.identifying_tags:
            notes.append("identifying DICOM tags were present and are not stored (only the pixels are used): "
                         + ", ".join(film.identifying_tags))
        gray = film.gray
        notes += film.warnings
        return gray, notes

    def analyze(self, upload: str | os.PathLike | bytes, *, target_class: str | None = None,
                channel: str = "ui", heatmap: bool = True) -> Analysis:
        """Load, gate, predict (+ Grad-CAM), record. Nothing is recorded when anything fails."""
        data = read_upload(upload)
        gray, notes = self.load(data)
        if target_class in (None, "", "predicted"):
            target_class = None
        elif target_class not in LABELS:
            raise InputError(f"Unknown heatmap class {target_class!r}; choose one of {', '.join(LABELS)}.")
        t0 = time.perf_counter()
        with (self._lock.background() if channel == "batch" else self._lock.interactive()):
            # One pass: the learned gate (modeling.gate) and the scope check (modeling.scope) read the
            # head features of the very pass that Grad-CAM makes (in the predictor's compute precision,
            # the one they were fit in). Without a heatmap (batch rows, API calls asking for none) the
            # pass may be the compiled copy's (Predictor.compile), within bf16 arithmetic of it. A film turned
            # upright is predicted (and explained) again; a film outside the model's scope gets no
            # heatmap (it would explain an answer not given).
            gray, pred, corrected = self.model_thread.call(self._predict, gray, heatmap, target_class)
            notes += corrected
            if pred.gate is not None:
                if pred.gate.out_of_distribution:
                    raise InputError(f"This {NOT_A_CHEST_FILM}{pred.gate.refusal()}.",
                                     "gate_refused")
                if caution := pred.gate.caution():
                    notes.append(caution)
            if pred.out_of_scope:
                pred = dataclasses.replace(pred, heatmap=None, heatmap_class=None)
        latency = (time.perf_counter() - t0) * 1000
        decision, verdict = decision_for(pred, self.uncertain_high)
        sha = pixel_sha256(gray)
        pid = self.store.record_prediction(PredictionRecord(
            model_id=self.predictor.model_id or "unknown", model_revision=self.predictor.revision or "unknown",
            image_sha256=sha, width=gray.size[0], height=gray.size[1], probabilities=pred.probabilities,
            pneumonia_probability=pred.pneumonia_probability, label=pred.label or "", decision=decision,
            threshold=pred.threshold, latency_ms=latency, channel=channel))
        # Staging the pixels (a PNG encode: ~0.1 s for a 2048 px film) happens after the answer, on one
        # writer thread; what reads staged images (feedback, another heatmap class) waits for it first.
        if channel != "batch":  # feedback may come later (API, restart); batch rows cannot get feedback
            self._after(self.store.stage_image, gray, sha)
        if time.time() - self._last_purge > 60:
            self._last_purge = time.time()
            self._after(self.store.purge_staging)
        return Analysis(prediction=pred, prediction_id=pid, decision=decision, verdict=verdict, latency_ms=latency,
                        image_sha256=sha, notes=notes, image=gray)

    def _predict(self, gray: Image.Image, heatmap: bool, target_class: str | None
                 ) -> tuple[Image.Image, Prediction, list[str]]:
        """The model's part of :meth:`analyze` (run on the model thread): the pass, and a film the gate
        finds turned or inverted put upright and predicted again."""
        pred = self.predictor.predict_one(gray, heatmap=heatmap, target_class=target_class)
        return correct_and_repredict(self.predictor, gray, pred, heatmap=heatmap, target_class=target_class)

    def heatmap(self, image: Image.Image, target_class: str | None) -> Prediction:
        """Grad-CAM for another class on an already-analysed image (not recorded again)."""
        if target_class in (None, "", "predicted"):
            target_class = None
        with self._lock.interactive():
            return self.model_thread.call(self.predictor.predict_one, image, heatmap=True, target_class=target_class)

    # --- feedback ------------------------------------------------------------------------------
    def feedback(self, prediction_id: str, label: str, role: str = "not specified", note: str = "",
                 image: Image.Image | None = None, *, consent: bool = False) -> int:
        """Store a clinician's reading of a prediction. ``consent``: the clinician confirmed that the image
        carries no identifiers and agreed to share the reading and the de-identified image (the UI's
        checkbox; API clients pass it explicitly): without it nothing is stored. The image comes from the
        UI session or, for API clients (which send only the prediction id), from the store's staging of
        predicted images."""
        if consent is not True:  # an explicit yes only: a truthy string or object is not consent
            raise StoreError("feedback needs consent: confirm that the image carries no identifying information "
                             "and that you share your reading and the de-identified image (consent=True)")
        pred = self.store.get_prediction(str(prediction_id))
        if pred is not None and pred["decision"] == "out_of_scope":
            raise StoreError("this film was outside what the model was trained on (no answer was given), so a "
                             "reading of it would not be pediatric training data: feedback is not stored for it")
        self.flush()  # its staged pixels may still be on the writer thread
        return self.store.add_feedback(prediction_id, label, role=role, note=note, image=image)

    # --- batch ---------------------------------------------------------------------------------
    def batch(self, uploads: Iterable[str | os.PathLike], progress: Callable[[float, str], None] | None = None,
              release: Callable[[Path], None] | None = None) -> list[dict]:
        """Analyse many files (zips are opened) without Grad-CAM. One row per input, failures and
        skipped files included with the reason (past MAX_BATCH_ROWS, one row counts the rest); never
        raises for a bad file or member. Each archive is opened once and its members read one at a time
        (memory is bounded by one image). ``release`` is called for every upload when the batch is done,
        also for those past the batch limit (the app's deletes an upload once no other queued request
        was given the same path); without it the uploads are left as they are."""
        uploads = [Path(u) for u in uploads]
        rows: list[dict] = []
        with contextlib.ExitStack() as archives:
            try:
                plan = plan_batch(uploads, self.max_batch_files, archives)
                for i, item in enumerate(plan, start=1):
                    if progress:
                        progress((i - 1) / max(1, len(plan)), f"{i}/{len(plan)}")
                    row = {"#": i, "file": item.name}
                    try:
                        a = self.analyze(item.read(), channel="batch", heatmap=False)
                        row.update(prediction_row(a.prediction, a.decision, a.image_sha256))
                    except InputError as exc:
                        row.update(error_row(exc.reason, str(exc)))
                    rows.append(row)
            finally:
                if release:  # an open archive stays readable after its file is unlinked
                    for u in uploads:
                        release(u)
        if progress:
            progress(1.0, "done")
        return rows


@dataclass
class BatchItem:
    """One input of a batch: a file, a member of an open archive, or a reason it will not be read."""

    name: str
    path: Path | None = None
    archive: zipfile.ZipFile | None = None
    member: zipfile.ZipInfo | None = None
    error: str | None = None

    def read(self) -> bytes:
        if self.error:
            raise InputError(self.error)
        if self.archive is None:
            return read_upload(self.path)
        return read_member(self.archive, self.member)


# What a damaged archive member raises while it is decompressed (deflate, bzip2, lzma, CRC checks).
MEMBER_ERRORS = (zlib.error, lzma.LZMAError, EOFError, OSError, zipfile.BadZipFile, NotImplementedError,
                 RuntimeError, ValueError)
MAX_ZIP_ENTRIES = 10_000  # an archive listing more is refused before its directory is parsed
MAX_BATCH_ROWS = 1_000  # inputs past this (all skipped anyway) are counted in one row


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """One zip member's bytes, at most MAX_UPLOAD_BYTES (the header's size is not trusted)."""
    try:
        with zf.open(info) as f:
            data = f.read(MAX_UPLOAD_BYTES + 1)
    except MEMBER_ERRORS as exc:
        raise InputError(f"The compressed data of this member is damaged and cannot be unpacked ({exc}).") from None
    if len(data) > MAX_UPLOAD_BYTES:
        raise InputError(f"The file unpacks to more than {MAX_UPLOAD_BYTES / 2**20:.0f} MB.")
    if not data:
        raise InputError("The file is empty (0 bytes).")
    return data


def zip_entry_count(path: Path) -> int | None:
    """The number of entries an archive's end-of-central-directory record announces, read without
    parsing the directory (a 256 MB zip of empty members lists millions); None when absent. Zip64
    archives (0xFFFF in the classic record) count as "too many" for a batch."""
    import struct

    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 65_557))  # the record (22 bytes) and a comment of at most 64 KiB
        tail = f.read()
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or len(tail) - i < 22:
        return None
    total = struct.unpack("<H", tail[i + 10:i + 12])[0]
    return MAX_ZIP_ENTRIES + 1 if total == 0xFFFF else total


def plan_batch(uploads: list[Path], max_files: int | None = None,
               archives: contextlib.ExitStack | None = None) -> list[BatchItem]:
    """Every input of a batch in order (zip members sorted by name; folders, macOS resource forks and
    hidden files skipped), without reading any image: files past ``max_files`` (default
    MAX_BATCH_FILES), archives listing more than MAX_ZIP_ENTRIES entries or unpacking to more than
    MAX_ZIP_UNCOMPRESSED, and unreadable files get an item with the reason instead. Archives are
    opened once, into ``archives`` (closed by the caller)."""
    items: list[BatchItem] = []
    count = skipped_beyond = 0
    limit = MAX_BATCH_FILES if max_files is None else max_files
    archives = archives if archives is not None else contextlib.ExitStack()

    def add(item: BatchItem) -> None:
        nonlocal count, skipped_beyond
        count += 1
        if count > limit and not item.error:
            item.error = f"Skipped: more than {limit} files in one batch (the batch limit)."
        if len(items) >= MAX_BATCH_ROWS:
            skipped_beyond += 1
            return
        items.append(item)

    for path in uploads:
        try:
            if not zipfile.is_zipfile(path):
                add(BatchItem(path.name, path=path))
                continue
            entries = zip_entry_count(path)
            if entries is not None and entries > MAX_ZIP_ENTRIES:
                add(BatchItem(path.name, error=f"The zip lists {entries:,} entries; at most {MAX_ZIP_ENTRIES:,} are "
                                               "read in one batch."))
                continue
            zf = archives.enter_context(zipfile.ZipFile(path))
            members = sorted((m for m in zf.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX")
                              and not Path(m.filename).name.startswith(".")), key=lambda m: m.filename)
        except FileNotFoundError:
            add(BatchItem(path.name, error="The uploaded file is gone; upload it again."))
            continue
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
            add(BatchItem(path.name, error=f"Cannot open the zip archive: {exc}"))
            continue
        total = sum(m.file_size for m in members)
        if total > MAX_ZIP_UNCOMPRESSED:
            add(BatchItem(path.name, error=f"The zip unpacks to {total / 2**30:.1f} GB; the limit is "
                                           f"{MAX_ZIP_UNCOMPRESSED / 2**30:.0f} GB."))
            continue
        for m in members:
            add(BatchItem(m.filename, path=path, archive=zf, member=m))
    if skipped_beyond:
        items.append(BatchItem(f"... and {skipped_beyond:,} more", error=f"Skipped: {skipped_beyond:,} more inputs past "
                               f"the batch limit of {limit} files (counted in this one row)."))
    return items


BATCH_COLUMNS = ["#", "label", "p_normal", "p_bacterial_pneumonia", "p_viral_pneumonia", "p_pneumonia",
                 "decision", "image_sha256", "reason", "error"]


def rows_to_csv(rows: list[dict], path: str | os.PathLike) -> Path:
    """The batch CSV. File names are *not* written (they can carry patient names); rows are in
    upload order (zip members sorted by name) and carry the image hash."""
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=BATCH_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def analytics(store: FeedbackStore):
    """The History tab's content, from the store: a summary sentence, predictions per day, the
    predicted class mix, model label x clinician label, the latest feedback (pandas frames)."""
    import pandas as pd

    preds = store.predictions_frame()
    fb = store.feedback_frame()
    if preds.empty:
        empty = pd.DataFrame({"day": [], "predictions": []})
        return ("No predictions yet.", empty, pd.DataFrame({"label": [], "count": []}), pd.DataFrame(),
                pd.DataFrame())
    preds["day"] = preds["created_at"].str.slice(0, 10)
    per_day = preds.groupby("day").size().reset_index(name="predictions")
    mix = preds["label"].value_counts().reindex(list(LABELS), fill_value=0).rename_axis("label").reset_index(name="count")
    n_fb = len(fb)
    agree = float(fb["agrees"].mean()) if n_fb else float("nan")
    summary = (f"**{len(preds)}** predictions ({', '.join(f'{k}: {v}' for k, v in preds['channel'].value_counts().items())}), "
               f"**{n_fb}** clinician readings"
               + (f", model and clinician agree on **{agree:.0%}**; corrections: "
                  + ", ".join(f"{LABEL_NAMES.get(k, 'out of scope')} {int(v)}" for k, v in
                              fb[fb['agrees'] == 0]['model_label'].value_counts().items()) if n_fb else "")
               + ".")
    if n_fb:
        corr = pd.crosstab(fb["model_label"], fb["clinician_label"]).reindex(index=list(LABELS), columns=list(LABELS),
                                                                            fill_value=0)
        corr.insert(0, "model \\ clinician", corr.index)
        recent = fb.tail(20).iloc[::-1][["created_at", "model_label", "clinician_label", "role", "p_pneumonia"]]
    else:
        corr, recent = pd.DataFrame(), pd.DataFrame()
    return summary, per_day, mix, corr, recent


def heatmap_overlay(image: Image.Image, heatmap: np.ndarray, alpha: float) -> np.ndarray:
    from modeling.gradcam import overlay

    return overlay(image, heatmap, alpha=float(alpha))
