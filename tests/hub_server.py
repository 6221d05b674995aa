"""A small, in-process Hugging Face Hub emulator for tests.

Why this exists
---------------
The real Hub (https://huggingface.co) cannot be reached from the machines our tests run on, yet the
project's code talks to it through the *real* client libraries: ``huggingface_hub.HfApi``
(``create_repo``, ``upload_folder``, ``create_commit(create_pr=True)``, ``hf_hub_download``,
``snapshot_download``, ``list_repo_refs``, discussions, ...), ``datasets`` (``push_to_hub`` /
``load_dataset``) and ``transformers`` (``push_to_hub`` / ``from_pretrained``). Mocking those Python
calls would test nothing, so instead this module serves the subset of the Hub HTTP API these clients
use, and tests point the clients at it with ``HF_ENDPOINT``. Every request goes over real HTTP.

What is emulated
----------------
* repos of type model / dataset / space, stored on disk under ``storage_dir`` (``state.json`` for
  metadata + a content-addressed ``blobs/`` folder), so content survives across clients and processes;
* real commit snapshots: each commit has a sha and a full file map; branches, tags and ``refs/pr/N``
  point at commits; ``main`` points at the latest commit on main;
* uploads through the regular (base64 in the commit payload) and the Git LFS (batch + PUT + verify)
  paths. **Xet is not emulated**: clients must run with ``HF_HUB_DISABLE_XET=1`` (see `hub_env`),
  otherwise ``huggingface_hub`` 2.x uploads every LFS file through the Xet protocol;
* pull requests created by ``create_commit(create_pr=True)`` / ``create_pull_request`` with
  discussions, comments, status changes and merge;
* writes require an ``Authorization: Bearer <anything>`` header (any token is accepted), so tests can
  check that a token is sent. Reads of public repos work anonymously.

Endpoints (``{t}`` = models|datasets|spaces, ``{p}`` = ""|datasets/|spaces/, revisions may be
URL-encoded ``refs%2Fpr%2F1`` or plain ``refs/pr/1``)::

    GET  /api/whoami-v2                          POST /api/validate-yaml
    POST /api/repos/create   (409 + url if exists) DELETE /api/repos/delete
    GET  /api/{t}/{id}[/revision/{rev}]          GET  /api/{t}/{id}/tree/{rev}[/{path}]  (recursive, expand, cursor)
    POST /api/{t}/{id}/paths-info/{rev}          GET  /api/{t}/{id}/refs[?include_prs=1]
    GET  /api/{t}/{id}/commits/{rev}             POST /api/{t}/{id}/preupload/{rev}
    POST /api/{t}/{id}/commit/{rev}[?create_pr=1] POST|DELETE /api/{t}/{id}/branch/{name}
    POST /api/{t}/{id}/tag/{rev}                 GET|POST /api/{t}/{id}/discussions[/{num}[/comment|status|merge]]
    GET|POST /api/spaces/{id}/variables
    POST /{p}{id}.git/info/lfs/objects/batch     PUT /_lfs/{oid}, POST /_lfs/{oid}/verify
    GET|HEAD /{p}{id}/resolve/{rev}/{path}       (ETag, X-Repo-Commit, X-Linked-Etag/Size, Range)

``HF_ENDPOINT`` is read by ``huggingface_hub.constants`` at import time, so client code is best run in a
subprocess with the environment from `hub_env` (see `run_python`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

__all__ = ["HubServer", "start_hub_server", "hub_env", "run_python", "run_python_json"]

API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Files at least this big, binary files (NUL byte in the first 512 bytes) and files with these
# extensions are uploaded through LFS (huggingface_hub assumes "regular" files are <= 5 MB).
LFS_THRESHOLD = 5 * 1024 * 1024
LFS_EXTENSIONS = (".parquet", ".arrow", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx",
                  ".msgpack", ".npy", ".npz", ".pkl", ".pickle", ".zip", ".gz", ".tar", ".png", ".jpg",
                  ".jpeg", ".dcm", ".tflite", ".joblib", ".model")
GITATTRIBUTES = "".join(f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in LFS_EXTENSIONS).encode()
TREE_PAGE_SIZE, TREE_PAGE_SIZE_EXPAND = 1000, 50


class HubError(Exception):
    """Raised by handlers; rendered as a JSON error with the Hub's ``X-Error-Code`` header."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.body = {"error": message, **(body or {})}


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _is_lfs(path: str, size: int, sample: bytes) -> bool:
    return size >= LFS_THRESHOLD or b"\x00" in sample or path.lower().endswith(LFS_EXTENSIONS)


class HubState:
    """Repositories (commits, refs, discussions) + content-addressed blob store, persisted on disk.

    A repo is a dict ``{"type", "id", "private", "sdk", "createdAt", "branches": {name: sha},
    "tags": {name: sha}, "prs": {"N": sha}, "commits": {sha: commit}, "discussions": [...]}``; a commit is
    ``{"id", "parents", "title", "message", "date", "author", "files": {path: entry}}`` where an entry is
    ``{"sha256", "size", "lfs", "oid"}`` and the content lives in ``blobs/<sha256>``.
    """

    def __init__(self, storage_dir: Path, username: str):
        self.dir = Path(storage_dir)
        self.blobs = self.dir / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.username = username
        self.lock = threading.RLock()
        self.state_file = self.dir / "state.json"
        self.repos: dict[str, dict] = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        self.pending_lfs: set[str] = set()  # oids announced by the LFS batch endpoint, allowed to be PUT

    # -- persistence / blobs -------------------------------------------------------------------------
    def save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.repos))
        os.replace(tmp, self.state_file)

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.blob_path(sha).exists():
            with tempfile.NamedTemporaryFile(dir=self.blobs, delete=False) as f:
                f.write(data)
            os.replace(f.name, self.blob_path(sha))
        return sha

    # -- repos / revisions ---------------------------------------------------------------------------
    def repo(self, repo_type: str, repo_id: str) -> dict:
        repo = self.repos.get(f"{repo_type}/{repo_id}")
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, private: bool, sdk: str | None) -> dict:
        repo = {"type": repo_type, "id": repo_id, "private": private, "sdk": sdk, "createdAt": _now(),
                "branches": {}, "tags": {}, "prs": {}, "commits": {}, "discussions": []}
        files = {".gitattributes": self.entry(".gitattributes", GITATTRIBUTES, lfs=False)}
        repo["branches"]["main"] = self.new_commit(repo, None, files, "initial commit", "")
        self.repos[f"{repo_type}/{repo_id}"] = repo
        return repo

    def entry(self, path: str, data: bytes, lfs: bool | None = None) -> dict:
        lfs = _is_lfs(path, len(data), data[:512]) if lfs is None else lfs
        sha = self.put_blob(data)
        oid = _git_oid(_lfs_pointer(sha, len(data))) if lfs else _git_oid(data)
        return {"sha256": sha, "size": len(data), "lfs": lfs, "oid": oid}

    def new_commit(self, repo: dict, parent: str | None, files: dict, title: str, message: str) -> str:
        seed = json.dumps([parent, sorted((p, e["oid"]) for p, e in files.items()), title, time.time_ns(),
                           secrets.token_hex(4)])
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo["commits"][sha] = {"id": sha, "parents": [parent] if parent else [], "title": title,
                                "message": message, "date": _now(), "author": self.username, "files": files}
        return sha

    def resolve(self, repo: dict, revision: str | None) -> str:
        """Revision (branch, tag, refs/heads|tags|pr/..., commit sha or prefix) -> commit sha."""
        rev = revision or "main"
        for prefix, table in (("refs/heads/", "branches"), ("refs/tags/", "tags"), ("refs/pr/", "prs")):
            if rev.startswith(prefix) and rev[len(prefix):] in repo[table]:
                return repo[table][rev[len(prefix):]]
        if rev in repo["branches"]:
            return repo["branches"][rev]
        if rev in repo["tags"]:
            return repo["tags"][rev]
        if re.fullmatch(r"[0-9a-f]{7,40}", rev):
            matches = [sha for sha in repo["commits"] if sha.startswith(rev)]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def set_ref(self, repo: dict, revision: str, sha: str) -> None:
        if revision.startswith("refs/pr/"):
            repo["prs"][revision[len("refs/pr/"):]] = sha
        else:
            repo["branches"][revision.removeprefix("refs/heads/")] = sha

    def history(self, repo: dict, sha: str) -> Iterator[dict]:
        while sha:
            commit = repo["commits"][sha]
            yield commit
            sha = commit["parents"][0] if commit["parents"] else None

    def last_commit(self, repo: dict, head: str, path: str) -> dict:
        """Most recent commit (from ``head``) that changed ``path`` (a file or a folder)."""
        def snapshot(c: dict) -> list:
            return sorted((p, e["oid"]) for p, e in c["files"].items() if p == path or p.startswith(path + "/"))
        commits = list(self.history(repo, head))
        for commit, parent in zip(commits, commits[1:] + [None]):
            if parent is None or snapshot(commit) != snapshot(parent):
                return {"id": commit["id"], "title": commit["title"], "date": commit["date"]}
        return {}

    def new_discussion(self, repo: dict, title: str, description: str, is_pr: bool) -> dict:
        num = len(repo["discussions"]) + 1
        disc = {"num": num, "title": title, "status": "open", "isPullRequest": is_pr, "createdAt": _now(),
                "author": {"name": self.username}, "events": [], "base": "refs/heads/main"}
        disc["events"].append(self.event("comment", description or ""))
        if is_pr:
            disc["baseCommit"] = repo["branches"]["main"]
            repo["prs"][str(num)] = disc["baseCommit"]
        repo["discussions"].append(disc)
        return disc

    def event(self, kind: str, content: Any) -> dict:
        ev = {"id": secrets.token_hex(12), "type": kind, "createdAt": _now(), "author": {"name": self.username}}
        if kind == "comment":
            ev["data"] = {"edited": False, "hidden": False, "numEdits": 0, "editors": [], "reactions": [],
                          "latest": {"raw": content, "html": content, "updatedAt": ev["createdAt"],
                                     "author": {"name": self.username}}, "history": []}
        elif kind == "commit":
            ev["data"] = {"subject": content[0], "oid": content[1]}
        elif kind == "status-change":
            ev["data"] = {"status": content}
        return ev


def _tree_entry(repo: dict, state: HubState, head: str, path: str, files: dict, expand: bool) -> dict:
    """JSON for one file or folder, in the format of the Hub's ``/tree`` and ``/paths-info`` endpoints."""
    if path in files:
        e = files[path]
        item: dict[str, Any] = {"type": "file", "oid": e["oid"], "size": e["size"], "path": path}
        if e["lfs"]:
            item["lfs"] = {"oid": e["sha256"], "size": e["size"],
                           "pointerSize": len(_lfs_pointer(e["sha256"], e["size"]))}
    else:
        inside = sorted((p, e["oid"]) for p, e in files.items() if p.startswith(path + "/"))
        item = {"type": "directory", "oid": hashlib.sha1(json.dumps(inside).encode()).hexdigest(), "path": path}
    if expand:
        item["lastCommit"] = state.last_commit(repo, head, path)
    return item


def _dirs_of(files: dict) -> set[str]:
    return {p.rsplit("/", i)[0] for p in files for i in range(1, p.count("/") + 1)}


class _Handler(BaseHTTPRequestHandler):
    """Routes one HTTP request to a handler method; see the module docstring for the covered API."""

    server: "_Server"
    protocol_version = "HTTP/1.0"  # one request per connection: simple and robust

    # -- plumbing ------------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # silence stderr logging
        pass

    def do_GET(self) -> None: self._dispatch("GET")
    def do_HEAD(self) -> None: self._dispatch("HEAD")
    def do_POST(self) -> None: self._dispatch("POST")
    def do_PUT(self) -> None: self._dispatch("PUT")
    def do_DELETE(self) -> None: self._dispatch("DELETE")

    @property
    def state(self) -> HubState:
        return self.server.state

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        status = 500
        try:
            status = self._route(method, [s for s in parts.path.split("/") if s])
        except HubError as err:
            status = err.status
            message = err.message.encode("ascii", "replace").decode().replace("\n", " ")
            headers = {"X-Error-Message": message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, err.body, headers)
        except (BrokenPipeError, ConnectionResetError):  # client went away mid-response
            pass
        except Exception:  # a bug in the emulator: hand the traceback to the client
            self._send(500, {"error": traceback.format_exc()})
        finally:
            self.server.requests.append((method, self.path, status))

    def _send(self, status: int, body: Any = None, headers: dict | None = None) -> int:
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        else:
            data = body or b""
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        return status

    def _iter_body(self) -> Iterator[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while (size := int(self.rfile.readline().split(b";")[0].strip(), 16)) > 0:
                yield self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk

    def _body(self) -> bytes:
        return b"".join(self._iter_body())

    def _json(self) -> Any:
        body = self._body()
        return json.loads(body) if body else {}

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:].strip() or None if auth.lower().startswith("bearer ") else None

    def _require_token(self) -> None:
        if self._token() is None:
            raise HubError(401, "Invalid credentials in Authorization header")

    def _base(self, repo: dict) -> str:
        return f"{self.server.url}/{URL_PREFIX[repo['type']]}{repo['id']}"

    @staticmethod
    def _split_revision(segs: list[str]) -> tuple[str, list[str]]:
        """First revision in raw path segments: ``refs%2Fpr%2F1`` or unencoded ``refs/pr/1``."""
        if not segs:
            raise HubError(400, "Missing revision")
        if unquote(segs[0]) == "refs" and len(segs) >= 3:
            return "/".join(unquote(s) for s in segs[:3]), segs[3:]
        return unquote(segs[0]), segs[1:]

    def _read_repo(self, repo_type: str, repo_id: str) -> dict:
        repo = self.state.repo(repo_type, repo_id)
        if repo["private"] and self._token() is None:
            raise HubError(401, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    # -- routing -------------------------------------------------------------------------------------
    def _route(self, method: str, segs: list[str]) -> int:
        if segs[:1] == ["api"]:
            return self._route_api(method, segs[1:])
        if segs[:1] == ["_lfs"] and len(segs) >= 2:
            return self._lfs_object(method, segs[1], segs[2:])
        repo_type = "model"
        if segs and segs[0] in ("datasets", "spaces"):
            repo_type, segs = API_TYPES[segs[0]], segs[1:]
        if len(segs) >= 3 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            revision, rest = self._split_revision(segs[3:])
            return self._resolve(repo_type, f"{segs[0]}/{segs[1]}", revision, "/".join(unquote(s) for s in rest))
        if method == "POST" and len(segs) == 6 and segs[1].endswith(".git") and segs[2:] == [
                "info", "lfs", "objects", "batch"]:
            return self._lfs_batch(repo_type, f"{segs[0]}/{segs[1][:-4]}")
        raise HubError(404, f"Not found: {method} {self.path} (not emulated by tests/hub_server.py)")

    def _route_api(self, method: str, segs: list[str]) -> int:
        if segs == ["whoami-v2"] and method == "GET":
            self._require_token()
            return self._send(200, {"type": "user", "id": "0" * 24, "name": self.state.username,
                                    "fullname": "Test User", "email": None, "orgs": [], "isPro": False,
                                    "auth": {"type": "access_token",
                                             "accessToken": {"displayName": "test", "role": "write"}}})
        if segs == ["validate-yaml"] and method == "POST":
            self._body()
            return self._send(200, {"errors": [], "warnings": []})
        if segs == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if segs == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if len(segs) < 3 or segs[0] not in API_TYPES:
            raise HubError(404, f"Not found: {method} {self.path} (not emulated by tests/hub_server.py)")
        repo_type, repo_id, rest = API_TYPES[segs[0]], f"{unquote(segs[1])}/{unquote(segs[2])}", segs[3:]
        action = rest[0] if rest else None
        with self.state.lock:
            if method == "GET" and action is None:
                return self._repo_info(repo_type, repo_id, None)
            if method == "GET" and action == "revision":
                return self._repo_info(repo_type, repo_id, self._split_revision(rest[1:])[0])
            if method == "GET" and action == "tree":
                revision, path = self._split_revision(rest[1:])
                return self._tree(repo_type, repo_id, revision, "/".join(unquote(s) for s in path))
            if method == "GET" and action == "refs":
                return self._refs(repo_type, repo_id)
            if method == "GET" and action == "commits":
                return self._commits(repo_type, repo_id, self._split_revision(rest[1:])[0])
            if method == "POST" and action == "paths-info":
                return self._paths_info(repo_type, repo_id, self._split_revision(rest[1:])[0])
            if method == "GET" and action == "discussions":
                return self._discussions_get(repo_type, repo_id, rest[1:])
            if action in ("xet-write-token", "xet-read-token"):
                raise HubError(501, "Xet storage is not emulated by tests/hub_server.py: run clients with "
                                    "HF_HUB_DISABLE_XET=1 so that uploads use Git LFS.")
            if action == "variables" and repo_type == "space" and method in ("GET", "POST"):
                return self._space_variables(method, repo_id)
            self._require_token()  # everything below is a write
            if method == "POST" and action == "preupload":
                return self._preupload(repo_type, repo_id, self._split_revision(rest[1:])[0])
            if method == "POST" and action == "commit":
                return self._commit(repo_type, repo_id, self._split_revision(rest[1:])[0])
            if method in ("POST", "DELETE") and action == "branch":
                return self._branch(method, repo_type, repo_id, "/".join(unquote(s) for s in rest[1:]))
            if method == "POST" and action == "tag":
                return self._tag(repo_type, repo_id, self._split_revision(rest[1:])[0])
            if action == "discussions" and method == "POST":
                return self._discussion_post(repo_type, repo_id, rest[1:])
        raise HubError(404, f"Not found: {method} {self.path} (not emulated by tests/hub_server.py)")

    # -- repos ---------------------------------------------------------------------------------------
    def _create_repo(self) -> int:
        self._require_token()
        payload = self._json()
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"Unsupported repo type {repo_type!r}")
        repo_id = f"{payload.get('organization') or self.state.username}/{payload['name']}"
        if repo_type == "space" and not payload.get("sdk"):
            raise HubError(400, "Missing Space SDK")
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self.state.lock:
            if f"{repo_type}/{repo_id}" in self.state.repos:  # the client reads "url" when exist_ok=True
                url = f"{self.server.url}/{URL_PREFIX[repo_type]}{repo_id}"
                raise HubError(409, f"You already created this {repo_type} repo", body={"url": url})
            repo = self.state.create_repo(repo_type, repo_id, private, payload.get("sdk"))
            self.state.save()
        return self._send(200, {"url": self._base(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> int:
        self._require_token()
        payload = self._json()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.state.username}/{payload['name']}"
        with self.state.lock:
            self.state.repo(repo_type, repo_id)
            del self.state.repos[f"{repo_type}/{repo_id}"]
            self.state.save()
        return self._send(200, {})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str | None) -> int:
        repo = self._read_repo(repo_type, repo_id)
        sha = self.state.resolve(repo, revision)
        commit = repo["commits"][sha]
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, e in sorted(commit["files"].items()):
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(size=e["size"], blobId=e["oid"])
                if e["lfs"]:
                    sib["lfs"] = {"size": e["size"], "sha256": e["sha256"],
                                  "pointerSize": len(_lfs_pointer(e["sha256"], e["size"]))}
            siblings.append(sib)
        info = {"_id": sha[:24], "id": repo_id, "author": repo_id.split("/")[0], "sha": sha,
                "private": repo["private"], "gated": False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": [], "createdAt": repo["createdAt"], "lastModified": commit["date"], "siblings": siblings}
        if repo_type == "space":
            info.update(sdk=repo["sdk"], subdomain=repo_id.replace("/", "-").lower())
        return self._send(200, info)

    def _refs(self, repo_type: str, repo_id: str) -> int:
        repo = self._read_repo(repo_type, repo_id)
        def refs(table: str, prefix: str) -> list[dict]:
            return [{"name": name if table != "prs" else f"refs/pr/{name}", "ref": f"{prefix}{name}",
                     "targetCommit": sha} for name, sha in sorted(repo[table].items())]
        data = {"branches": refs("branches", "refs/heads/"), "tags": refs("tags", "refs/tags/"), "converts": []}
        if self.query.get("include_prs") in ("1", "true", "True"):
            data["pullRequests"] = refs("prs", "refs/pr/")
        return self._send(200, data)

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> int:
        repo = self._read_repo(repo_type, repo_id)
        return self._send(200, [{"id": c["id"], "title": c["title"], "message": c["message"], "date": c["date"],
                                 "authors": [{"user": c["author"]}]}
                                for c in self.state.history(repo, self.state.resolve(repo, revision))])

    def _branch(self, method: str, repo_type: str, repo_id: str, branch: str) -> int:
        repo = self.state.repo(repo_type, repo_id)
        if method == "DELETE":
            if branch not in repo["branches"] or branch == "main":
                raise HubError(404 if branch != "main" else 403, f"Cannot delete branch {branch}")
            del repo["branches"][branch]
        else:
            payload = self._json()
            if branch in repo["branches"]:
                raise HubError(409, f"Branch {branch} already exists")
            repo["branches"][branch] = self.state.resolve(repo, payload.get("startingPoint"))
        self.state.save()
        return self._send(200, {})

    def _space_variables(self, method: str, repo_id: str) -> int:
        """Space variables (``add_space_variable`` / ``get_space_variables``): {key: {value, ...}}."""
        self._require_token()
        repo = self.state.repo("space", repo_id)
        variables = repo.setdefault("variables", {})
        if method == "POST":
            payload = self._json()
            variables[payload["key"]] = {"value": payload["value"], "description": payload.get("description"),
                                         "updatedAt": _now()}
            self.state.save()
        return self._send(200, variables)

    def _tag(self, repo_type: str, repo_id: str, revision: str) -> int:
        repo = self.state.repo(repo_type, repo_id)
        tag = self._json()["tag"]
        if tag in repo["tags"]:
            raise HubError(409, f"Tag {tag} already exists")
        repo["tags"][tag] = self.state.resolve(repo, revision)
        self.state.save()
        return self._send(200, {})

    # -- listing -------------------------------------------------------------------------------------
    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> int:
        repo = self._read_repo(repo_type, repo_id)
        head = self.state.resolve(repo, revision)
        files = repo["commits"][head]["files"]
        path = path.strip("/")
        dirs = _dirs_of(files)
        if path and path not in dirs:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": head})
        prefix = f"{path}/" if path else ""
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        names = sorted(p for p in list(files) + list(dirs) if p.startswith(prefix)
                       and (recursive or "/" not in p[len(prefix):]))
        expand = self.query.get("expand", "").lower() in ("1", "true")
        page = TREE_PAGE_SIZE_EXPAND if expand else TREE_PAGE_SIZE
        start = int(self.query.get("cursor", 0))
        items = [_tree_entry(repo, self.state, head, p, files, expand) for p in names[start:start + page]]
        headers = {}
        if start + page < len(names):
            query = urlencode({**self.query, "cursor": start + page})
            headers["Link"] = f'<{self.server.url}{urlsplit(self.path).path}?{query}>; rel="next"'
        return self._send(200, items, headers)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> int:
        repo = self._read_repo(repo_type, repo_id)
        body = self._body().decode()
        form = json.loads(body) if body.startswith("{") else parse_qs(body)
        paths = form.get("paths", [])
        expand = str(form.get("expand", ["false"])[-1] if isinstance(form.get("expand"), list)
                     else form.get("expand")).lower() in ("1", "true")
        head = self.state.resolve(repo, revision)
        files = repo["commits"][head]["files"]
        dirs = _dirs_of(files)
        return self._send(200, [_tree_entry(repo, self.state, head, p.strip("/"), files, expand)
                                for p in paths if p.strip("/") in files or p.strip("/") in dirs])

    # -- downloads -----------------------------------------------------------------------------------
    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> int:
        with self.state.lock:
            repo = self._read_repo(repo_type, repo_id)
            sha = self.state.resolve(repo, revision)
            entry = repo["commits"][sha]["files"].get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        size = entry["size"]
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                   "ETag": f'"{entry["oid"]}"'}
        if entry["lfs"]:
            headers.update({"ETag": f'"{entry["sha256"]}"', "X-Linked-Etag": f'"{entry["sha256"]}"',
                            "X-Linked-Size": size})
        start, end, status = 0, size - 1, 200
        rng = re.fullmatch(r"bytes=(\d*)-(\d*)", (self.headers.get("Range") or "").strip())
        if rng and size > 0 and (rng[1] or rng[2]):  # "a-b", "a-" or suffix "-n"
            if rng[1]:
                start, end = int(rng[1]), min(int(rng[2]) if rng[2] else size - 1, size - 1)
            else:
                start = max(size - int(rng[2]), 0)
            if start >= size:
                raise HubError(416, "Range not satisfiable", None, {"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        self.send_response(status)
        for key, value in {**headers, "Content-Length": length}.items():
            self.send_header(key, str(value))
        self.end_headers()
        if self.command == "GET" and length:
            with open(self.state.blob_path(entry["sha256"]), "rb") as f:
                f.seek(start)
                while length > 0 and (chunk := f.read(min(length, 1 << 20))):
                    self.wfile.write(chunk)
                    length -= len(chunk)
        return status

    # -- uploads -------------------------------------------------------------------------------------
    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> int:
        repo = self.state.repo(repo_type, repo_id)
        files = repo["commits"][self.state.resolve(repo, revision)]["files"]
        result = []
        for f in self._json().get("files", []):
            lfs = _is_lfs(f["path"], int(f["size"]), base64.b64decode(f.get("sample", "")))
            remote = files.get(f["path"])
            oid = None if remote is None else (remote["sha256"] if remote["lfs"] else remote["oid"])
            result.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                           "shouldIgnore": False, "oid": oid})
        return self._send(200, {"files": result, "commitOid": self.state.resolve(repo, revision)})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> int:
        self._require_token()
        payload = self._json()
        self.state.repo(repo_type, repo_id)
        if payload.get("operation") != "upload":
            raise HubError(400, "Only LFS uploads are emulated")
        objects = []
        for obj in payload.get("objects", []):
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not self.state.blob_path(obj["oid"]).exists():
                with self.state.lock:
                    self.state.pending_lfs.add(obj["oid"])
                href = f"{self.server.url}/_lfs/{obj['oid']}"
                item["actions"] = {"upload": {"href": href}, "verify": {"href": f"{href}/verify"}}
            objects.append(item)
        return self._send(200, {"transfer": "basic", "objects": objects},
                          {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_object(self, method: str, oid: str, rest: list[str]) -> int:
        if method == "POST" and rest == ["verify"]:
            self._require_token()
            payload = self._json()
            path = self.state.blob_path(oid)
            if not path.exists() or path.stat().st_size != int(payload.get("size", path.stat().st_size)):
                raise HubError(404, f"LFS object {oid} not found")
            return self._send(200, {})
        if method != "PUT" or rest or oid not in self.state.pending_lfs:
            raise HubError(403, "Unknown LFS upload (call the LFS batch endpoint first)")
        digest = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=self.state.blobs, delete=False) as tmp:
            for chunk in self._iter_body():
                digest.update(chunk)
                tmp.write(chunk)
        if digest.hexdigest() != oid:
            os.unlink(tmp.name)
            raise HubError(400, f"Content does not match sha256 {oid}")
        os.replace(tmp.name, self.state.blob_path(oid))
        with self.state.lock:
            self.state.pending_lfs.discard(oid)
        return self._send(200, {}, {"ETag": f'"{oid}"'})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> int:
        repo = self.state.repo(repo_type, repo_id)
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = next((ln["value"] for ln in lines if ln["key"] == "header"), {})
        create_pr = self.query.get("create_pr") in ("1", "true", "True")
        if create_pr and revision not in ("main", "refs/heads/main"):
            raise HubError(400, "Pull requests can only be opened against main")
        if not create_pr and not (revision.startswith("refs/pr/") or revision.removeprefix("refs/heads/")
                                  in repo["branches"]):
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        parent = self.state.resolve(repo, revision)
        if header.get("parentCommit") and header["parentCommit"] != parent:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo["commits"][parent]["files"])
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = self.state.entry(value["path"], base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                blob = self.state.blob_path(value["oid"])
                if not blob.exists():
                    raise HubError(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                size = blob.stat().st_size
                files[value["path"]] = {"sha256": value["oid"], "size": size, "lfs": True,
                                        "oid": _git_oid(_lfs_pointer(value["oid"], size))}
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                for path in [p for p in files if p.startswith(folder)]:
                    del files[path]
            elif key != "header":
                raise HubError(400, f"Unsupported commit operation {key!r}")
        sha = self.state.new_commit(repo, parent, files, header.get("summary", ""), header.get("description", ""))
        pr_url = None
        if create_pr:
            disc = self.state.new_discussion(repo, header.get("summary", ""), header.get("description", ""), True)
            revision = f"refs/pr/{disc['num']}"
            pr_url = f"{self._base(repo)}/discussions/{disc['num']}"
        if revision.startswith("refs/pr/"):
            disc = repo["discussions"][int(revision.split("/")[-1]) - 1]
            disc["events"].append(self.state.event("commit", (header.get("summary", ""), sha)))
        self.state.set_ref(repo, revision, sha)
        self.state.save()
        return self._send(200, {"success": True, "commitOid": sha, "commitUrl": f"{self._base(repo)}/commit/{sha}",
                                "pullRequestUrl": pr_url})

    # -- discussions ---------------------------------------------------------------------------------
    def _discussion_json(self, repo: dict, disc: dict, details: bool) -> dict:
        data = {k: disc[k] for k in ("num", "title", "status", "isPullRequest", "createdAt", "author")}
        data["repo"] = {"name": repo["id"], "type": repo["type"]}
        if details:
            data.update(events=disc["events"], filesWithConflicts=[], changes={"base": disc["base"]})
            if disc.get("mergeCommitId"):
                data["changes"]["mergeCommitId"] = disc["mergeCommitId"]
            if disc["isPullRequest"]:
                base = repo["commits"][disc["baseCommit"]]["files"]
                head = repo["commits"][repo["prs"][str(disc["num"])]]["files"]
                changed = sorted(p for p in set(base) | set(head) if base.get(p) != head.get(p))
                data["diff"] = "".join(f"diff --git a/{p} b/{p}\n" for p in changed)
        return data

    def _discussions_get(self, repo_type: str, repo_id: str, rest: list[str]) -> int:
        repo = self._read_repo(repo_type, repo_id)
        if not rest:
            wanted_type, wanted_status = self.query.get("type", "all"), self.query.get("status", "all")
            discs = [self._discussion_json(repo, d, False) for d in reversed(repo["discussions"])
                     if wanted_type in ("all", "pull_request" if d["isPullRequest"] else "discussion")
                     and wanted_status in ("all", d["status"])]
            return self._send(200, {"discussions": discs, "count": len(discs), "start": 0})
        num = int(rest[0])
        if not 0 < num <= len(repo["discussions"]):
            raise HubError(404, f"Discussion #{num} not found")
        return self._send(200, self._discussion_json(repo, repo["discussions"][num - 1], True))

    def _discussion_post(self, repo_type: str, repo_id: str, rest: list[str]) -> int:
        repo = self.state.repo(repo_type, repo_id)
        payload = self._json()
        if not rest:  # create a discussion / pull request
            disc = self.state.new_discussion(repo, payload.get("title", ""), payload.get("description", ""),
                                             bool(payload.get("pullRequest")))
            self.state.save()
            return self._send(200, {"num": disc["num"], "pullRequest": disc["isPullRequest"]})
        num = int(rest[0])
        if not 0 < num <= len(repo["discussions"]):
            raise HubError(404, f"Discussion #{num} not found")
        disc, action = repo["discussions"][num - 1], rest[1] if len(rest) > 1 else None
        response: dict[str, Any] = {}
        if action == "comment":
            disc["events"].append(ev := self.state.event("comment", payload.get("comment", "")))
            response["newMessage"] = ev
        elif action == "status":
            disc["status"] = payload["status"]
            disc["events"].append(ev := self.state.event("status-change", payload["status"]))
            response["newStatus"] = ev
        elif action == "merge" and disc["isPullRequest"] and disc["status"] == "open":
            base = repo["commits"][disc["baseCommit"]]["files"]
            head = repo["commits"][repo["prs"][str(num)]]["files"]
            files = dict(repo["commits"][repo["branches"]["main"]]["files"])
            for path in set(base) | set(head):
                if base.get(path) != head.get(path):
                    if path in head:
                        files[path] = head[path]
                    else:
                        files.pop(path, None)
            sha = self.state.new_commit(repo, repo["branches"]["main"], files, f"Merge PR #{num}: {disc['title']}", "")
            repo["branches"]["main"] = disc["mergeCommitId"] = sha
            disc["status"] = "merged"
            disc["events"].append(self.state.event("status-change", "merged"))
        else:
            raise HubError(400, f"Unsupported discussion action {action!r}")
        self.state.save()
        return self._send(200, response)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState
    url: str
    requests: list


class HubServer:
    """A running emulator: ``.url`` (use as ``HF_ENDPOINT``), ``.stop()``, usable as a context manager.

    ``.requests`` lists ``(method, path, status)`` for every request served, so tests can assert which
    code paths a client took (e.g. that an LFS batch request was made, or that a write was refused).
    """

    def __init__(self, httpd: _Server, thread: threading.Thread):
        self._httpd, self._thread = httpd, thread
        self.url: str = httpd.url
        self.storage_dir: Path = httpd.state.dir
        self.requests: list[tuple[str, str, int]] = httpd.requests

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> "HubServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_hub_server(storage_dir: Path, host: str = "127.0.0.1", port: int = 0, *,
                     username: str = "test-user") -> HubServer:
    """Start the emulator in a background thread, storing everything under ``storage_dir``.

    ``port=0`` picks a free port. Repos created without a namespace go under ``username``, which is
    also what ``/api/whoami-v2`` reports for any token.
    """
    httpd = _Server((host, port), _Handler)
    httpd.state = HubState(Path(storage_dir), username)
    httpd.url = f"http://{host}:{httpd.server_address[1]}"
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              name="hub-server", daemon=True)
    thread.start()
    return HubServer(httpd, thread)


def hub_env(server: HubServer, tmp_path: Path, token: str | None = "hf_test_token") -> dict[str, str]:
    """Environment for a subprocess whose Hugging Face clients must talk to ``server``.

    Sets ``HF_ENDPOINT``, a fresh ``HF_HOME`` (so caches and stored tokens never leak between tests),
    ``HF_HUB_DISABLE_XET=1`` (Xet is not emulated: uploads go through Git LFS), disables telemetry,
    progress bars and offline mode, bypasses proxies for the local server and limits CPU threads.
    ``token=None`` leaves ``HF_TOKEN`` unset (anonymous client).
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k not in ("TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE")}
    home = Path(tmp_path) / "hf_home"
    home.mkdir(parents=True, exist_ok=True)
    no_proxy = ",".join(x for x in (env.get("NO_PROXY", ""), "127.0.0.1,localhost") if x)
    env.update({
        "HF_ENDPOINT": server.url, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0", "NO_PROXY": no_proxy,
        "no_proxy": no_proxy, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
    })
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run_python(code: str, env: dict[str, str], *, timeout: float = 300, cwd: str | Path | None = None) -> str:
    """Run ``code`` with this interpreter in a subprocess; return stdout, raise with full logs on failure."""
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess failed ({proc.returncode})\n--- stdout ---\n{proc.stdout}\n"
                           f"--- stderr ---\n{proc.stderr}")
    return proc.stdout


def run_python_json(code: str, env: dict[str, str], **kwargs: Any) -> Any:
    """Like `run_python`, parsing the last stdout line as JSON (scripts end with ``print(json.dumps(...))``)."""
    lines = [ln for ln in run_python(code, env, **kwargs).splitlines() if ln.strip()]
    return json.loads(lines[-1])


if __name__ == "__main__":  # manual use: python tests/hub_server.py /tmp/hub 8765
    srv = start_hub_server(Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()),
                           port=int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print(f"Hub emulator at {srv.url} (HF_ENDPOINT={srv.url} HF_HUB_DISABLE_XET=1)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.stop()
