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


@pytest.fixture(scope="session")
def tiny_onnx_model(tmp_path_factory) -> Path:
    from tests.service.conftest import build_tiny_cnn, tiny_contract

    return build_tiny_cnn(tmp_path_factory.mktemp("lt-model") / "tiny.onnx", tiny_contract())


@pytest.fixture(scope="session")
def tiny_service(tiny_onnx_model, tmp_path_factory):
    """The real service (`bentoml serve service.service:ProductClassifier`) on the tiny model."""
    from loadtests.servers import free_port, start_bentoml

    server = start_bentoml(str(tiny_onnx_model), free_port(),
                           settings={"CLASSIFIER_ORT_THREADS": "1"},
                           log_dir=tmp_path_factory.mktemp("lt-serve"))
    with server:
        yield server


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A real trainer run folder (head-only, a few images): checkpoint for the baseline app."""
    from trainer.config import TrainConfig
    from trainer.train import train

    out = tmp_path_factory.mktemp("lt-run") / "run"
    train(TrainConfig(data=DEMO_CATALOG, out=out, epochs=0, head_epochs=2, max_train_images=50,
                      max_val_images=10))
    return out
