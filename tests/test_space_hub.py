"""Space deployment and feedback sync with the real huggingface_hub client against the local
Hub-compatible server (tests/hub_server.py)."""

from __future__ import annotations

import json

from conftest import ROOT
from hub_server import run_python_json
from tiny_models import save_tiny_classifier


def test_deploy_bundled_model_then_hub_model(hub, tmp_path) -> None:
    server, env = hub
    model = save_tiny_classifier(tmp_path / "model")
    got = run_python_json(f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from huggingface_hub import HfApi, hf_hub_download
from space.deploy import deploy
api = HfApi()
deploy("test-user/cxr-space", model_dir={str(model)!r})
first = sorted(api.list_repo_files("test-user/cxr-space", repo_type="space"))
readme = open(hf_hub_download("test-user/cxr-space", "README.md", repo_type="space")).read()
info = api.repo_info("test-user/cxr-space", repo_type="space")
deploy("test-user/cxr-space", model_id="org/released-model")
second = sorted(api.list_repo_files("test-user/cxr-space", repo_type="space"))
variables = {{k: v.value for k, v in api.get_space_variables("test-user/cxr-space").items()}}
print(json.dumps({{"first": first, "second": second, "sdk": info.sdk, "yaml": readme.startswith("---"),
                  "variables": variables}}))
""", env)
    first, second = got["first"], got["second"]
    for f in ("app.py", "space/app.py", "space/service.py", "space/store.py", "space/sync.py", "space/files.py",
              "space/access.py", "space/__init__.py", "README.md", "requirements.txt", "modeling/predict.py",
              "modeling/gradcam.py", "space/model/config.json", "space/model/model.safetensors",
              "space/model/preprocessor_config.json"):
        assert f in first, f
    assert got["sdk"] == "gradio" and got["yaml"]
    assert not any("__pycache__" in f for f in first)
    # redeploy with a Hub model: the bundled model is removed in the same commit, MODEL_ID is set
    assert not any(f.startswith("space/model/") for f in second) and "app.py" in second
    assert got["variables"] == {"MODEL_ID": "org/released-model"}


def test_deployed_layout_runs(tmp_path) -> None:
    """The deployed layout imports and builds its app with nothing of the repository on the path (app.py
    launcher at the root, the space and modeling packages beside it)."""
    import subprocess
    import sys

    from space.deploy import stage

    model = save_tiny_classifier(tmp_path / "model-src")
    folder = stage(tmp_path / "space", model)
    code = ("import json; import space.app as app; cfg = app.AppConfig.from_env(); svc = app.make_service(cfg); "
            "demo = app.build_app(svc, cfg); print(json.dumps({'model': svc.predictor.model_id, "
            "'n_fns': len(demo.fns)}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "CXR_DATA_DIR": str(tmp_path / "d"),
                              "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["model"] == "bundled:space/model" and res["n_fns"] >= 8


def test_feedback_sync_pushes_manifest_folder(hub, tmp_path) -> None:
    server, env = hub
    got = run_python_json(f"""
import io, json, sys
sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})
from huggingface_hub import HfApi, hf_hub_download
from synthetic import xray_like
from space.store import FeedbackStore, PredictionRecord
from space.sync import start_feedback_sync
from modeling.image_io import pixel_sha256
store = FeedbackStore({str(tmp_path / 'data')!r})
img = xray_like(5, (128, 128))
sha = pixel_sha256(img)
pid = store.record_prediction(PredictionRecord("m", "r", sha, 128, 128,
    {{"normal": 0.2, "bacterial_pneumonia": 0.5, "viral_pneumonia": 0.3}}, 0.8, "bacterial_pneumonia",
    "pneumonia", 0.3))
store.add_feedback(pid, "viral_pneumonia", role="radiologist", image=img)
scheduler = start_feedback_sync(store, "test-user/cxr-feedback", every_minutes=60)
scheduler.trigger().result()
files = sorted(HfApi().list_repo_files("test-user/cxr-feedback", repo_type="dataset"))
manifest = open(hf_hub_download("test-user/cxr-feedback", "feedback/manifest.csv", repo_type="dataset")).read()
scheduler.stop()
print(json.dumps({{"files": files, "manifest": manifest, "sha": sha}}))
""", env)
    assert f"feedback/images/{got['sha']}.png" in got["files"] and "feedback/manifest.csv" in got["files"]
    assert f"images/{got['sha']}.png,viral_pneumonia" in got["manifest"]


def test_the_private_page_deploys_as_a_static_space(hub, tmp_path) -> None:
    import pytest

    from modeling.onnx_export import export_onnx
    from space.private_mode import ORT_DIST
    from synthetic import xray_like

    if not ORT_DIST.is_dir():
        pytest.skip("onnxruntime-web is not installed (bash scripts/dev.sh setup)")
    server, env = hub
    model = save_tiny_classifier(tmp_path / "model", image_size=28)
    export_onnx(model, check_images=[xray_like(0, (60, 50))])
    got = run_python_json(f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from huggingface_hub import HfApi, hf_hub_download
from space.deploy import deploy_private_page
api = HfApi()
deploy_private_page("test-user/cxr-private", model_dir={str(model)!r})
files = sorted(api.list_repo_files("test-user/cxr-private", repo_type="space"))
readme = open(hf_hub_download("test-user/cxr-private", "README.md", repo_type="space")).read()
page = open(hf_hub_download("test-user/cxr-private", "index.html", repo_type="space")).read()
print(json.dumps({{"files": files, "sdk": api.repo_info("test-user/cxr-private", repo_type="space").sdk,
                  "readme": readme, "page": page}}))
""", env)
    for f in ("index.html", "app.mjs", "pixels.mjs", "style.css", "ort/ort.wasm.min.js", "ort/ort-wasm-simd-threaded.wasm",
              "model/browser.json", "model/model.onnx", "model/model_quantized.onnx", "README.md"):
        assert f in got["files"], f
    assert not any("node_modules" in f or f.endswith(".py") for f in got["files"])
    assert got["sdk"] == "static" and "cross-origin-embedder-policy: require-corp" in got["readme"]
    assert "connect-src 'self'" in got["page"]  # the page carries its own content policy
