"""The private page at ``/private/``: the model runs in the visitor's browser, the film never leaves it.

Served by the Space's own process (routes given to Gradio's FastAPI app) from three folders:

* ``/private/``        the page (``space/private/page/``: HTML, the pixel code, the UI code);
* ``/private/ort/``    ONNX Runtime Web's files from the npm package ``scripts/dev.sh setup`` installs
  (``space/private/node_modules/onnxruntime-web/dist``; these machines reach npm, not a CDN);
* ``/private/model/``  the model's ``onnx/`` folder (``cxr-export --onnx``: graphs and ``browser.json``).

Every answer carries headers that make the privacy promise checkable by the browser, not only by
reading the code: a Content-Security-Policy whose ``connect-src 'self'`` and ``form-action 'none'``
forbid sending anything to another origin, and COOP/COEP (cross-origin isolation), which also lets
ONNX Runtime use WebAssembly threads. The page itself only fetches its files and the model.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGE = HERE / "private" / "page"
ORT_DIST = HERE / "private" / "node_modules" / "onnxruntime-web" / "dist"

HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self' blob:; "
                                "connect-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                                "form-action 'none'; base-uri 'none'; frame-ancestors 'self'"),
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


class WithHeaders:
    """An ASGI app that adds :data:`HEADERS` to every response of the app it wraps."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                extra = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def onnx_folder(model_id: str, revision: str | None = None) -> Path | None:
    """The model's ``onnx/`` folder (a Hub model: its files are fetched into the cache), or None."""
    import json

    from modeling.gate import file_beside

    config = file_beside(model_id, "onnx/browser.json", revision)
    if config is None:
        return None
    for variant in json.loads(config.read_text())["variants"].values():
        if variant["shipped"]:
            file_beside(model_id, variant["file"], revision)  # same snapshot folder as browser.json
    return config.parent


def routes(model_id: str, revision: str | None = None) -> list:
    """Starlette mounts for the page, ONNX Runtime Web and the model's ONNX files (the most specific
    first). Missing pieces (npm not installed, no ONNX export) leave the page up; it then says what is
    missing."""
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    out = []
    if ORT_DIST.is_dir():
        out.append(Mount("/private/ort", app=WithHeaders(StaticFiles(directory=ORT_DIST))))
    folder = onnx_folder(model_id, revision)
    if folder is not None:
        # a Hub model's files are symlinks into the cache's blobs/: follow them
        out.append(Mount("/private/model", app=WithHeaders(StaticFiles(directory=folder, follow_symlink=True))))
    out.append(Mount("/private", app=WithHeaders(StaticFiles(directory=PAGE, html=True))))
    return out
