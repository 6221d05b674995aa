"""Shared fixtures. Tests never reach the real Hub: HF_HUB_OFFLINE=1 for in-process code, and Hub
round trips run real clients in subprocesses against tests/hub_server.py (see `hub`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not found: the shared datasets/models live beside the checkout (../shared)")
    return p


@pytest.fixture
def hub(tmp_path):
    """A running local Hub-compatible server (tests/hub_server.py) and the env for client subprocesses."""
    from hub_server import hub_env, start_hub_server

    with start_hub_server(tmp_path / "hub-storage") as server:
        yield server, hub_env(server, tmp_path / "client")


@pytest.fixture(scope="session")
def real_dataset(tmp_path_factory):
    """The merged dataset built from the real shared sources, once per test session (~90 s):
    (directory, build report, Kermany root). Skips when ../shared is absent."""
    from dataset_scripts.build import BuildConfig, build

    kermany = shared_path("data", "kermany")
    skytells = shared_path("data", "skytells-covid19-xray")
    out = tmp_path_factory.mktemp("real") / "ds"
    cfg = BuildConfig(sources=[f"kermany:{kermany}", f"folders:{skytells}"], out=out, exclude=["TrainData/*"],
                      cache_dir=tmp_path_factory.mktemp("cache"), progress=False)
    result = build(cfg)
    return out, result.report, kermany
