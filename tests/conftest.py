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
