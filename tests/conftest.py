"""Fixtures every area shares. Area fixtures live in tests/<area>/conftest.py.

Test files are named test_<area>_*.py so that names stay unique across folders.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_CATALOG = REPO / "demo_data" / "catalog"           # 300 CC0 photos, 10 labels, shipped
SHARED_DATASET = REPO.parent / "shared" / "datasets" / "clothing-small"  # CI has it beside us


def pytest_configure(config: pytest.Config) -> None:
    # Never touch the user's ~/bentoml: every test session gets its own model store.
    os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="bentoml-home-")
    os.environ["BENTOML_DO_NOT_TRACK"] = "True"


@pytest.fixture(scope="session")
def demo_catalog() -> Path:
    return DEMO_CATALOG


@pytest.fixture(scope="session")
def shared_dataset() -> Path:
    if not SHARED_DATASET.is_dir():
        pytest.skip(f"{SHARED_DATASET} is not here (CI has it beside the clone)")
    return SHARED_DATASET
