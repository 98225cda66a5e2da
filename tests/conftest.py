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
    from loadtests.servers import start_bentoml

    server = start_bentoml(str(tiny_onnx_model),
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


def write_attribute_dataset(catalog: Path, out: Path, per_label: int = 16,
                            val_every: int = 4) -> Path:
    """An export-shaped dataset (train/ and val/ ImageFolders + manifest.csv with an
    attr_colour column) from the demo photos and their shipped colours (demo_data/colours.json:
    'unknown' where a photo has none), as `collector export` writes it after a crawl."""
    import csv
    import json
    import shutil

    colours = json.loads((catalog.parent / "colours.json").read_text())
    rows = []
    for folder in sorted(p for p in catalog.iterdir() if p.is_dir()):
        for n, photo in enumerate(sorted(folder.glob("*.jpg"))[:per_label]):
            split = "val" if n % val_every == 0 else "train"
            relative = f"{split}/{folder.name}/{photo.name}"
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(photo, out / relative)
            rows.append({"split": split, "label": folder.name, "file": relative,
                         "attr_colour": colours.get(f"{folder.name}/{photo.name}", "unknown")})
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


@pytest.fixture(scope="session")
def attribute_export(tmp_path_factory) -> Path:
    """A real multi-head model: `trainer train` (head only, 128 px) on 160 demo photos whose
    manifest.csv has a colour per photo, the attribute heads, then `trainer export` (parity per
    head). Returns the exported model.onnx; its run folder is two levels up."""
    from trainer.attributes import fit_attributes
    from trainer.config import TrainConfig
    from trainer.export import export
    from trainer.train import train

    root = tmp_path_factory.mktemp("attributes")
    data = write_attribute_dataset(DEMO_CATALOG, root / "data")
    run = root / "run"
    train(TrainConfig(data=data, out=run, epochs=0, head_epochs=8, image_size=128))
    fit_attributes(run)
    return export(run, save=False).onnx_path
