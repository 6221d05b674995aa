"""Deploy the Space: upload the app, the ``modeling`` library and the model to a Hub Space repo.

    cxr-deploy --repo ORG/cxr-pneumonia-triage                       # bundles space/model
    cxr-deploy --repo ORG/cxr-pneumonia-triage --model-id ORG/model   # model from the Hub
    cxr-deploy --repo ORG/cxr-pneumonia-private --private-page        # the private page alone, a static Space

The Space repo keeps the project's package layout: ``app.py`` at its root (what Spaces run) is a
two-line launcher of ``space.app``; beside it the ``space/`` package (its modules, ``examples/`` and,
when bundled, ``model/``), the ``modeling/`` package, ``README.md`` (the Space's YAML) and
``requirements.txt``. The same relative imports therefore work in the repository and on the Space.
One commit; files of an earlier deployment that are no longer part of it are deleted in the same
commit.

``--private-page`` publishes the private page (``/private/`` of the Space: the model runs in the
visitor's browser) as a static Space: the page's files at the root, ONNX Runtime Web's files under
``ort/`` and the model's ``onnx/`` folder under ``model/``, the same relative layout the Space serves.
Its Content-Security-Policy is in the page itself (a ``<meta>``: a static Space sets no such header);
the cross-origin isolation headers (WebAssembly threads) are set by the Space's ``custom_headers``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".DS_Store", "data", "model", "node_modules")
# What the private page needs of the onnxruntime-web npm package (its dist/ is ~150 MB with every
# backend; the page uses the WebAssembly one)
ORT_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs")
LAUNCHER = '''"""Hugging Face Space entry point: the app is the ``space`` package beside this file."""

from space.app import main

main()
'''


def stage(dest: Path, model_dir: Path | None) -> Path:
    """Lay out the Space repo in ``dest`` (see module docstring)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "app.py").write_text(LAUNCHER)
    for name in ("README.md", "requirements.txt"):
        shutil.copy2(HERE / name, dest / name)
    shutil.copytree(HERE, dest / "space", ignore=IGNORE)
    for name in ("README.md", "requirements.txt"):
        (dest / "space" / name).unlink(missing_ok=True)
    shutil.copytree(ROOT / "modeling", dest / "modeling", ignore=IGNORE)
    from .private_mode import ORT_DIST

    if ORT_DIST.is_dir():
        ort = dest / ORT_DIST.relative_to(ROOT)
        ort.mkdir(parents=True)
        for name in ORT_FILES:
            shutil.copy2(ORT_DIST / name, ort / name)
    if model_dir is not None:
        if not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a saved model (no config.json)")
        shutil.copytree(model_dir, dest / "space" / "model", ignore=shutil.ignore_patterns("__pycache__", "eval"))
    return dest


STATIC_README = """---
title: Pediatric Chest X-ray Pneumonia Triage, private mode
emoji: 🫁
colorFrom: green
colorTo: blue
sdk: static
app_file: index.html
pinned: false
license: apache-2.0
short_description: The model runs in your browser; your film never leaves it
custom_headers:
  cross-origin-embedder-policy: require-corp
  cross-origin-opener-policy: same-origin
  cross-origin-resource-policy: same-origin
tags:
  - medical-imaging
  - chest-x-ray
  - onnx
---

The pediatric chest X-ray pneumonia triage model of cxr-pneumonia, run in your browser with ONNX Runtime
Web: the film you choose is read and analysed on your device and never sent anywhere. Research and
education only, not a medical device.
"""


def stage_private_page(dest: Path, model_dir: Path) -> Path:
    """Lay out the static private-page Space in ``dest`` (see the module docstring)."""
    from .private_mode import ORT_DIST, PAGE

    onnx = Path(model_dir) / "onnx"
    if not (onnx / "browser.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no onnx/ export: run cxr-export --model {model_dir} --onnx ...")
    if not ORT_DIST.is_dir():
        raise FileNotFoundError("onnxruntime-web is not installed: bash scripts/dev.sh setup (npm ci in space/private)")
    shutil.copytree(PAGE, dest)
    (dest / "README.md").write_text(STATIC_README)
    (dest / "ort").mkdir()
    for name in ORT_FILES:
        shutil.copy2(ORT_DIST / name, dest / "ort" / name)
    shutil.copytree(onnx, dest / "model", ignore=shutil.ignore_patterns(".*"))
    return dest


def deploy_private_page(repo_id: str, *, model_dir: str | Path = HERE / "model", token: str | None = None,
                        private: bool = False) -> str:
    """Create (if needed) and update the static private-page Space; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="space", space_sdk="static", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = stage_private_page(Path(tmp) / "page", Path(model_dir))
        info = api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=folder, delete_patterns="*",
                                 commit_message="Deploy the cxr-pneumonia private page (static)")
    return str(info)


def deploy(repo_id: str, *, model_dir: str | Path | None = HERE / "model", model_id: str | None = None,
           token: str | None = None, private: bool = False) -> str:
    """Create (if needed) and update the Space; returns the commit URL."""
    from huggingface_hub import HfApi

    if model_id:
        model_dir = None
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = stage(Path(tmp) / "space", Path(model_dir) if model_dir else None)
        info = api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=folder, delete_patterns="*",
                                 commit_message="Deploy cxr-pneumonia Space"
                                 + (f" (model {model_id})" if model_id else " (bundled model)"))
    if model_id:
        api.add_space_variable(repo_id, "MODEL_ID", model_id, description="Hub id of the classifier")
    return str(info)


def main(argv: list[str] | None = None) -> int:
    from modeling.cli import add_flag, parse

    ap = argparse.ArgumentParser(prog="cxr-deploy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True, help="Space repo id, e.g. ORG/cxr-pneumonia-triage")
    g = ap.add_mutually_exclusive_group()
    add_flag(g, "--model", old=("--model-dir",), default=str(HERE / "model"),
             help="model folder to bundle (default space/model)")
    g.add_argument("--model-id", default=None, help="use this Hub model instead of bundling one")
    ap.add_argument("--private", action="store_true")
    ap.add_argument("--private-page", action="store_true",
                    help="publish the private page alone (the model in the visitor's browser) as a static Space")
    ap.add_argument("--token", default=None, help="write token (default: HF_TOKEN / the stored login)")
    args = parse(ap, argv)
    if args.private_page:
        url = deploy_private_page(args.repo, model_dir=args.model, token=args.token, private=args.private)
    else:
        url = deploy(args.repo, model_dir=args.model, model_id=args.model_id, token=args.token, private=args.private)
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
