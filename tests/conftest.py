"""Shared fixtures: a fresh lake per test, the reference data folder, a Prefect test server."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import apply_process_defaults

apply_process_defaults()

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
ELASTIC_2015 = SHARED_DATA / "elastic_tensor_2015.json.gz"
MP_BINARY = SHARED_DATA / "mp-binary-elasticity-2025.1-train.json.gz"


@pytest.fixture
def lake(tmp_path):
    """An empty lake in a temporary folder."""
    from storage import Lake

    return Lake(tmp_path / "lake")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The reference data folder beside the repo (CI always has it)."""
    if not ELASTIC_2015.exists() or not MP_BINARY.exists():
        pytest.fail(f"reference data missing under {SHARED_DATA}: the tests read ../shared/data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prefect_server():
    """A throwaway Prefect API (ephemeral server, temporary database) for tests that run flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
