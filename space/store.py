"""The Space's store: every prediction, every clinician's feedback, the de-identified images.

One SQLite database in WAL mode (readers never block the writer; the analytics tab reads while
predictions are written) plus a folder of PNGs. A new connection per operation with a busy timeout
makes it safe from Gradio's worker threads and from several processes.

What is stored, and what never is:

* predictions: time (UTC), model id and revision, image hash (:func:`modeling.image_io.pixel_sha256`),
  size, calibrated probabilities, label, decision, threshold, latency, channel (ui / api / batch).
  Not the image, not the file name.
* feedback: the clinician's label, agreement with the model, role (a category, not a name), an
  optional note, and the image as a PNG re-encoded from the decoded 8-bit pixels (no DICOM header,
  EXIF or text chunks), named by its hash.
* staging: the same de-identified PNG of every *predicted* image, in ``staging/``, so that feedback
  sent later (over the API, after a restart) still has its pixels. Bounded in age
  (``staging_max_age_s``, default 7 days) and size (``staging_max_bytes``, default 2 GB, oldest
  removed first); a staged image becomes permanent only when feedback is given for it.

:meth:`FeedbackStore.export_manifest` writes the ``manifest`` format (:mod:`modeling.manifest`) that
``dataset_scripts.build --source manifest:DIR`` and ``dataset_scripts.contribute`` read.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from modeling.image_io import save_pixels_png
from modeling.labels import LABELS
from modeling.manifest import write_manifest

ROLES = ("radiologist", "pediatrician", "emergency physician", "resident", "other clinician", "not specified")
DECISIONS = ("no_pneumonia", "uncertain", "pneumonia", "out_of_scope")  # out_of_scope: label ""
CHANNELS = ("ui", "api", "batch")
MAX_NOTE_CHARS = 1000

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    model_id TEXT NOT NULL,
    model_revision TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    p_normal REAL NOT NULL,
    p_bacterial_pneumonia REAL NOT NULL,
    p_viral_pneumonia REAL NOT NULL,
    p_pneumonia REAL NOT NULL,
    label TEXT NOT NULL,
    decision TEXT NOT NULL,
    threshold REAL NOT NULL,
    latency_ms REAL,
    channel TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS predictions_time ON predictions(created_at);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    prediction_id TEXT NOT NULL REFERENCES predictions(id),
    created_at TEXT NOT NULL,
    label TEXT NOT NULL,
    agrees INTEGER NOT NULL,
    role TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    image_path TEXT
);
CREATE INDEX IF NOT EXISTS feedback_prediction ON feedback(prediction_id);
"""


class StoreError(ValueError):
    """Feedback that cannot be stored as given (unknown prediction, label or role)."""


@dataclass
class PredictionRecord:
    model_id: str
    model_revision: str
    image_sha256: str
    width: int
    height: int
    probabilities: dict[str, float]
    pneumonia_probability: float
    label: str
    decision: str
    threshold: float
    latency_ms: float | None = None
    channel: str = "ui"


def utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


STAGING_MAX_AGE_S = 7 * 24 * 3600.0
STAGING_MAX_BYTES = 2 * 1024**3


class FeedbackStore:
    """``root/feedback.sqlite3`` + ``root/images/<sha256>.png`` (feedback) + ``root/staging/<sha256>.png``
    (recently predicted, bounded)."""

    def __init__(self, root: str | os.PathLike, *, staging_max_age_s: float = STAGING_MAX_AGE_S,
                 staging_max_bytes: int = STAGING_MAX_BYTES) -> None:
        self.root = Path(root)
        self.images = self.root / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.staging = self.root / "staging"
        self.staging.mkdir(parents=True, exist_ok=True)
        self.staging_max_age_s = float(staging_max_age_s)
        self.staging_max_bytes = int(staging_max_bytes)
        self.db_path = self.root / "feedback.sqlite3"
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            con.execute("PRAGMA busy_timeout=30000")
            con.execute("PRAGMA foreign_keys=ON")
            con.row_factory = sqlite3.Row
            yield con
        finally:
            con.close()

    # --- writes ------------------------------------------------------------------------------
    def record_prediction(self, rec: PredictionRecord) -> str:
        """Store one prediction; returns its id (a random UUID: it reveals nothing about the image)."""
        if rec.decision not in DECISIONS:
            raise StoreError(f"unknown decision {rec.decision!r}")
        if rec.channel not in CHANNELS:
            raise StoreError(f"unknown channel {rec.channel!r}")
        pid = uuid.uuid4().hex
        p = rec.probabilities
        with self._connect() as con:
            con.execute(
                "INSERT INTO predictions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (pid, utcnow(), rec.model_id, rec.model_revision, rec.image_sha256, rec.width, rec.height,
                 p["normal"], p["bacterial_pneumonia"], p["viral_pneumonia"], rec.pneumonia_probability,
                 rec.label, rec.decision, rec.threshold, rec.latency_ms, rec.channel))
        return pid

    def save_image(self, image: Image.Image, sha256: str) -> str:
        """Write the de-identified PNG (pixels only) once per hash; returns its path relative to root."""
        rel = f"images/{sha256}.png"
        out = self.root / rel
        if not out.exists():
            save_pixels_png(image, out)
        return rel

    # --- staging: the pixels of recent predictions, for feedback that comes later ----------------
    def stage_image(self, image: Image.Image, sha256: str) -> None:
        """Keep the de-identified pixels of a predicted image (refreshing its age if already kept)."""
        out = self.staging / f"{sha256}.png"
        try:
            os.utime(out)  # already kept: its age starts again
        except FileNotFoundError:  # (also when a concurrent purge removed it a moment ago)
            save_pixels_png(image, out)

    def staged_image(self, sha256: str) -> Image.Image | None:
        path = self.staging / f"{sha256}.png"
        try:
            with Image.open(path) as im:
                return im.convert("L")
        except (FileNotFoundError, OSError):
            return None

    def purge_staging(self, now: float | None = None) -> int:
        """Remove staged images older than ``staging_max_age_s``, then the oldest until the folder is
        within ``staging_max_bytes``. Returns how many were removed."""
        import time

        now = time.time() if now is None else now
        files = []
        for p in self.staging.glob("*.png"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        files.sort()
        removed = 0
        total = sum(size for _, size, _ in files)
        for mtime, size, p in files:
            if now - mtime > self.staging_max_age_s or total > self.staging_max_bytes:
                p.unlink(missing_ok=True)
                total -= size
                removed += 1
        return removed

    def add_feedback(self, prediction_id: str, label: str, *, role: str = "not specified", note: str = "",
                     image: Image.Image | None = None) -> int:
        """Store a clinician's label for a stored prediction; with ``image`` (the loaded pixels of
        that prediction) also the de-identified PNG. Validates everything before writing anything."""
        if label not in LABELS:
            raise StoreError(f"unknown label {label!r}; choose one of {', '.join(LABELS)}")
        role = role or "not specified"
        if role not in ROLES:
            raise StoreError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
        note = (note or "").strip()
        if len(note) > MAX_NOTE_CHARS:
            raise StoreError(f"note is longer than {MAX_NOTE_CHARS} characters")
        pred = self.get_prediction(prediction_id)
        if pred is None:
            raise StoreError("unknown prediction id: predict first, then send feedback for that prediction")
        if image is None:
            image = self.staged_image(pred["image_sha256"])
            if image is None and not (self.images / f"{pred['image_sha256']}.png").exists():
                days = self.staging_max_age_s / 86400
                raise StoreError(f"the image of this prediction is no longer available (predicted images are kept "
                                 f"{days:g} days for feedback): analyse the film again, then send feedback for the "
                                 "new prediction")
        if image is not None:
            from modeling.image_io import pixel_sha256

            if pixel_sha256(image) != pred["image_sha256"]:
                raise StoreError("the image does not match the prediction it is feedback for")
        image_path = self.save_image(image, pred["image_sha256"]) if image is not None else \
            f"images/{pred['image_sha256']}.png"
        with self._connect() as con:
            cur = con.execute(
                "INSERT INTO feedback (prediction_id, created_at, label, agrees, role, note, image_path) "
                "VALUES (?,?,?,?,?,?,?)",
                (prediction_id, utcnow(), label, int(label == pred["label"]), role, note, image_path))
            return int(cur.lastrowid)

    # --- reads -------------------------------------------------------------------------------
    def get_prediction(self, prediction_id: str) -> dict | None:
        with self._connect() as con:
            row = con.execute("SELECT * FROM predictions WHERE id = ?", (str(prediction_id),)).fetchone()
        return dict(row) if row else None

    def count(self, table: str) -> int:
        if table not in ("predictions", "feedback"):
            raise ValueError(table)
        with self._connect() as con:
            return int(con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def predictions_frame(self):
        import pandas as pd

        with self._connect() as con:
            return pd.read_sql_query("SELECT * FROM predictions ORDER BY created_at", con)

    def feedback_frame(self):
        """Feedback joined with the prediction it is about."""
        import pandas as pd

        with self._connect() as con:
            return pd.read_sql_query(
                "SELECT f.id, f.created_at, f.label AS clinician_label, f.agrees, f.role, f.note, f.image_path, "
                "p.label AS model_label, p.p_pneumonia, p.decision, p.image_sha256, p.model_id, p.model_revision "
                "FROM feedback f JOIN predictions p ON p.id = f.prediction_id ORDER BY f.created_at", con)

    # --- export ------------------------------------------------------------------------------
    def export_manifest(self, out_dir: str | os.PathLike, *, license: str = "CC-BY-4.0",
                        contributor: str = "cxr-pneumonia Space clinician feedback",
                        include_notes: bool = False) -> dict:
        """Write ``out_dir/manifest.csv`` + ``out_dir/images/`` for ``dataset_scripts``.

        One row per image: the newest feedback on it wins (whether or not that row was sent with the
        pixels: they are stored once per image). The summary accounts for every feedback row: exported,
        superseded by a newer reading of the same image, or left out with the reason (``left_out``).
        Free-text notes are left out unless ``include_notes``: a note is the one field a person could
        type an identifier into."""
        import shutil

        out = Path(out_dir)
        (out / "images").mkdir(parents=True, exist_ok=True)
        fb = self.feedback_frame().sort_values(["created_at", "id"], kind="stable")
        rows, conflicts, superseded = [], 0, 0
        left_out: dict[str, int] = {}
        for sha, group in fb.groupby("image_sha256", sort=True):
            latest = group.iloc[-1]
            src = self.images / f"{sha}.png"
            if not src.exists():
                left_out["image file missing"] = left_out.get("image file missing", 0) + len(group)
                continue
            conflicts += int(group["clinician_label"].nunique() > 1)
            superseded += len(group) - 1
            rel = f"images/{sha}.png"
            if not (out / rel).exists():
                shutil.copy2(src, out / rel)
            rows.append({
                "path": rel, "label": latest["clinician_label"], "patient_id": "",
                "license": license, "contributor": f"{contributor} ({latest['role']})",
                "note": latest["note"] if include_notes else "", "source": "space-feedback",
            })
        write_manifest(out, rows)
        return {"images": len(rows), "feedback_rows": int(len(fb)), "superseded_rows": superseded,
                "left_out": left_out, "images_with_conflicting_labels": conflicts, "manifest": "manifest.csv"}
