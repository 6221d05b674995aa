"""Every temporary file of the Space, owned in one place: uploads, scratch folders, archives.

Why this module: Gradio writes an upload to its temp folder (``GRADIO_TEMP_DIR``) in a separate
request, *before* the event runs, under a path made of a hash of the content and the original file
name (which can be a patient's name); a DICOM keeps its header. Nothing in Gradio deletes a file per
request, and calls that Gradio refuses before our handler runs (a value outside a dropdown's choices),
uploads that are never analysed and files past a batch limit never reach a handler at all. So:

* the Space points ``GRADIO_TEMP_DIR`` at a private folder it owns (:func:`private_temp_dir`, mode
  0700), set before Gradio is imported;
* Gradio's upload paths are content-addressed: two people uploading the same file (same bytes, same
  name) get one path, and each has an event queued for it. So every upload Gradio answers is counted
  (:class:`ClaimUploads`, a small ASGI middleware on the upload route: Gradio has no per-upload hook)
  and a handler *releases* its path (:meth:`TempFiles.release`): the file is deleted when the last
  event that was given it is done, not by the first one (a batch streams its archive from disk, so
  keeping the bytes in memory instead would make its memory grow with the archive). An event that
  never runs (its client left, Gradio refused it) never releases: the sweeper removes that file;
* handlers take single images through :meth:`TempFiles.consume`, which reads and releases the file
  at once; the bytes of a consumed path are also remembered for a short while (memory only) for a
  path used again without a new upload (the same file analysed twice from one page);
* outputs that Gradio would serve from its cache to anyone with the URL are not files at all where
  possible (the heatmap is inline PNG data); the batch CSV and the export archive are written into
  :meth:`TempFiles.scratch` folders inside the private temp folder and expire with everything else;
  answers name them by a URL of the Space's own route (:data:`OUTPUT_ROUTE`, served by the
  middleware below), not by their server path, which Gradio's file route would put in the answer;
* a sweeper thread (:meth:`TempFiles.start_sweeper`) deletes everything in the folder older than
  ``max_age_s`` (default 10 minutes), and empty folders: the backstop for every path no handler saw.
  Bundled examples (recognised by a predicate) are kept: Gradio reuses its copy of them.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable

DEFAULT_MAX_AGE_S = 600.0
RECENT_TTL_S = 120.0
RECENT_MAX_BYTES = 256 * 1024 * 1024


def private_temp_dir(base: str | os.PathLike | None = None) -> Path:
    """A ``cxr-space-<uid>`` folder of its own inside ``CXR_TMP_DIR``, ``base`` (an operator's
    ``GRADIO_TEMP_DIR``) or the system temp folder, created with mode 0700. Never the folder given
    itself (unless it already has that name): the sweeper deletes everything old in this folder, which
    must not hit files that are not the Space's (``CXR_TMP_DIR=/tmp`` would otherwise sweep /tmp)."""
    base = Path(os.environ.get("CXR_TMP_DIR") or base or tempfile.gettempdir())
    name = f"cxr-space-{os.getuid()}"
    root = base if base.name == name else base / name
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, stat.S_IRWXU)
    return root.absolute()  # Gradio hands handlers absolute paths; uploads are counted by them


class UploadGone(FileNotFoundError):
    """An upload path that no longer exists and was not consumed recently."""


class NotAnUpload(ValueError):
    """A path given to an event that is not a file this app's upload route wrote: a folder (the temp
    root itself, which an upload's answer reveals), a link, a scratch output, a path outside the
    upload area. ``str()`` is the message shown."""


SCRATCH = "cxr-scratch"
RELEASED_PREFIX = ".released-"
ONCE_PREFIX = "once-"
# The Space's own route for output files (the batch CSV, the export archive): answers name a file by
# this URL alone, not by its path on the server, which Gradio's file route would put in the answer.
OUTPUT_ROUTE = "/cxr-output/"
_OUTPUT_FOLDER = re.compile(rf"^(?:{ONCE_PREFIX})?[a-z]+-[0-9a-f]{{32}}$")
_OUTPUT_IN_PATH = re.compile(r"(?:^|/)cxr-output/([^/]+)/([^/]+)$")


class TempFiles:
    """The Space's temp folder: consuming uploads, scratch folders, the age-based sweeper."""

    def __init__(self, root: str | os.PathLike, *, max_age_s: float = DEFAULT_MAX_AGE_S,
                 keep: Callable[[Path], bool] | None = None, recent_ttl_s: float = RECENT_TTL_S,
                 recent_max_bytes: int = RECENT_MAX_BYTES, pending_max_bytes: int | None = None) -> None:
        self.root = Path(root).absolute()
        # all uploads held at once (waiting for their event, or never used), past which new uploads are
        # refused: each upload may be held for max_age_s, and many would otherwise fill the disk
        self.pending_max_bytes = pending_max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_age_s = float(max_age_s)
        self.keep = keep or (lambda p: False)
        self._recent: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._recent_ttl = recent_ttl_s
        self._recent_max = recent_max_bytes
        self._claims: dict[str, tuple[int, int]] = {}  # path -> (events given it, inode of the last upload)
        self._lock = threading.Lock()
        self._budget_lock = threading.Lock()
        self._streaming = 0  # declared bytes of uploads admitted and not yet answered
        self._stop = threading.Event()

    # --- uploads -----------------------------------------------------------------------------------
    def upload_problem(self, path: str | os.PathLike) -> str | None:
        """Why ``path`` cannot be an upload of this app, or None when it can. Gradio accepts any path
        inside its upload folder, the folder itself included, so an event must check what it was given:
        an upload is a regular file (not a link, not a folder) at ``<root>/<hash>/<name>``, where Gradio's
        upload route writes, and not a scratch output; a bundled example (``keep``) is one too. A path
        that is gone is not a problem here (:meth:`consume` reports it)."""
        p = Path(os.path.abspath(path))
        if self.keep(p):
            return None
        try:
            rel = p.relative_to(self.root)
        except ValueError:
            return "it is outside the upload folder"
        if len(rel.parts) != 2 or rel.parts[0] == SCRATCH or rel.name.startswith(RELEASED_PREFIX):
            return "it is not an uploaded file"
        try:
            if os.path.islink(p.parent):  # <root>/<hash> itself must be a folder, not a link to one
                return "it is a folder or a link, not an uploaded file"
            st = os.lstat(p)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return "it is a folder or a link, not an uploaded file"
        return None

    def claim(self, paths: Iterable[str | os.PathLike]) -> None:
        """Count one upload of each path (in this folder; others are ignored): Gradio answered an upload
        with it, and an event will be given it. Called by :class:`ClaimUploads` before the client
        sees the answer."""
        with self._lock:
            for path in paths:
                key = os.path.abspath(path)
                if not Path(key).is_relative_to(self.root):
                    continue
                try:
                    ino = os.stat(key).st_ino
                except OSError:
                    continue
                n, _ = self._claims.get(key, (0, 0))
                self._claims[key] = (n + 1, ino)

    def claims(self, path: str | os.PathLike) -> int:
        """How many events given this upload have not released it yet."""
        with self._lock:
            return self._claims.get(os.path.abspath(path), (0, 0))[0]

    def release(self, path: str | os.PathLike) -> None:
        """An event is done with this upload: delete it unless other events were given the same path.
        A file re-uploaded after the last claim (a new inode not yet counted: its event is on the way)
        is left to that event, or to the sweeper."""
        p = Path(path)
        if self.keep(p) or self.upload_problem(p):  # only uploaded files are ever deleted, nothing else
            return
        key = os.path.abspath(p)
        with self._lock:
            n, ino = self._claims.pop(key, (0, 0))
            if n > 1:
                self._claims[key] = (n - 1, ino)
                return
            # Gradio renames a new upload into place without our lock: take the file away under a private
            # name first, so the inode checked is the one deleted (same bytes and name if it goes back).
            taken = p.with_name(f"{RELEASED_PREFIX}{uuid.uuid4().hex}")
            try:
                os.rename(p, taken)
            except OSError:  # gone already, or not a file
                return
            if n == 1 and os.stat(taken).st_ino != ino:
                os.replace(taken, p)
            else:
                taken.unlink(missing_ok=True)

    def consume(self, path: str | os.PathLike, *, max_bytes: int | None = None) -> bytes:
        """The upload's bytes; the file is released (:meth:`release`: deleted unless other events were
        given the same path, or ``keep`` says it is a bundled example). Raises :class:`UploadGone` for
        a path that is gone and was not consumed in the last minutes, ``ValueError`` for a file over
        ``max_bytes`` (released too), :class:`NotAnUpload` for a path that is not an upload (left as
        it is)."""
        p = Path(path)
        key = os.path.abspath(p)
        if self.keep(p):
            return p.read_bytes()
        if problem := self.upload_problem(p):
            raise NotAnUpload(f"This path was not accepted: {problem}. Upload the file itself.")
        try:
            size = p.stat().st_size
            if max_bytes is not None and size > max_bytes:
                self.release(p)
                raise ValueError(f"The file is {size / 2**20:.0f} MB; the limit is {max_bytes / 2**20:.0f} MB.")
            data = p.read_bytes()
        except FileNotFoundError:
            with self._lock:
                self._expire_recent()
                hit = self._recent.get(key)
            if hit is None:
                raise UploadGone(key) from None
            return hit[1]
        self.release(p)
        with self._lock:
            self._recent[key] = (time.monotonic(), data)
            self._recent.move_to_end(key)
            self._expire_recent()
        return data

    def _expire_recent(self) -> None:
        now = time.monotonic()
        total = sum(len(v[1]) for v in self._recent.values())
        while self._recent:
            key, (t, data) = next(iter(self._recent.items()))
            if now - t <= self._recent_ttl and total <= self._recent_max:
                break
            self._recent.popitem(last=False)
            total -= len(data)

    def pending_bytes(self) -> int:
        """Bytes of the uploads held now (files at ``<root>/<hash>/<name>``, bundled examples excluded)."""
        total = 0
        for d in self.root.iterdir() if self.root.exists() else ():
            if d.name == SCRATCH or not d.is_dir() or d.is_symlink():
                continue
            for f in d.iterdir():
                try:
                    st = f.lstat()
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode) and not self.keep(f):
                    total += st.st_size
        return total

    def reserve(self, incoming_bytes: int, pending_bytes: int) -> bool:
        """Admit an upload of this declared size when it fits the budget with the uploads in place
        (``pending_bytes``: :meth:`pending_bytes`, walked before) and those admitted and still arriving,
        and hold it until :meth:`unreserve` (its request is done): uploads arriving together cannot each
        pass against the same total. Only arithmetic runs under the lock."""
        with self._budget_lock:
            if (self.pending_max_bytes is not None
                    and pending_bytes + self._streaming + incoming_bytes > self.pending_max_bytes):
                return False
            self._streaming += incoming_bytes
            return True

    def unreserve(self, incoming_bytes: int) -> None:
        with self._budget_lock:
            self._streaming -= incoming_bytes

    # --- outputs -----------------------------------------------------------------------------------
    def scratch(self, prefix: str, *, serve_once: bool = False) -> Path:
        """A new private folder under the temp root for one request's outputs (swept by age). With
        ``serve_once`` each file in it is deleted once it has been downloaded (:class:`ClaimUploads`)."""
        d = self.root / SCRATCH / f"{ONCE_PREFIX if serve_once else ''}{prefix}-{uuid.uuid4().hex}"
        d.mkdir(parents=True)
        return d

    def output_route(self, path: str | os.PathLike) -> str:
        """The URL path (:data:`OUTPUT_ROUTE`) of a file in a scratch folder: ``/cxr-output/<folder>/<name>``."""
        from urllib.parse import quote

        rel = Path(os.path.abspath(path)).relative_to(self.root / SCRATCH)
        if len(rel.parts) != 2 or not _OUTPUT_FOLDER.match(rel.parts[0]):
            raise ValueError(f"not an output file of a scratch folder: {path}")
        return OUTPUT_ROUTE + quote(rel.parts[0]) + "/" + quote(rel.parts[1])

    def output_file(self, folder: str, name: str) -> Path | None:
        """The regular file an output URL names, or None: only a file directly inside a scratch folder
        (no link, no other folder, nothing outside), whatever the URL tries."""
        if not _OUTPUT_FOLDER.match(folder) or name in ("", ".", "..") or "/" in name or "\\" in name:
            return None
        p = self.root / SCRATCH / folder / name
        try:
            st = p.lstat()
        except OSError:
            return None
        return p if stat.S_ISREG(st.st_mode) else None

    def serve_once_path(self, path: str) -> str | None:
        """The absolute path when ``path`` is a file in a serve-once scratch folder, else None."""
        p = Path(os.path.abspath(path))
        try:
            rel = p.relative_to(self.root / SCRATCH)
        except ValueError:
            return None
        return str(p) if len(rel.parts) == 2 and rel.parts[0].startswith(ONCE_PREFIX) and p.is_file() else None

    # --- the sweeper ------------------------------------------------------------------------------
    def sweep(self, now: float | None = None) -> int:
        """Delete files older than ``max_age_s`` (by modification or status change, whichever is newer),
        then empty folders. Returns the number of files deleted."""
        now = time.time() if now is None else now
        removed = 0
        for dirpath, dirnames, filenames in os.walk(self.root, topdown=False):
            d = Path(dirpath)
            for name in filenames:
                p = d / name
                try:
                    st = p.lstat()
                except FileNotFoundError:
                    continue
                if now - max(st.st_mtime, st.st_ctime) > self.max_age_s and not self.keep(p):
                    try:
                        p.unlink()
                        removed += 1
                    except FileNotFoundError:
                        pass
            if d != self.root:
                try:
                    if now - d.lstat().st_mtime > min(self.max_age_s, 60.0):
                        d.rmdir()  # only succeeds when empty
                except OSError:
                    pass
        with self._lock:
            self._expire_recent()
            for key in [k for k in self._claims if not os.path.lexists(k)]:  # deleted above or by an event
                del self._claims[key]
        return removed

    def start_sweeper(self, every_s: float | None = None) -> threading.Thread:
        """Sweep in a daemon thread every ``every_s`` seconds (default: a tenth of the age, 1-60 s)."""
        every = every_s if every_s is not None else min(60.0, max(1.0, self.max_age_s / 10))

        def loop() -> None:
            while not self._stop.wait(every):
                try:
                    self.sweep()
                except Exception:  # noqa: BLE001 - the sweeper must outlive one bad file
                    pass

        t = threading.Thread(target=loop, name="cxr-temp-sweeper", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()

    def clear(self) -> None:
        """Remove everything but kept files, whatever their age (at shutdown)."""
        self.sweep(now=math.inf)


class ClaimUploads:
    """ASGI middleware: tells :meth:`TempFiles.claim` each path Gradio's upload route answers with,
    before the client receives it. Written by hand because Gradio counts nothing per upload (it keeps
    a set of uploaded paths): reading the route's small JSON answer is the one place where every
    upload, of every client, is seen once. Two limits: the app launches without Gradio's static
    workers (``num_workers=0``), whose uploads would never pass here; and an upload Gradio could only
    move into place after answering (another file system) is not counted, so its first event deletes
    it, as before counting."""

    MAX_BODY = 1 << 20  # an upload answer is a short JSON list of paths

    def __init__(self, app, files: TempFiles) -> None:
        self.app, self.files = app, files

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("method") in ("GET", "HEAD"):
            # an output URL, as a browser follows it, or as gradio_client asks for it (file=<the URL>)
            path = scope["path"]  # already percent-decoded by the server
            root = scope.get("root_path") or ""
            own = path[len(root):] if root and path.startswith(root) else path
            target = path.split("/file=", 1)[1] if "/file=" in path else own
            if (own.startswith(OUTPUT_ROUTE) or "/file=" in path) and (m := _OUTPUT_IN_PATH.search(target)):
                await self._serve_output(m.group(1), m.group(2), scope, receive, send)
                return
            if "/file=" in path:
                await self._serve(scope, receive, send)
                return
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope["path"].endswith("/upload"):
            await self.app(scope, receive, send)
            return
        try:  # a chunked upload has no length: the budget then counts what is already held
            length = max(0, int(dict(scope.get("headers") or []).get(b"content-length", b"0") or 0))
        except ValueError:
            length = 0
        from starlette.concurrency import run_in_threadpool

        budget = self.files.pending_max_bytes
        if budget is not None and length > budget:
            await _json_error(send, 413, f"The upload is larger than the {budget / 2**20:.0f} MB the server holds "
                                         "for uploads at once.")
            return
        pending = await run_in_threadpool(self.files.pending_bytes)  # a folder walk: off the event loop
        # checked and held in one step on the event loop (no await in between): uploads arriving together
        # see each other's reservations, and a request cancelled during the walk holds nothing
        if not self.files.reserve(length, pending):
            await _json_error(send, 503, "The server holds too many uploads waiting to be analysed right now; "
                                         "try again in a few minutes.")
            return
        try:
            await self._upload(scope, receive, send)
        finally:
            self.files.unreserve(length)

    async def _upload(self, scope, receive, send) -> None:
        """Gradio's upload route, each path it answers with counted (:meth:`TempFiles.claim`)."""
        status, body = 0, bytearray()

        async def send_counting(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status == 200 and len(body) <= self.MAX_BODY:
                body.extend(message.get("body", b""))
                if not message.get("more_body"):
                    self.files.claim(_answered_paths(bytes(body)))
            await send(message)

        await self.app(scope, receive, send_counting)


    async def _serve(self, scope, receive, send) -> None:
        """A file of a serve-once scratch folder (the export archive) is deleted as soon as it has been
        sent whole: its URL works once, not for everyone who learns it until the sweep."""
        path = scope["path"].split("/file=", 1)[1]
        once = self.files.serve_once_path(path)
        if not once or scope.get("method") != "GET":
            await self.app(scope, receive, send)
            return
        # the whole file, once: a Range request would get a part (206) and leave the file behind
        scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers") or [] if k.lower() != b"range"]}
        status = 0

        async def send_then_delete(message) -> None:
            nonlocal status
            await send(message)
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body") and status == 200:
                Path(once).unlink(missing_ok=True)

        await self.app(scope, receive, send_then_delete)


    async def _serve_output(self, folder: str, name: str, scope, receive, send) -> None:
        """An output file by its URL; one of a serve-once folder (the export archive) is taken (renamed
        atomically, so a second request finds nothing) before it is sent, and deleted after."""
        from starlette.responses import FileResponse

        p = self.files.output_file(folder, name)
        once = p is not None and p.parent.name.startswith(ONCE_PREFIX) and scope.get("method") == "GET"
        if once:
            taken = p.with_name(f".sending-{uuid.uuid4().hex}")
            try:
                os.rename(p, taken)  # one request wins; the others get 404
            except OSError:
                p = None
            else:
                p = taken
                # the whole file, once: a Range request would get a part (206) and lose the rest
                scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers") or [] if k.lower() != b"range"]}
        if p is None:
            await _json_error(send, 404, "No such output (outputs expire; an export can be downloaded once).")
            return
        try:
            await FileResponse(p, filename=name, headers={"Cache-Control": "no-store"})(scope, receive, send)
        finally:
            if once:
                p.unlink(missing_ok=True)


async def _json_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message, "detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _answered_paths(body: bytes) -> list[str]:
    try:
        paths = json.loads(body)
    except ValueError:
        return []
    return [p for p in paths if isinstance(p, str)] if isinstance(paths, list) else []
