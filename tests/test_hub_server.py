"""Round-trips through the real Hugging Face clients against the local Hub emulator (tests/hub_server.py).

The real Hub is unreachable from the test machines, so these tests prove that the emulator speaks enough
of the Hub HTTP API for ``huggingface_hub``, ``datasets`` and ``transformers`` to work unmodified. Client
code runs in subprocesses (``HF_ENDPOINT`` is read at import time) with a fresh ``HF_HOME`` each, so a
download can only succeed if the bytes really went through the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import hub_env, run_python_json, start_hub_server  # noqa: E402

TOKEN = "hf_test_token"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with start_hub_server(tmp_path_factory.mktemp("hub_storage")) as server:
        yield server


def client(code: str, env: dict, **params) -> dict:
    """Run client ``code`` (which ends by printing JSON) in a subprocess; ``P`` holds ``params``."""
    return run_python_json(f"import json\nP = json.loads({json.dumps(json.dumps(params))})\n{code}", env,
                           timeout=240)


def test_upload_folder_and_download_bytes_identical(hub, tmp_path):
    folder = tmp_path / "upload"
    folder.mkdir()
    big = os.urandom(11 * 1024 * 1024)  # > 10 MB binary => LFS
    (folder / "big.bin").write_bytes(big)
    (folder / "notes").mkdir()
    (folder / "notes" / "readme.txt").write_text("small text file\n")

    up = client("""
from huggingface_hub import HfApi
api = HfApi()
api.create_repo(P["repo"], repo_type="dataset")
info = api.upload_folder(folder_path=P["folder"], repo_id=P["repo"], repo_type="dataset")
print(json.dumps({"oid": info.oid, "files": api.list_repo_files(P["repo"], repo_type="dataset")}))
""", hub_env(hub, tmp_path / "uploader"), repo="test-user/roundtrip", folder=str(folder))
    assert sorted(up["files"]) == [".gitattributes", "big.bin", "notes/readme.txt"]

    down = client("""
from huggingface_hub import HfApi, hf_hub_download
api = HfApi()
paths = {f: hf_hub_download(P["repo"], f, repo_type="dataset") for f in ["big.bin", "notes/readme.txt"]}
print(json.dumps({"paths": paths, "sha": api.dataset_info(P["repo"]).sha}))
""", hub_env(hub, tmp_path / "downloader", token=None), repo="test-user/roundtrip")  # anonymous read
    assert down["sha"] == up["oid"]
    assert Path(down["paths"]["big.bin"]).read_bytes() == big
    assert Path(down["paths"]["notes/readme.txt"]).read_text() == "small text file\n"
    # The big file really took the Git LFS path (batch + PUT), not the inline base64 path.
    requests = [(m, p.split("?")[0]) for m, p, _ in hub.requests]
    assert ("POST", "/datasets/test-user/roundtrip.git/info/lfs/objects/batch") in requests
    assert ("PUT", f"/_lfs/{hashlib.sha256(big).hexdigest()}") in requests


def test_datasets_push_to_hub_and_load_dataset(hub, tmp_path):
    rows = client("""
import hashlib, numpy as np
from PIL import Image
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image as ImageFeature, Value
rng = np.random.default_rng(0)
features = Features({"image": ImageFeature(), "label": ClassLabel(names=["normal", "pneumonia"]),
                     "patient": Value("string")})
def split(n, offset):
    return Dataset.from_dict({"image": [Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8))
                                        for _ in range(n)],
                              "label": [i % 2 for i in range(n)],
                              "patient": [f"p{offset + i}" for i in range(n)]}, features=features)
dd = DatasetDict({"train": split(4, 0), "test": split(2, 100)})
dd.push_to_hub(P["repo"], token=P["token"])
def digest(d):
    return {s: [[hashlib.sha256(np.asarray(r["image"]).tobytes()).hexdigest(), r["label"], r["patient"]]
                for r in d[s]] for s in d}
print(json.dumps({"rows": digest(dd), "names": dd["train"].features["label"].names}))
""", hub_env(hub, tmp_path / "pusher"), repo="test-user/cxr-mini", token=TOKEN)

    loaded = client("""
import hashlib, numpy as np
from datasets import load_dataset
from huggingface_hub import HfApi, hf_hub_download
dd = load_dataset(P["repo"])
readme = open(hf_hub_download(P["repo"], "README.md", repo_type="dataset")).read()
files = HfApi().list_repo_files(P["repo"], repo_type="dataset")
print(json.dumps({"rows": {s: [[hashlib.sha256(np.asarray(r["image"]).tobytes()).hexdigest(), r["label"],
                                r["patient"]] for r in dd[s]] for s in dd},
                  "names": dd["train"].features["label"].names, "readme": readme, "files": files,
                  "image_type": type(dd["train"].features["image"]).__name__}))
""", hub_env(hub, tmp_path / "loader"), repo="test-user/cxr-mini")
    assert loaded["rows"] == rows["rows"]
    assert loaded["names"] == ["normal", "pneumonia"] and loaded["image_type"] == "Image"
    assert "dataset_info:" in loaded["readme"] and "configs:" in loaded["readme"]
    assert any(f.startswith("data/train-") and f.endswith(".parquet") for f in loaded["files"])


def test_transformers_push_to_hub_and_from_pretrained(hub, tmp_path):
    common = """
import torch
torch.manual_seed(0)
pixels = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
"""
    pushed = client(common + """
from transformers import ViTConfig, ViTForImageClassification
config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                   image_size=32, patch_size=8, num_labels=3)
model = ViTForImageClassification(config).eval()
model.push_to_hub(P["repo"], token=P["token"])
with torch.no_grad():
    print(json.dumps(model(pixel_values=pixels).logits.tolist()))
""", hub_env(hub, tmp_path / "pusher"), repo="test-user/tiny-vit", token=TOKEN)

    loaded = client(common + """
from transformers import ViTForImageClassification
from huggingface_hub import HfApi
model = ViTForImageClassification.from_pretrained(P["repo"]).eval()
with torch.no_grad():
    logits = model(pixel_values=pixels).logits.tolist()
print(json.dumps({"logits": logits, "files": HfApi().list_repo_files(P["repo"])}))
""", hub_env(hub, tmp_path / "loader"), repo="test-user/tiny-vit")
    assert loaded["logits"] == pushed
    assert {"config.json", "model.safetensors", "README.md"} <= set(loaded["files"])


def test_create_commit_with_create_pr_opens_pull_request(hub, tmp_path):
    out = client("""
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
api = HfApi()
repo = P["repo"]
api.create_repo(repo, repo_type="dataset")
base = api.upload_file(path_or_fileobj=b"v1", path_in_repo="labels.csv", repo_id=repo, repo_type="dataset")
pr = api.create_commit(repo, repo_type="dataset", create_pr=True, commit_message="Relabel studies",
                       commit_description=P["description"],
                       operations=[CommitOperationAdd("labels.csv", b"v2"), CommitOperationAdd("new.txt", b"n")])
refs = api.list_repo_refs(repo, repo_type="dataset", include_pull_requests=True)
discussions = list(api.get_repo_discussions(repo, repo_type="dataset"))
details = api.get_discussion_details(repo, pr.pr_num, repo_type="dataset")
read = lambda rev: open(hf_hub_download(repo, "labels.csv", repo_type="dataset", revision=rev)).read()
print(json.dumps({
    "pr_url": pr.pr_url, "pr_revision": pr.pr_revision, "pr_num": pr.pr_num, "oid": pr.oid,
    "main_sha": api.dataset_info(repo).sha, "base_oid": base.oid,
    "main_content": read("main"), "pr_content": read(pr.pr_revision),
    "main_files": api.list_repo_files(repo, repo_type="dataset"),
    "pr_files": api.list_repo_files(repo, repo_type="dataset", revision=pr.pr_revision),
    "pr_refs": [(r.ref, r.target_commit) for r in refs.pull_requests],
    "discussions": [(d.num, d.title, d.is_pull_request, d.status) for d in discussions],
    "first_comment": details.events[0].content, "target_branch": details.target_branch,
    "pr_commit_title": api.list_repo_commits(repo, repo_type="dataset", revision=pr.pr_revision)[0].title,
}))
""", hub_env(hub, tmp_path), repo="test-user/pr-target", description="Fix 3 mislabeled studies.")
    assert out["pr_num"] == 1 and out["pr_revision"] == "refs/pr/1"
    assert out["pr_url"].endswith("/datasets/test-user/pr-target/discussions/1")
    assert out["main_sha"] == out["base_oid"] != out["oid"]  # main unchanged
    assert (out["main_content"], out["pr_content"]) == ("v1", "v2")
    assert "new.txt" not in out["main_files"] and "new.txt" in out["pr_files"]
    assert out["pr_refs"] == [["refs/pr/1", out["oid"]]]
    assert out["discussions"] == [[1, "Relabel studies", True, "open"]]
    assert out["first_comment"] == "Fix 3 mislabeled studies."
    assert out["target_branch"] == "refs/heads/main" and out["pr_commit_title"] == "Relabel studies"


def test_upload_folder_to_gradio_space(hub, tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text("import gradio as gr\ngr.Interface(lambda x: x, 'text', 'text').launch()\n")
    (app / "requirements.txt").write_text("gradio\n")
    (app / "README.md").write_text("---\ntitle: CXR demo\nsdk: gradio\napp_file: app.py\n---\n# Demo\n")
    out = client("""
from huggingface_hub import HfApi
api = HfApi()
url = api.create_repo(P["repo"], repo_type="space", space_sdk="gradio")
api.upload_folder(folder_path=P["folder"], repo_id=P["repo"], repo_type="space")
info = api.space_info(P["repo"])
print(json.dumps({"url": url, "repo_type": url.repo_type, "sdk": info.sdk,
                  "files": api.list_repo_files(P["repo"], repo_type="space")}))
""", hub_env(hub, tmp_path / "client"), repo="test-user/cxr-demo", folder=str(app))
    assert out["repo_type"] == "space" and out["url"] == f"{hub.url}/spaces/test-user/cxr-demo"
    assert out["sdk"] == "gradio"
    assert {"app.py", "requirements.txt", "README.md"} <= set(out["files"])


def test_writes_without_token_are_refused(hub, tmp_path):
    # Raw HTTP: a write without Authorization is refused, the same request with a token succeeds.
    body = json.dumps({"name": "guarded", "organization": "test-user", "type": "model"}).encode()
    def create(headers: dict) -> int:
        request = urllib.request.Request(f"{hub.url}/api/repos/create", data=body, method="POST",
                                         headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(request) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code
    assert create({}) == 401
    assert create({"Authorization": f"Bearer {TOKEN}"}) == 200

    # Real client, anonymous: reads work, writes raise HfHubHTTPError 401.
    out = client("""
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
api = HfApi()
statuses = {}
for name, call in {
    "create_repo": lambda: api.create_repo("test-user/anonymous"),
    "upload_file": lambda: api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=P["repo"]),
    "create_pr": lambda: api.create_pull_request(P["repo"], title="anonymous PR"),
}.items():
    try:
        call()
        statuses[name] = "accepted"
    except HfHubHTTPError as err:
        statuses[name] = err.response.status_code
statuses["read"] = open(hf_hub_download(P["repo"], ".gitattributes")).read().startswith("*")
print(json.dumps(statuses))
""", hub_env(hub, tmp_path, token=None), repo="test-user/guarded")
    assert out == {"create_repo": 401, "upload_file": 401, "create_pr": 401, "read": True}
    assert ("POST", "/api/models/test-user/guarded/preupload/main", 401) in hub.requests
