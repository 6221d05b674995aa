"""Archive-scale prediction: a folder tree of films to a results table (Parquet, CSV or JSON lines).

Teams that adopt a triage model first run it over an archive (tens of thousands of DICOMs and JPEGs in
nested folders) to see what it would have flagged. On such archives decoding is the cost, not the
model: a 3000x3000 12-bit DICOM takes ~0.6 s to decode on one core, the forward pass ~35 ms. So::

    cxr-predict /archive --model space/model --output results.parquet --workers 2 --batch-size 16

* walks the folders (:func:`find_films`: JPEG, PNG, TIFF, DICOM with or without an extension);
* decodes, checks and preprocesses each film in worker processes (a torch ``DataLoader``; each
  worker uses one thread) with the model's own saved image processor, and batches the forward pass;
* writes rows as it goes (:class:`RowWriter`): a Ctrl-C leaves a valid file, ``--resume`` skips the
  files whose rows are already there;
* under ``accelerate launch`` each process takes its share of the files
  (``PartialState.split_between_processes``) and writes its own shard; the first process merges them.

A row never copies a DICOM header: it holds the path relative to the folder given (or nothing, with
``--no-paths``: the file's hash is then the key), the hashes, the probabilities, the call at the stored
threshold, the input gate's and the scope check's outcome, a reason code for a film that was not
predicted, and the model revision. The Space's batch tab reads films and builds its rows with the same
functions (:func:`read_film`, :func:`prediction_row`, :func:`error_row`), so the two cannot disagree.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from .dicom import _has_dicom_magic, identifying_tags
from .image_base import ImageInfo, ImageLoadError
from .image_io import IMAGE_EXTENSIONS, MAX_FILE_BYTES, WORKING_SIDE, load_image_with_info, pixel_sha256
from .labels import LABELS
from .decision import decide, default_uncertain_high
from .predict import Prediction, Predictor
from .quality import symmetry_problems, xray_problems

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}

#: Columns of the archive's table, in order. ``reason`` is a stable code for a film with no answer:
#: one of the loader's (:data:`modeling.image_base.REASONS`), ``io_error``, ``not_a_chest_xray`` (the
#: rules of :mod:`modeling.quality`) or ``gate_refused`` (the learned input gate).
COLUMNS = ["path", "file_sha256", "image_sha256", "width", "height", "label",
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


# ---- finding films ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    path: Path
    key: str  # the path relative to the folder given (a file given directly: as given)


def _is_film(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    if path.suffix:  # a file with another extension (a report, a .txt) is not read
        return False
    try:
        with path.open("rb") as f:
            return _has_dicom_magic(f.read(132))  # DICOM files often have no extension at all
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


# ---- decoding in workers ------------------------------------------------------------------------------

class FilmDataset:
    """Map-style dataset for a ``DataLoader``: each item is one file decoded, checked and turned into
    the model's pixel values, or the reason it could not be (never raises for a bad file). Files whose
    hash is in ``done_hashes`` are skipped after hashing (``--resume`` with ``--no-paths``)."""

    def __init__(self, sources: Sequence[Source], processor, *, max_side: int | None = WORKING_SIDE,
                 done_hashes: frozenset[str] = frozenset()) -> None:
        self.sources, self.processor, self.max_side, self.done_hashes = list(sources), processor, max_side, done_hashes

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from .preprocessing import pixel_values

        src = self.sources[i]
        item: dict[str, Any] = {"index": i, "path": src.key}
        try:
            size = src.path.stat().st_size
            if size > MAX_FILE_BYTES:
                return {**item, **error_row("too_large", f"the file is {size / 2**20:.0f} MB; the limit is "
                                                         f"{MAX_FILE_BYTES / 2**20:.0f} MB")}
            data = src.path.read_bytes()
        except OSError as exc:
            return {**item, **error_row("io_error", f"cannot read the file ({exc.strerror or exc})")}
        item["file_sha256"] = hashlib.sha256(data).hexdigest()
        if item["file_sha256"] in self.done_hashes:
            return {**item, "skip": True}
        try:
            film = read_film(data, max_side=self.max_side)
        except ImageLoadError as exc:
            return {**item, **error_row(exc.reason, exc.detail)}
        item.update(width=film.gray.size[0], height=film.gray.size[1], image_sha256=pixel_sha256(film.gray))
        if film.problems:
            return {**item, **error_row("not_a_chest_xray", "does not look like a frontal chest X-ray: "
                                        + "; ".join(film.problems))}
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


class RowWriter:
    """Writes rows as they come, so an interrupted run keeps what it did. CSV and JSON lines are
    appended and flushed per batch; Parquet (which cannot be appended to) is written to ``<output>.partial``
    and moved into place by :meth:`close` (which a Ctrl-C still reaches), with the earlier rows first
    when resuming. Either way a reader never sees a half-written table."""

    PARQUET_ROWS_PER_GROUP = 1024

    def __init__(self, path: str | os.PathLike, *, resume: bool = False) -> None:
        self.path = Path(path)
        self.format = output_format(self.path)
        self.previous = read_rows(self.path) if resume else []
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
            if resume and self.path.exists():  # drop a torn last line before appending
                text = self.path.read_text(encoding="utf-8")
                if text and not text.endswith("\n"):
                    self.path.write_text(text[:text.rfind("\n") + 1], encoding="utf-8")
            fresh = not (resume and self.path.exists() and self.path.stat().st_size > 0)
            self._f = self.path.open("w" if fresh else "a", newline="", encoding="utf-8")
            if self.format == "csv":
                self._csv = csv.DictWriter(self._f, fieldnames=COLUMNS, extrasaction="ignore")
                if fresh:
                    self._csv.writeheader()

    def done_keys(self, by: str = "path") -> set[str]:
        return {r[by] for r in self.previous if r.get(by)}

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
                try:
                    film = read_film(sources[it["index"]].path.read_bytes(), max_side=cfg.max_side)
                except (ImageLoadError, OSError) as exc:  # changed or gone since the worker read it
                    rows[it["index"]] = error_row(getattr(exc, "reason", "io_error"), f"cannot read the file again: {exc}")
                    continue
                gray, pred, _ = correct_and_repredict(predictor, film.gray, pred)
                sha = pixel_sha256(gray)
                rows[it["index"]] = {"width": gray.size[0], "height": gray.size[1]}  # a 90-degree turn swaps them
            if pred.gate is not None and pred.gate.out_of_distribution:
                rows[it["index"]] = {**rows.get(it["index"], {}), **error_row(
                    "gate_refused", "does not look like a frontal chest X-ray: " + pred.gate.refusal()),
                    "gate": "refused", "image_sha256": sha}
                continue
            rows[it["index"]] = {**rows.get(it["index"], {}), **prediction_row(pred, decision_for(pred)[0], sha)}
    out = []
    for it in items:
        row = {**{k: it.get(k) for k in ("path", "file_sha256", "image_sha256", "width", "height",
                                         "label", "decision", "reason", "error")},
               **rows.get(it["index"], {}), "model_revision": revision}
        if not cfg.paths:
            row["path"] = None
        out.append(row)
    return out


def shard_path(output: str | os.PathLike, rank: int, world: int) -> Path:
    p = Path(output)
    return p.with_name(f"{p.stem}.shard-{rank:05d}-of-{world:05d}{p.suffix}")


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
    threads = cfg.threads or max(1, cores - cfg.workers)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(cfg, predictor, state, world)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: ArchiveConfig, predictor: Predictor | None, state, world: int) -> ArchiveSummary:
    from torch.utils.data import DataLoader

    rank = state.process_index if state else 0
    predictor = predictor or Predictor.from_pretrained(cfg.model, revision=cfg.revision, precision=cfg.precision)
    if cfg.compile:
        info = predictor.compile()
        if not info["compiled"]:
            print(f"cxr-predict: not compiled ({info['reason']}); the eager network predicts", file=sys.stderr)
        elif cfg.batch_size != 1:
            print("cxr-predict: --compile serves single films; with --batch-size above 1 the eager network predicts",
                  file=sys.stderr)
    revision = predictor.revision or "unknown"
    key = "path" if cfg.paths else "file_sha256"

    final = Path(cfg.output)
    output_format(final)
    target = shard_path(final, rank, world) if state else final
    done: set[str] = set()
    if cfg.resume and state:  # what every process of an earlier run wrote, so no file is done twice
        for earlier in [final, *(shard_path(final, r, world) for r in range(world))]:
            done |= {r[key] for r in read_rows(earlier) if r.get(key)}
        state.wait_for_everyone()  # every process has read the shards before any writer touches them
    sources = find_films(cfg.inputs)
    writer = RowWriter(target, resume=cfg.resume)
    summary = ArchiveSummary(output=str(final), found=len(sources), skipped=0, written=0, predicted=0, failed=0)
    try:  # from here on a Ctrl-C still closes the writer: the rows so far stay readable
        done |= writer.done_keys(key)
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
    if state:
        summary = _merge_shards(state, final, world, summary, cfg.resume)
    if summary.interrupted:
        raise KeyboardInterrupt(summary)
    return summary


def _merge_shards(state, final: Path, world: int, summary: ArchiveSummary, resume: bool) -> ArchiveSummary:
    """The first process writes the earlier rows (when resuming) and every shard's into ``final`` and
    removes the shards; the others wait. An interrupted run keeps its shards for ``--resume``."""
    state.wait_for_everyone()
    shards = [shard_path(final, r, world) for r in range(world)]
    if state.is_main_process and not summary.interrupted:
        rows = (read_rows(final) if resume else []) + [row for s in shards for row in read_rows(s)]
        tmp = final.with_name("merging-" + final.name)
        w = RowWriter(tmp)
        w.write(rows)
        w.close()
        os.replace(tmp, final)
        for s in shards:
            s.unlink(missing_ok=True)
    state.wait_for_everyone()
    summary.shards = [str(s) for s in shards]
    return summary


def summarize_rows(rows: Sequence[dict]) -> dict[str, Any]:
    """Counts for the end of a run: decisions and reasons."""
    from collections import Counter

    return {"rows": len(rows), "decisions": dict(Counter(r["decision"] for r in rows if r.get("decision"))),
            "reasons": dict(Counter(r["reason"] for r in rows if r.get("reason"))),
            "mean_p_pneumonia": float(np.mean([r["p_pneumonia"] for r in rows if r.get("p_pneumonia") is not None]))
            if any(r.get("p_pneumonia") is not None for r in rows) else None}
