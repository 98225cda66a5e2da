"""A tree shaped like clothing-small, for the benchmarks that draw subsets of it."""

from __future__ import annotations

import pytest

from benchmarks.bench_train import DEMO_CATALOG

VALIDATION_PHOTOS = 14


@pytest.fixture
def clothing_small_shaped(tmp_path):
    """4 demo labels (real photos): 16 under train/<label>/, 14 under validation/<label>/."""
    root = tmp_path / "source"
    for folder in sorted(p for p in DEMO_CATALOG.iterdir() if p.is_dir())[:4]:
        photos = sorted(folder.glob("*.jpg"))
        for split, chosen in (("train", photos[VALIDATION_PHOTOS:]),
                              ("validation", photos[:VALIDATION_PHOTOS])):
            (root / split / folder.name).mkdir(parents=True)
            for photo in chosen:
                (root / split / folder.name / photo.name).symlink_to(photo)
    return root
