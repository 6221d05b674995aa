"""Output files answered by URL: the batch CSV and the export archive.

A module of its own because Gradio writes a type stub (``.pyi``) beside the module of every component
subclass when it is imported; here that stub is this small file's (gitignored), not a copy of app.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import gradio as gr

from .files import TempFiles


class OutputFile(gr.File):
    """A file output answered by its URL on the Space's own output route (``space.files.OUTPUT_ROUTE``)
    rather than by its path on the server: ``gr.File`` would answer with the absolute path, in ``path``
    and inside its ``url``. Its value is :func:`served`'s dict; the browser draws it as a ``gr.File``."""

    def get_block_name(self) -> str:
        return "file"

    def postprocess(self, value):
        if isinstance(value, dict) and "url" in value:
            from gradio.data_classes import FileData

            # an http URL: Gradio passes it on as it is (path = url), copying nothing into its cache
            return FileData(path=value["url"], url=value["url"], orig_name=value["name"], size=value["size"])
        return super().postprocess(value)


def served(files: TempFiles, request: gr.Request, path: str | os.PathLike) -> dict:
    """An :class:`OutputFile` value: the output's absolute URL (behind the Space's proxy too, from its
    forwarded host and protocol, as Gradio finds its own root), its name and size."""
    from gradio import route_utils

    req = request.request
    root = route_utils.get_root_url(req, req.url.path, os.environ.get("GRADIO_ROOT_PATH") or None)
    p = Path(path)
    return {"url": root + files.output_route(p), "name": p.name, "size": p.stat().st_size}
