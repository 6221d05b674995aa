"""Paths as the project's records show them (reports, benchmark results, files that ship with a model)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def shown_path(path: str | Path) -> str:
    """A path as a report records it: relative to the working directory when it lies below it or beside
    it (``space/model``, ``../shared/...``), so that committed results do not name one machine's
    checkout; anything else as given."""
    p, here = Path(path).resolve(), Path.cwd().resolve()
    for base, prefix in ((here, ""), (here.parent, "../")):
        try:
            return prefix + p.relative_to(base).as_posix()
        except ValueError:
            continue
    return str(path)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in chunks (the stdlib's ``hashlib.file_digest``): weights
    compared with a Hub repo's, bundled examples recognised by content."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
