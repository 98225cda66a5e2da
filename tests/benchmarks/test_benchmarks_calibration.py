"""bench_calibration on a 3 x 8 subset of real photos: the probe's out-of-fold temperature,
carried to its refit, scored on the held-out photos of the subset."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from benchmarks.bench_calibration import BenchCalibration, one_set, run_bench
from benchmarks.bench_train import SUBSET_VAL_PER_LABEL, heldout_folder, make_subset

TINY = {"head_epochs": 3, "image_size": 64}


def test_the_refit_probe_is_scored_with_the_temperature_as_fitted_and_carried(
        tmp_path, clothing_small_shaped):
    subset = make_subset(clothing_small_shaped, tmp_path / "3x8-seed0", 3, 8, seed=0)
    bench = BenchCalibration(data=clothing_small_shaped, out=tmp_path / "bench", overrides=TINY)
    row = one_set(subset, bench, Console(file=io.StringIO()))
    assert row["train_val_photos"] == 3 * (8 + SUBSET_VAL_PER_LABEL)
    assert row["heldout_photos"] == len(list(heldout_folder(subset).glob("*/*.jpg"))) > 0
    assert row["refit_logit_scale"] > 0 and row["temperature_out_of_fold"] > 0
    for key in ("heldout_ece_uncalibrated", "heldout_ece_out_of_fold_t",
                "heldout_ece_carried_t", "heldout_ece_floor", "heldout_acc"):
        assert 0 <= row[key] <= 1
    if row["refit_logit_scale"] == pytest.approx(1.0, abs=1e-4):
        assert row["heldout_ece_carried_t"] == row["heldout_ece_out_of_fold_t"]


def test_the_bench_writes_and_prints_both_temperatures(tmp_path, clothing_small_shaped, capsys):
    # On the 4-label tree a "3x80" draw takes every train photo of 3 labels (16 each).
    bench = BenchCalibration(data=clothing_small_shaped, out=tmp_path / "bench", sets=["3x80"],
                             seeds=1, overrides=TINY)
    rows = run_bench(bench)["rows"]
    assert [(r["set"], r["seed"]) for r in rows] == [("3x80", 0)]
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["rows"] == rows
    printed = capsys.readouterr().out
    for what in ("as fitted", "carried"):
        assert f"T {what}: held-out ECE mean" in printed
