"""Publish a built dataset with the real clients (`datasets`, `huggingface_hub`) to the local
Hub-compatible server, then load it back by repo id from a fresh cache."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT
from hub_server import run_python_json
from synthetic import make_mini_sources


def test_push_to_hub_and_load_dataset_round_trip(hub, tmp_path):
    server, env = hub
    src = make_mini_sources(tmp_path / "src")
    out = tmp_path / "ds"
    proc = subprocess.run(
        [sys.executable, "-m", "dataset_scripts.build", "--source", f"kermany:{src / 'kermany'}",
         "--source", f"folders:{src / 'other'}", "--output-dir", str(out), "--val-fraction", "0.25",
         "--no-cache", "--workers", "1", "--no-progress", "--push-to-hub", "test-user/cxr-mini"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"pushed to {server.url}/datasets/test-user/cxr-mini" in proc.stdout

    # A different client cache: the bytes must come over HTTP from the server.
    env2 = {**env, "HF_HOME": str(tmp_path / "fresh-home")}
    got = run_python_json(f"""
import hashlib, json
from datasets import load_dataset, load_from_disk
from huggingface_hub import hf_hub_download, list_repo_files
hub = load_dataset("test-user/cxr-mini")
local = load_from_disk({str(out)!r})
def rows(d):
    return sorted((r["source_path"], r["label"], r["patient_id"],
                   hashlib.sha256(r["image"].tobytes()).hexdigest()) for r in d)
card = open(hf_hub_download("test-user/cxr-mini", "README.md", repo_type="dataset")).read()
report = json.load(open(hf_hub_download("test-user/cxr-mini", "build_report.json", repo_type="dataset")))
print(json.dumps({{
    "splits": sorted(hub), "equal": {{s: rows(hub[s]) == rows(local[s]) for s in local}},
    "names": hub["train"].features["label"].names, "n": {{s: len(hub[s]) for s in hub}},
    "card_has_body": "## Leak check" in card, "card_has_info": "dataset_info:" in card and "configs:" in card,
    "card_license": "license: other" in card, "report_leak": report["leak_check"]["passed"],
    "files": sorted(list_repo_files("test-user/cxr-mini", repo_type="dataset")),
}}))
""", env2)
    assert got["splits"] == ["test", "train", "validation"]
    assert got["equal"] == {"train": True, "validation": True, "test": True}
    assert got["names"] == ["normal", "bacterial_pneumonia", "viral_pneumonia"]
    assert got["n"]["test"] == 4 and got["n"]["train"] + got["n"]["validation"] == 22
    assert got["card_has_body"] and got["card_has_info"] and got["card_license"] and got["report_leak"]
    assert "build_report.json" in got["files"] and any(f.endswith(".parquet") for f in got["files"])
