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


# ---- markers: `pytest` alone runs the fast subset (pyproject: -m 'not slow and not real_data and not
# browser'); `bash scripts/dev.sh test` (CI) runs everything with -m "". ------------------------------
SLOW_MODULES = {"test_train", "test_train_real", "test_build_real", "test_recipes", "test_space_hardening_app",
                "test_space_hub", "test_dataset_hub", "test_hub_server", "test_release"}
SLOW_FIXTURES = {"app", "hub", "dinov2_run", "real_dataset"}


def pytest_collection_modifyitems(config, items):
    """Mark tests by what they need: ../shared (real_data), a browser, or minutes (slow: training,
    running apps, Hub round trips, subprocess fan-outs)."""
    import inspect

    for item in items:
        try:
            source = inspect.getsource(item.function)
        except (OSError, TypeError):
            source = ""
        names = set(getattr(item, "fixturenames", ()))
        if "real_dataset" in names or "shared_path(" in source or "SHARED" in source:
            item.add_marker(pytest.mark.real_data)
        if "CHROMIUM" in source:
            item.add_marker(pytest.mark.browser)
        if item.module.__name__ in SLOW_MODULES or names & SLOW_FIXTURES or "subprocess" in source:
            item.add_marker(pytest.mark.slow)
