"""Trainer fixtures: small real-photo ImageFolders, one tiny trained run and its one int8 export,
shared by tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# Four labels that look unlike each other, 10 photos each, from the shipped CC0 catalog.
TINY_LABELS = ("hat", "pants", "shoes", "t-shirt")
TINY_PER_LABEL = 10

# Small and fast: 64 px, a few steps. Real photos, real model, real files.
# Selection on validation (epochs picked by it); tests/trainer/test_trainer_selection.py
# covers the cross-validated default that such a small validation split gets.
TINY_TRAIN = {"image_size": 64, "batch_size": 8, "epochs": 2, "head_epochs": 5,
              "max_steps_per_epoch": 2, "eval_batch_size": 32, "threads": 2, "selection": "val"}


def copy_tiny_folder(catalog: Path, target: Path, per_label: int = TINY_PER_LABEL) -> Path:
    for label in TINY_LABELS:
        (target / label).mkdir(parents=True)
        for photo in sorted((catalog / label).iterdir())[:per_label]:
            shutil.copyfile(photo, target / label / photo.name)
    return target


@pytest.fixture(scope="session")
def tiny_train() -> dict:
    """TrainConfig knobs for a tiny, fast, real training run."""
    return dict(TINY_TRAIN)


@pytest.fixture(scope="session")
def tiny_folder(demo_catalog, tmp_path_factory) -> Path:
    """DIR/<label>/*.jpg without split folders (validation is held out by the trainer)."""
    return copy_tiny_folder(demo_catalog, tmp_path_factory.mktemp("tiny") / "photos")


@pytest.fixture(scope="session")
def tiny_run(tiny_folder, tmp_path_factory) -> Path:
    """One tiny trained run folder (head phase + 2 short fine-tuning epochs), evaluated."""
    from trainer.config import TrainConfig
    from trainer.evaluate import evaluate
    from trainer.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(TrainConfig(data=tiny_folder, out=out, **TINY_TRAIN))
    evaluate(out)
    return out


@pytest.fixture(scope="session")
def int8_export(tiny_run):
    """`trainer export --int8 --flip-tta` of the tiny run into the test session's model store as
    `trainer-test-model`, and what it printed. The export and accuracy-gate tests share it: one
    export with every variant gated takes 20-30 s here."""
    import io

    from rich.console import Console

    from trainer.export import export

    output = io.StringIO()
    result = export(tiny_run, int8=True, name="trainer-test-model", flip_tta=True,
                    console=Console(file=output, width=200))
    return result, output.getvalue()
