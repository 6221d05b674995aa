"""Archive-scale prediction: a folder tree of films to a results table (Parquet, CSV or JSON lines).

Teams that adopt a triage model first run it over an archive (tens of thousands of DICOMs and JPEGs in
nested folders) to see what it would have flagged. On such archives decoding is the cost, not the
model (benchmarks/results/archive.json: 56 ms a film to decode on one core, 48 ms for the image
processor and the compiled forward pass, on RLE-compressed 2800x2800 DICOMs, 2000x2400 JPEGs and
1600x1900 PNGs). So::

    cxr-predict /archive --model space/model --output results.parquet --workers 2 --batch-size 16

* walks the folders (:func:`find_films`: JPEG, PNG, TIFF, and DICOM found by its bytes whatever the
  file's name: none, ``.dcm``, ``.IMA``, a UID);
* decodes, checks and preprocesses each film in worker processes (a torch ``DataLoader``; each
  worker uses one thread) with the model's own saved image processor, and batches the forward pass;
* writes rows as it goes (:class:`RowWriter`): a Ctrl-C leaves a valid file, ``--resume`` skips the
  files whose rows are already there (in the output or in any shard of it) and tries ``io_error``
  files again, their new row replacing the old;
* under ``accelerate launch`` each process takes its share of the files
  (``PartialState.split_between_processes``) and writes its own shard; the first process merges them,
  with the shards an earlier run left whatever its process count.

A row never copies a DICOM header: it holds the path relative to the folder given (or nothing, with
``--no-paths``: the file's hash is then the key; a file whose bytes cannot be read has the hash of its
relative path, ``path_sha256``), the hashes, the probabilities, the call at the stored threshold, the
input gate's and the scope check's outcome, a reason code for a film that was not predicted (its
message never names the file), and the model revision. The Space's batch tab reads films and builds
its rows with the same functions (:func:`read_film`, :func:`prediction_row`, :func:`error_row`), so
the two cannot disagree.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from .dicom import _has_dicom_magic, identifying_tags
from .image_base import REASONS, ImageInfo, ImageLoadError
from .image_io import IMAGE_EXTENSIONS, MAX_FILE_BYTES, WORKING_SIDE, load_image_with_info, pixel_sha256
from .labels import LABELS
from .decision import decide, default_uncertain_high
from .predict import Prediction, Predictor
from .quality import symmetry_problems, xray_problems

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}

#: Every ``reason`` a row of the archive can have (the Space's :class:`~space.service.InputError` uses
#: the same codes): the loader's (:data:`modeling.image_base.REASONS`), then ``io_error`` (the file's
#: bytes could not be read: tried again by ``--resume``), ``not_a_chest_xray`` (the rules of
#: :mod:`modeling.quality`), ``burned_in_annotation`` (the DICOM header says text is burned into the
#: pixels) and ``gate_refused`` (the learned input gate).
ROW_REASONS: tuple[str, ...] = (*REASONS, "io_error", "not_a_chest_xray", "burned_in_annotation", "gate_refused")

#: The start of every "not a chest film" message (the rules, the learned gate), in the archive's rows
#: and the Space's refusals alike.
NOT_A_CHEST_FILM = "does not look like a frontal chest X-ray: "
#: Why a film with BurnedInAnnotation YES gets no prediction (the Space refuses such an upload too).
BURNED_IN_MESSAGE = ("the DICOM header says text is burned into the pixels (BurnedInAnnotation YES), which can "
                     "identify the patient and cannot be removed")

#: Columns of the archive's table, in order. ``reason`` is one of :data:`ROW_REASONS` for a film with
#: no answer. ``path_sha256`` (the hash of the relative path) is only set where the file's bytes could
#: not be read, so that such a row still has a key under ``--no-paths``.
COLUMNS = ["path", "file_sha256", "path_sha256", "image_sha256", "width", "height", "label",
           *(f"p_{k}" for k in LABELS), "p_pneumonia", "pneumonia", "decision", "threshold", "gate", "scope",
           "scope_score", "reason", "error", "model_revision"]
_FLOATS = {*(f"p_{k}" for k in LABELS), "p_pneumonia", "threshold", "scope_score"}
_INTS = {"width", "height"}


# ---- reading: shared with the Space -------------------------------------------------------------------

@dataclass
class Film:
    """A decoded film and what the rules found: ``problems`` (not a frontal chest X-ray: refused),
    ``warnings`` (symmetry: noted, never refused), ``notes`` (what the loader converted), and the names
    (never the values) of identifying DICOM tags present."""

    gray: Image.Image
    info: ImageInfo
    problems: list[str]
    warnings: list[str]
    notes: list[str]
    identifying_tags: list[str] = field(default_factory=list)
    burned_in_annotation: bool = False


def read_film(data: bytes, *, max_side: int | None = WORKING_SIDE, name: str | None = None) -> Film:
    """Decode a file's bytes to the model's grayscale input (reduced to ``max_side``, bounding memory
    and time) and run the rule checks. Raises :class:`ImageLoadError` (with its reason code)."""
    gray, info = load_image_with_info(data, max_side=max_side, name=name)
    names, burned = [], False
    if info.is_dicom:  # the project's de-identification policy (modeling.dicom): names, never values
        names, _, flag = identifying_tags(data)
        burned = flag == "YES"
    return Film(gray=gray, info=info, problems=xray_problems(gray, info, data), warnings=symmetry_problems(gray),
                notes=list(info.notes) if info.converted else [], identifying_tags=list(names),
                burned_in_annotation=burned)


def film_refusal(film: Film) -> tuple[str, str] | None:
    """The reason code and message for a film the rules refuse (the archive's row; the Space's refusal
    says the same), else None: not a frontal chest X-ray first, then text burned into the pixels."""
    if film.problems:
        return "not_a_chest_xray", NOT_A_CHEST_FILM + "; ".join(film.problems)
    if film.burned_in_annotation:
        return "burned_in_annotation", BURNED_IN_MESSAGE
    return None


def checked_film(data: bytes, max_side: int | None = WORKING_SIDE) -> tuple[dict[str, Any], Film | None]:
    """A file's bytes read for a row (the archive's files, a dataset's images): its size and pixel hash,
    and the film to predict; or the row's reason when it cannot be read or the rules refuse it (film
    None)."""
    try:
        film = read_film(data, max_side=max_side)
    except ImageLoadError as exc:
        return error_row(exc.reason, exc.detail), None
    row = {"width": film.gray.size[0], "height": film.gray.size[1], "image_sha256": pixel_sha256(film.gray)}
    if refusal := film_refusal(film):
        return {**row, **error_row(*refusal)}, None
    return row, film


def correct_and_repredict(predictor: Predictor, gray: Image.Image, pred: Prediction, **predict_kwargs
                          ) -> tuple[Image.Image, Prediction, list[str]]:
    """A film the input gate found turned or inverted is put right and predicted again (the Space and
    the archive alike; ``predict_kwargs``, e.g. ``heatmap=True``, go to that prediction); the distance
    reported is the corrected film's, the turn and inversion what was found. Returns the film as
    predicted, its prediction and the notes saying what was done."""
    if pred.gate is None or not pred.gate.needs_correction:
        return gray, pred, []
    found = pred.gate
    gray = found.correct(gray)
    again = predictor.predict_one(gray, **predict_kwargs)
    again.gate = dataclasses.replace(again.gate, rotation=found.rotation, rotation_probability=found.rotation_probability,
                                     inverted=found.inverted, inverted_probability=found.inverted_probability)
    return gray, again, found.notes()


def gate_outcome(pred: Prediction) -> str | None:
    """The input gate's outcome in one word: accepted, caution, corrected or refused (None: no gate)."""
    g = pred.gate
    if g is None:
        return None
    if g.out_of_distribution:
        return "refused"
    if g.rotation or g.inverted:
        return "corrected"
    return "caution" if g.caution() else "accepted"


def decision_for(pred: Prediction, uncertain_high: float | None = None) -> tuple[str, str]:
    """The triage decision and its sentence: ``out_of_scope`` for a film the scope check flags, else
    :func:`modeling.predict.decide` at the stored threshold."""
    if pred.out_of_scope:
        return "out_of_scope", pred.scope.message()
    high = default_uncertain_high(pred.threshold) if uncertain_high is None else uncertain_high
    return decide(pred.pneumonia_probability, pred.threshold, high)


def prediction_row(pred: Prediction, decision: str, image_sha256: str) -> dict[str, Any]:
    """A predicted film's row (the Space's batch table and the archive's table)."""
    return {"label": pred.label or "", **{f"p_{k}": round(v, 4) for k, v in pred.probabilities.items()},
            "p_pneumonia": round(pred.pneumonia_probability, 4), "pneumonia": pred.pneumonia, "decision": decision,
            "threshold": round(pred.threshold, 6), "gate": gate_outcome(pred),
            "scope": None if pred.scope is None else ("out_of_scope" if pred.out_of_scope else "in_scope"),
            "scope_score": None if pred.scope is None else round(float(pred.scope.score), 4),
            "image_sha256": image_sha256, "reason": "", "error": ""}


def error_row(reason: str, message: str) -> dict[str, Any]:
    """A row for a film with no answer: its reason code and the readable message."""
    return {"label": "", "decision": "", "reason": reason, "error": message}


def answer_row(pred: Prediction, image_sha256: str) -> dict[str, Any]:
    """The row of a film once predicted (and put right first if the gate said so): refused by the learned
    input gate, or its prediction."""
    if pred.gate is not None and pred.gate.out_of_distribution:
        return {**error_row("gate_refused", NOT_A_CHEST_FILM + pred.gate.refusal()),
                "gate": "refused", "image_sha256": image_sha256}
    return prediction_row(pred, decision_for(pred)[0], image_sha256)


# ---- finding films ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    path: Path
    key: str  # the path relative to the folder given (a file given directly: as given)


def _is_film(path: Path) -> bool:
    """A known image suffix, or bytes that say DICOM whatever the name: DICOM files often have no
    extension, PACS exports are named by their UID (``1.2.840...12345``), Siemens' by ``.IMA``. The
    sniff reads 132 bytes, so a report or a .txt beside the films costs one small read, not a row."""
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with path.open("rb") as f:
            return _has_dicom_magic(f.read(132))
    except OSError:
        return False


def _text(path: str | os.PathLike) -> str:
    """A path as text that any writer can store: a name that is not valid UTF-8 (an old Windows
    share) keeps its bytes as backslash escapes instead of failing the run."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def find_films(inputs: Iterable[str | os.PathLike]) -> list[Source]:
    """Every film under the inputs, in a stable order: folders are walked (hidden files and folders
    skipped, symlinked folders not followed), files given directly are taken as they are (an
    unreadable one then gets a row with its reason). A key is the path relative to its folder; with
    several inputs it starts with the folder as given, so two folders' ``x/1.dcm`` stay apart."""
    inputs = list(inputs)
    out: list[Source] = []
    for given in inputs:
        root = Path(given)
        if not root.is_dir():
            out.append(Source(root, _text(given)))
            continue
        prefix = (_text(given).rstrip("/") + "/") if len(inputs) > 1 else ""
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                p = Path(dirpath) / name
                if not name.startswith(".") and p.is_file() and _is_film(p):
                    found.append(p)
        out += [Source(p, prefix + _text(p.relative_to(root).as_posix())) for p in sorted(found)]
    return out


# ---- reading files --------------------------------------------------------------------------------------

def path_sha256(key: str) -> str:
    """The key of a row whose file's bytes could not be read: the hash of the path relative to the
    folder given, so ``--no-paths`` still matches the row on ``--resume`` without writing the path."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def read_source(path: Path) -> tuple[bytes | None, str]:
    """The file's bytes (None when over MAX_FILE_BYTES: not decoded) and their sha256, in one pass. A
    too-large file is hashed in 1 MiB chunks, memory bounded, so that its row has a key like any other
    (``--resume --no-paths`` matches it). Raises OSError."""
    with path.open("rb") as f:
        small = os.fstat(f.fileno()).st_size <= MAX_FILE_BYTES
        data = f.read(MAX_FILE_BYTES + 1) if small else b""
        if small and len(data) <= MAX_FILE_BYTES:
            return data, hashlib.sha256(data).hexdigest()
        digest = hashlib.sha256(data)  # it grew while being read, or was too large from the start
        del data
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return None, digest.hexdigest()


def too_large_row() -> dict[str, Any]:
    return error_row("too_large", f"the file is larger than the limit of {MAX_FILE_BYTES / 2**20:.0f} MB")


def os_error_text(exc: OSError) -> str:
    """An OSError's cause without the file's name: ``str(exc)`` holds the absolute path (a folder can be
    named after the patient), so a row's message takes only ``strerror`` ("No such file or directory")."""
    return exc.strerror or type(exc).__name__


def io_error_row(exc: OSError, doing: str = "cannot read the file") -> dict[str, Any]:
    return error_row("io_error", f"{doing} ({os_error_text(exc)})")


def _without_paths(text: str | None, src: Source, paths: bool) -> str | None:
    """A message with any spelling of the file's path put out (an error text from a library can hold
    it): never an absolute path, and under ``--no-paths`` not the relative one either."""
    if not text:
        return text
    p = src.path
    names = {str(p), os.path.abspath(p), os.path.realpath(p), _text(p), _text(os.path.abspath(p))}
    if not paths:
        names.add(src.key)
    for name in sorted((n for n in names if len(n) > 1), key=len, reverse=True):
        text = text.replace(name, "<file>")
    return text


# ---- decoding in workers ------------------------------------------------------------------------------

class FilmDataset:
    """Map-style dataset for a ``DataLoader``: each item is one file decoded, checked and turned into
    the model's pixel values, or the reason it could not be (never raises for a bad file). Files whose
    hash (of the bytes, or of the relative path) is in ``done_hashes`` are skipped after hashing
    (``--resume`` with ``--no-paths``)."""

    def __init__(self, sources: Sequence[Source], processor, *, max_side: int | None = WORKING_SIDE,
                 done_hashes: frozenset[str] = frozenset()) -> None:
        self.sources, self.processor, self.max_side, self.done_hashes = list(sources), processor, max_side, done_hashes

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from .preprocessing import pixel_values

        src = self.sources[i]
        item: dict[str, Any] = {"index": i, "path": src.key}
        if self.done_hashes and path_sha256(src.key) in self.done_hashes:
            return {**item, "skip": True}
        try:
            data, item["file_sha256"] = read_source(src.path)
        except OSError as exc:
            return {**item, **io_error_row(exc)}
        if item["file_sha256"] in self.done_hashes:
            return {**item, "skip": True}
        if data is None:
            return {**item, **too_large_row()}
        row, film = checked_film(data, self.max_side)
        item.update(row)
        if film is not None:
            item["pixel_values"] = pixel_values(self.processor, [film.gray])[0]
        return item


def _one_thread(_worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)  # workers decode; the cores' other threads belong to the forward pass


def _collate(items: list[dict]) -> list[dict]:
    return items


# ---- writing rows ---------------------------------------------------------------------------------------

def output_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"the output must end in {', '.join(FORMATS)}; got {Path(path).name!r}")
    return FORMATS[suffix]


def _typed(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for c in COLUMNS:
        v = row.get(c)
        if v == "" and (c in _FLOATS or c in _INTS or c == "pneumonia"):
            v = None
        out[c] = v
    return out


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a results file (any of the formats); a torn last line of a CSV or JSON-lines file
    (a killed run) is ignored."""
    path = Path(path)
    fmt = output_format(path)
    if not path.exists():
        return []
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    if fmt == "jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = list(csv.DictReader(text.splitlines()))
    for r in rows:
        for c in _FLOATS | _INTS:
            if r.get(c) not in (None, ""):
                r[c] = int(r[c]) if c in _INTS else float(r[c])
        if r.get("pneumonia") in ("True", "False"):
            r["pneumonia"] = r["pneumonia"] == "True"
    return [_typed(r) for r in rows]


def _csv_header(path: Path) -> list[str]:
    with path.open(encoding="utf-8", newline="") as f:
        return next(csv.reader(f), [])


class RowWriter:
    """Writes rows as they come, so an interrupted run keeps what it did. CSV and JSON lines are
    appended and flushed per batch; Parquet (which cannot be appended to) is written to ``<output>.partial``
    and moved into place by :meth:`close` (which a Ctrl-C still reaches), with the earlier rows first
    when resuming. Either way a reader never sees a half-written table. When resuming, the earlier rows
    that ``keep`` rejects (files tried again) are left out: a CSV or JSON-lines file is then rewritten
    first (into place by a rename), as is a CSV whose header is an older set of columns."""

    PARQUET_ROWS_PER_GROUP = 1024

    def __init__(self, path: str | os.PathLike, *, resume: bool = False, keep=None) -> None:
        self.path = Path(path)
        self.format = output_format(self.path)
        earlier = read_rows(self.path) if resume else []
        self.previous = [r for r in earlier if keep is None or keep(r)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._pending: list[dict] = []
        self.written = 0
        if self.format == "parquet":
            import pyarrow.parquet as pq

            self._partial = self.path.with_name(self.path.name + ".partial")
            self._pq = pq.ParquetWriter(self._partial, schema())
            if self.previous:
                self._write_table(self.previous)
        else:
            if resume and self.path.exists() and (len(self.previous) < len(earlier) or (
                    self.format == "csv" and earlier and _csv_header(self.path) != COLUMNS)):
                _rewrite(self.path, self.previous)
            elif resume and self.path.exists():  # drop a torn last line before appending
                text = self.path.read_text(encoding="utf-8")
                if text and not text.endswith("\n"):
                    self.path.write_text(text[:text.rfind("\n") + 1], encoding="utf-8")
            fresh = not (resume and self.path.exists() and self.path.stat().st_size > 0)
            self._f = self.path.open("w" if fresh else "a", newline="", encoding="utf-8")
            if self.format == "csv":
                self._csv = csv.DictWriter(self._f, fieldnames=COLUMNS, extrasaction="ignore")
                if fresh:
                    self._csv.writeheader()

    def write(self, rows: list[dict[str, Any]]) -> None:
        rows = [_typed(r) for r in rows]
        self.written += len(rows)
        if self.format == "parquet":
            self._pending += rows
            if len(self._pending) >= self.PARQUET_ROWS_PER_GROUP:
                self._write_table(self._pending)
                self._pending = []
            return
        if self.format == "csv":
            self._csv.writerows(rows)
        else:
            self._f.writelines(json.dumps(r) + "\n" for r in rows)
        self._f.flush()

    def _write_table(self, rows: list[dict]) -> None:
        import pyarrow as pa

        self._pq.write_table(pa.Table.from_pylist(rows, schema=schema()))

    def close(self) -> None:
        if self.format == "parquet":
            if self._pending:
                self._write_table(self._pending)
                self._pending = []
            self._pq.close()
            os.replace(self._partial, self.path)
        else:
            self._f.close()


def _rewrite(path: Path, rows: list[dict]) -> None:
    """``path`` holding just ``rows``, replaced in one rename (a reader sees the old file or the new)."""
    tmp = path.with_name("rewriting-" + path.name)
    w = RowWriter(tmp)
    w.write(rows)
    w.close()
    os.replace(tmp, path)


def schema():
    import pyarrow as pa

    def kind(c):
        if c in _FLOATS:
            return pa.float64()
        if c in _INTS:
            return pa.int32()
        return pa.bool_() if c == "pneumonia" else pa.string()

    return pa.schema([(c, kind(c)) for c in COLUMNS])


# ---- the run ------------------------------------------------------------------------------------------

@dataclass
class ArchiveConfig:
    """One archive run; the CLI's flags are these fields (``cxr-predict DIR... --output FILE``)."""

    inputs: list[str]
    output: str
    model: str = "space/model"
    revision: str | None = None
    workers: int = 2
    batch_size: int = 16
    resume: bool = False
    paths: bool = True  # False (--no-paths): the path column is left empty and the file hash is the key
    progress: bool | None = None  # None: a bar when stderr is a terminal
    precision: str = "auto"
    max_side: int | None = WORKING_SIDE
    threads: int | None = None  # torch threads of the forward pass; None: the cores the workers leave free
    compile: bool = False  # --compile: Predictor.compile() first (tens of seconds); serves --batch-size 1


@dataclass
class ArchiveSummary:
    output: str
    found: int
    skipped: int  # already in the output (--resume)
    written: int
    predicted: int
    failed: int
    interrupted: bool = False
    shards: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _rows_for_batch(predictor: Predictor, items: list[dict], sources: Sequence[Source], cfg: ArchiveConfig,
                    revision: str) -> list[dict]:
    import torch

    rows: dict[int, dict] = {}
    ready = [it for it in items if "pixel_values" in it]
    if ready:
        preds = predictor.predict_pixel_values(torch.stack([it["pixel_values"] for it in ready]),
                                               [(it["width"], it["height"]) for it in ready])
        for it, pred in zip(ready, preds):
            sha = it["image_sha256"]
            if pred.gate is not None and pred.gate.needs_correction:  # rare: decode again, put right, predict
                film, failed = _read_again(sources[it["index"]], it["file_sha256"], cfg)
                if failed:  # changed or gone since the worker read it
                    rows[it["index"]] = failed
                    continue
                gray, pred, _ = correct_and_repredict(predictor, film.gray, pred)
                sha = pixel_sha256(gray)
                rows[it["index"]] = {"width": gray.size[0], "height": gray.size[1]}  # a 90-degree turn swaps them
            rows[it["index"]] = {**rows.get(it["index"], {}), **answer_row(pred, sha)}
    out = []
    for it in items:
        src = sources[it["index"]]
        row = {**{k: it.get(k) for k in ("path", "file_sha256", "image_sha256", "width", "height",
                                         "label", "decision", "reason", "error")},
               **rows.get(it["index"], {}), "model_revision": revision}
        if not row.get("file_sha256") or row.get("reason") == "io_error":  # the key --resume retries it by
            row["path_sha256"] = path_sha256(src.key)
        row["error"] = _without_paths(row.get("error"), src, cfg.paths)
        if not cfg.paths:
            row["path"] = None
        out.append(row)
    return out


def _read_again(src: Source, file_sha256: str, cfg: ArchiveConfig) -> tuple[Film | None, dict | None]:
    """The film decoded again (to put right what the gate found), or the row saying why it could not
    be: gone, unreadable, or no longer the bytes the worker hashed (the row would mix two files)."""
    try:
        data, sha = read_source(src.path)
    except OSError as exc:
        return None, io_error_row(exc, "cannot read the file again")
    if sha != file_sha256:
        return None, error_row("io_error", "the file changed while the run read it")
    if data is None:
        return None, too_large_row()
    try:
        return read_film(data, max_side=cfg.max_side), None
    except ImageLoadError as exc:
        return None, error_row(exc.reason, exc.detail)


def shard_path(output: str | os.PathLike, rank: int, world: int) -> Path:
    p = Path(output)
    return p.with_name(f"{p.stem}.shard-{rank:05d}-of-{world:05d}{p.suffix}")


def shard_files(output: str | os.PathLike) -> list[Path]:
    """Every shard of ``output`` on disk, whatever the process count of the run that wrote it: a run
    on 4 GPUs stopped and resumed on 2 (or in one process) still finds the 4 shards."""
    p = Path(output)
    pattern = re.compile(re.escape(p.stem) + r"\.shard-\d{5}-of-\d{5}" + re.escape(p.suffix) + "$")
    if not p.parent.is_dir():
        return []
    return sorted(f for f in p.parent.iterdir() if pattern.fullmatch(f.name))


def _row_keys(row: dict, paths: bool) -> set[str]:
    """What identifies a row's file: its path, or (``--no-paths``) its bytes' or its path's hash."""
    keys = {row.get("path")} if paths else {row.get("file_sha256"), row.get("path_sha256")}
    return {k for k in keys if k}


def _retry_key(row: dict, paths: bool) -> str | None:
    return row.get("path") if paths else row.get("path_sha256")


@dataclass
class Earlier:
    """What ``--resume`` takes from the earlier rows (the output and every shard of it): the keys of
    the files done, and those of the files tried again because their row says ``io_error`` (a share
    that dropped, a file still being copied), whose old rows :meth:`keep` leaves out."""

    paths: bool
    done: set[str] = field(default_factory=set)
    retry: set[str] = field(default_factory=set)

    @classmethod
    def read(cls, final: Path, sources: Sequence[Source], paths: bool) -> "Earlier":
        rows = [r for f in (final, *shard_files(final)) for r in read_rows(f)]
        now = {s.key if paths else path_sha256(s.key) for s in sources}
        out = cls(paths)
        out.retry = {k for r in rows if r.get("reason") == "io_error" and (k := _retry_key(r, paths)) in now}
        for r in rows:
            if out.keep(r):
                out.done |= _row_keys(r, paths)
        return out

    def keep(self, row: dict) -> bool:
        return not (row.get("reason") == "io_error" and _retry_key(row, self.paths) in self.retry)


def predict_archive(cfg: ArchiveConfig, predictor: Predictor | None = None) -> ArchiveSummary:
    """Run ``cfg`` (see the module docstring). Under ``accelerate launch`` / ``torchrun`` every
    process calls this; each writes its shard, the first merges them into ``cfg.output``."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    state = None
    if world > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
    # Threads: decoding workers and the forward pass share the cores; more runnable threads than cores
    # makes torch's spinning worker threads fight the decoders (measured: benchmarks/archive.py)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = cfg.threads or forward_threads(cores, cfg.workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(cfg, predictor, state, world)
    finally:
        torch.set_num_threads(previous_threads)


def forward_threads(cores: int, workers: int, local_processes: int = 1) -> int:
    """Torch threads for one process's forward pass: its share of the machine's cores (several processes
    of one launch share a machine) less its decoding workers, at least one."""
    return max(1, cores // max(1, local_processes) - workers)


def place_predictor(predictor: Predictor, state) -> Predictor:
    """Under ``accelerate launch`` on GPUs, each process predicts on the device accelerate gives it
    (decoding stays in its CPU workers); on CPUs, and without a launch, the predictor stays put."""
    if state is not None and state.device.type != "cpu":
        predictor.to(state.device)
    return predictor


def _run(cfg: ArchiveConfig, predictor: Predictor | None, state, world: int) -> ArchiveSummary:
    from torch.utils.data import DataLoader

    rank = state.process_index if state else 0
    predictor = place_predictor(predictor or Predictor.from_pretrained(cfg.model, revision=cfg.revision,
                                                                       precision=cfg.precision), state)
    if cfg.compile:
        info = predictor.compile()
        if not info["compiled"]:
            print(f"cxr-predict: not compiled ({info['reason']}); the eager network predicts", file=sys.stderr)
        elif cfg.batch_size != 1:
            print("cxr-predict: --compile serves single films; with --batch-size above 1 the eager network predicts",
                  file=sys.stderr)
    revision = predictor.revision or "unknown"

    final = Path(cfg.output)
    output_format(final)
    target = shard_path(final, rank, world) if state else final
    ours = {shard_path(final, r, world) for r in range(world)} if state else set()
    others = [s for s in shard_files(final) if s not in ours]  # left by a run with another process count
    sources = find_films(cfg.inputs)
    # what every process of an earlier run wrote, whatever their number, so no file is done twice
    earlier = Earlier.read(final, sources, cfg.paths) if cfg.resume else Earlier(cfg.paths)
    if not cfg.resume:  # a fresh run: an older run's shards must not come back on a later --resume
        for s in others if rank == 0 else []:
            s.unlink(missing_ok=True)
        others = []
    if state:
        state.wait_for_everyone()  # every process has read the shards before any writer touches them
    writer = RowWriter(target, resume=cfg.resume, keep=earlier.keep)
    summary = ArchiveSummary(output=str(final), found=len(sources), skipped=0, written=0, predicted=0, failed=0)
    try:  # from here on a Ctrl-C still closes the writer: the rows so far stay readable
        done = earlier.done
        todo = [s for s in sources if s.key not in done] if cfg.paths else sources
        summary.skipped = len(sources) - len(todo)
        if state:
            with state.split_between_processes(todo) as mine:
                todo = list(mine)
        dataset = FilmDataset(todo, predictor.processor, max_side=cfg.max_side,
                              done_hashes=frozenset(done) if not cfg.paths else frozenset())
        loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=_collate,
                            worker_init_fn=_one_thread if cfg.workers else None)
        show = sys.stderr.isatty() if cfg.progress is None else cfg.progress
        from tqdm.auto import tqdm

        with tqdm(total=len(todo), unit="film", disable=not show, desc=f"rank {rank}" if state else "films") as bar:
            for items in loader:
                fresh = [it for it in items if not it.get("skip")]
                summary.skipped += len(items) - len(fresh)
                rows = _rows_for_batch(predictor, fresh, todo, cfg, revision)
                writer.write(rows)
                summary.predicted += sum(1 for r in rows if not r.get("reason"))
                summary.failed += sum(1 for r in rows if r.get("reason"))
                bar.update(len(items))
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        writer.close()
        summary.written = writer.written
    if state or others:
        summary = _merge_shards(state, final, world, summary, cfg.resume, others, earlier.keep)
    if summary.interrupted:
        raise KeyboardInterrupt(summary)
    return summary


def _merge_shards(state, final: Path, world: int, summary: ArchiveSummary, resume: bool, others: list[Path],
                  keep) -> ArchiveSummary:
    """The first process writes into ``final`` the earlier rows (when resuming), this run's shards and
    the shards of an earlier run with another process count (``others``, when resuming), and removes
    the shards; the others wait. In one process ``final`` is this run's own output, and only ``others``
    are merged. ``keep`` leaves out the earlier rows of files tried again; this run's writers already
    left them out of their own files. An interrupted run keeps its shards for ``--resume``."""
    if state:
        state.wait_for_everyone()
    ours = [shard_path(final, r, world) for r in range(world)] if state else []
    main = state.is_main_process if state else True
    if main and not summary.interrupted:
        if state:
            rows = [r for r in read_rows(final) if keep(r)] if resume else []
            rows += [row for s in ours for row in read_rows(s)]
        else:
            rows = read_rows(final)
        rows += [row for s in others for row in read_rows(s) if keep(row)]
        _rewrite(final, rows)
        for s in ours + others:
            s.unlink(missing_ok=True)
    if state:
        state.wait_for_everyone()
    summary.shards = [str(s) for s in ours + others]
    return summary


def summarize_rows(rows: Sequence[dict]) -> dict[str, Any]:
    """Counts for the end of a run: decisions and reasons."""
    from collections import Counter

    return {"rows": len(rows), "decisions": dict(Counter(r["decision"] for r in rows if r.get("decision"))),
            "reasons": dict(Counter(r["reason"] for r in rows if r.get("reason"))),
            "mean_p_pneumonia": float(np.mean([r["p_pneumonia"] for r in rows if r.get("p_pneumonia") is not None]))
            if any(r.get("p_pneumonia") is not None for r in rows) else None}


# ---- the datasets route --------------------------------------------------------------------------------

#: The columns :func:`predict_dataset` adds (with its prefix): the archive's, less the path keys (a
#: dataset's example is its own key).
DATASET_COLUMNS = [c for c in COLUMNS if c not in ("path", "path_sha256")]


def predict_dataset(ds, predictor: Predictor, *, image_column: str = "image", batch_size: int = 16,
                    max_side: int | None = WORKING_SIDE, prefix: str = "pred_", **map_kwargs):
    """For films already in a ``datasets.Dataset`` (a Hub dataset, say): ``Dataset.map`` with the
    predictor, batched. Each example gets the archive's row (:data:`DATASET_COLUMNS`, each named with
    ``prefix`` so that a dataset's own ``label`` stays), made as for a file: the image's stored bytes
    (the column is read undecoded) go through :func:`read_film`, the rules, the learned gate (a turned or
    inverted film put right) and the scope check, and a film with no answer gets its reason code.
    ``map_kwargs`` go to ``Dataset.map`` (``num_proc``, ``cache_file_name``...). Returns the new dataset,
    its images as they were."""
    from datasets import Image as ImageFeature

    feature = ds.features[image_column]
    revision = predictor.revision or "unknown"

    def rows(batch: dict) -> dict:
        out: list[dict[str, Any]] = []
        films: list[tuple[int, Film]] = []
        for item in batch[image_column]:
            if not item or (item.get("bytes") is None and not item.get("path")):  # a missing image
                out.append(error_row("io_error", "no image in this example"))
                continue
            try:
                data = item["bytes"] if item.get("bytes") is not None else Path(item["path"]).read_bytes()
            except OSError as exc:
                out.append(io_error_row(exc))
                continue
            row, film = checked_film(data, max_side)
            if film is not None:
                films.append((len(out), film))
            out.append({"file_sha256": hashlib.sha256(data).hexdigest(), **row})
        preds = predictor.predict([f.gray for _, f in films], batch_size=max(1, len(films))) if films else []
        for (i, film), pred in zip(films, preds):
            gray = film.gray
            if pred.gate is not None and pred.gate.needs_correction:
                gray, pred, _ = correct_and_repredict(predictor, gray, pred)
                out[i].update(width=gray.size[0], height=gray.size[1])  # a 90-degree turn swaps them
            out[i].update(answer_row(pred, pixel_sha256(gray)))
        typed = [_typed({**r, "model_revision": revision}) for r in out]
        return {prefix + c: [r[c] for r in typed] for c in DATASET_COLUMNS}

    from datasets import Features

    added = Features.from_arrow_schema(schema())
    features = Features({**ds.features, image_column: ImageFeature(decode=False),
                         **{prefix + c: added[c] for c in DATASET_COLUMNS}})
    mapped = ds.cast_column(image_column, ImageFeature(decode=False)).map(
        rows, batched=True, batch_size=batch_size, features=features, **map_kwargs)
    return mapped.cast_column(image_column, feature)
