"""bench_train's small subsets on a tree shaped like clothing-small (train/ and validation/, real
demo photos): the splits never share a photo, the held-out folder is every photo of the drawn
labels the recipes did not train or validate on (for the demo suite: every photo outside the
catalogue), and a tiny probe is scored on both test sets."""

from __future__ import annotations

import csv
import io

import pytest
from rich.console import Console

from benchmarks.bench_train import (
    DEMO_CATALOG,
    SUBSET_VAL_PER_LABEL,
    BenchTrain,
    compare_runs,
    comparisons,
    heldout_folder,
    make_demo,
    make_subset,
    paired,
    print_tables,
    run_one,
    write_report,
)

LABELS, PER_LABEL = 3, 8


def _photos(folder):
    return {(p.parent.name, p.resolve()) for p in folder.glob("**/*.jpg")}


def test_the_held_out_folder_is_every_photo_of_the_labels_outside_train_and_val(
        tmp_path, clothing_small_shaped):
    source = clothing_small_shaped
    subset = make_subset(source, tmp_path / "3x8-seed1", LABELS, PER_LABEL, seed=1)
    train, val, test = (_photos(subset / split) for split in ("train", "val", "test"))
    heldout = _photos(heldout_folder(subset))
    labels = {label for label, _ in train}
    assert len(labels) == LABELS and {label for label, _ in heldout} == labels
    assert len(train) == LABELS * PER_LABEL and len(val) == LABELS * SUBSET_VAL_PER_LABEL
    assert not (train & val) and not (train & heldout) and not (val & heldout)
    assert test < heldout
    every = {(label, p.resolve()) for label in labels for p in source.glob(f"*/{label}/*.jpg")}
    assert heldout == every - train - val
    # The same seed draws the same photos: the benchmark can be rerun or extended.
    again = make_subset(source, tmp_path / "again", LABELS, PER_LABEL, seed=1)
    assert _photos(again / "train") == train and _photos(heldout_folder(again)) == heldout


def test_the_demo_held_out_folder_is_every_source_photo_outside_the_catalogue(tmp_path):
    # clothing-small holds the catalogue's photos under the same names, and many more.
    source = tmp_path / "source"
    extra = set()
    for folder in sorted(p for p in DEMO_CATALOG.iterdir() if p.is_dir()):
        photos = sorted(folder.glob("*.jpg"))
        for split, chosen in (("train", photos[:20]), ("validation", photos[20:])):
            (source / split / folder.name).mkdir(parents=True)
            for photo in chosen:
                (source / split / folder.name / photo.name).symlink_to(photo)
        for n, split in enumerate(("train", "train", "validation")):
            other = source / split / folder.name / f"not-in-catalogue-{n}.jpg"
            other.symlink_to(photos[n])
            extra.add((folder.name, other.name))
    demo = make_demo(tmp_path / "demo", source=source)
    shown = {(p.parent.name, p.name) for p in demo.glob("*/*/*.jpg")}
    assert len(shown) == 300 and not {name for _, name in shown} & {n for _, n in extra}
    assert {(p.parent.name, p.name) for p in heldout_folder(demo).glob("*/*.jpg")} == extra
    # Without clothing-small the suite runs on the catalogue alone.
    assert not heldout_folder(make_demo(tmp_path / "alone")).exists()


def test_a_tiny_probe_is_scored_on_test_and_on_the_held_out_photos(tmp_path,
                                                                 clothing_small_shaped):
    subset = make_subset(clothing_small_shaped, tmp_path / "3x8-seed0",
                         LABELS, PER_LABEL, seed=0)
    bench = BenchTrain(out=tmp_path / "bench", threads=1,
                       overrides={"epochs": 0, "head_epochs": 2, "image_size": 64})
    row = run_one("probe", subset, tmp_path / "runs" / "probe", bench,
                  Console(file=io.StringIO()), heldout_folder(subset))
    assert row["images"] == len(_photos(subset / "test"))
    assert row["heldout_images"] == len(_photos(heldout_folder(subset))) > row["images"]
    assert 0 <= row["heldout_acc"] <= 1 and 0 <= row["heldout_macro_f1"] <= 1
    assert 0 <= row["heldout_ece_after"] <= 1 and 0 <= row["heldout_ece_floor"] <= 1
    assert row["heldout_temperature_fitted_here"] > 0
    assert 0 <= row["heldout_ece_at_t_fitted_here"] <= 1
    with open(row["heldout_predictions"], newline="") as handle:
        predictions = list(csv.DictReader(handle))
    assert len(predictions) == row["heldout_images"]
    assert sum(r["true"] == r["predicted"] for r in predictions) == round(
        row["heldout_acc"] * row["heldout_images"])

    # Photo by photo against a second, weaker probe (one head epoch) on the same photos, drawn
    # again by the same seed under another folder, as a later benchmark run would.
    again = make_subset(clothing_small_shaped, tmp_path / "later" / "3x8-seed0",
                        LABELS, PER_LABEL, seed=0)
    weaker = run_one("probe", again, tmp_path / "runs" / "weaker",
                     bench.model_copy(update={"overrides": {**bench.overrides, "head_epochs": 1}}),
                     Console(file=io.StringIO()), heldout_folder(again))
    pair = paired(row["heldout_predictions"], weaker["heldout_predictions"])
    assert pair["only_probe_right"] + pair["only_recipe_right"] > 0
    assert pair["only_recipe_right"] - pair["only_probe_right"] == round(
        (weaker["heldout_acc"] - row["heldout_acc"]) * row["heldout_images"])
    assert 0 < pair["mcnemar_p"] <= 1
    assert paired(row["heldout_predictions"], row["heldout_predictions"]) == {
        "only_probe_right": 0, "only_recipe_right": 0, "mcnemar_p": 1.0}

    rows = [{"dataset": "3x80", "seed": 0, **row},
            {"dataset": "3x80", "seed": 0, **row, "recipe": "recipe", "heldout_acc": 1.0,
             "heldout_paired": pair}]
    gains = comparisons(rows)["3x80"]
    assert gains["gain_acc"] == [0.0]
    assert gains["gain_heldout_acc"] == [1.0 - row["heldout_acc"]]
    assert gains["errors_removed_heldout_acc"] == [1.0]  # the recipe row gets every photo right
    # The weaker probe as the recipe: the errors it removes, counted photo by photo.
    probe_errors = round((1 - row["heldout_acc"]) * row["heldout_images"])
    against_weaker = comparisons([rows[0], {**rows[0], **weaker, "recipe": "recipe"}])["3x80"]
    assert against_weaker["errors_removed_heldout_acc"][0] == pytest.approx(
        (pair["only_recipe_right"] - pair["only_probe_right"]) / probe_errors)
    printed = io.StringIO()
    print_tables(Console(file=printed, width=300), rows)
    lines = printed.getvalue().splitlines()
    verdicts = [line for line in lines if line.startswith("3x80: recipe - probe")]
    assert len(verdicts) == 2  # test/ and held-out, once each
    assert "on test/ photos" in verdicts[0] and "missed" in verdicts[0]
    assert "on held-out photos" in verdicts[1]
    assert verdicts[1].endswith("met" if 1.0 - row["heldout_acc"] >= 0.02 else "missed")
    assert sum(line.startswith("3x80 seed 0: ECE on") for line in lines) == 1
    assert "share of the probe's errors the recipe removes per seed 100% (median 100%)" in (
        printed.getvalue())
    assert (f"only the probe gets {pair['only_probe_right']} right, only the recipe "
            f"{pair['only_recipe_right']}") in printed.getvalue()

    # Two finished benchmark runs, before and after a change, compared split by split (the
    # same photos stand in for a second seed, so the sum over splits is twice one split).
    for name, probe in (("before", row), ("after", weaker)):
        write_report(BenchTrain(out=tmp_path / name),
                     [{"dataset": "3x80", "seed": seed, **probe} for seed in (0, 1)])
    printed = io.StringIO()
    compared = compare_runs(tmp_path / "before", tmp_path / "after",
                            Console(file=printed, width=300))
    assert [(s["seed"], s["only_before_right"], s["only_after_right"], s["mcnemar_p"])
            for s in compared["splits"]] == [
        (seed, pair["only_probe_right"], pair["only_recipe_right"], pair["mcnemar_p"])
        for seed in (0, 1)]
    summed = compared["summed"]["probe"]
    assert (summed["only_before_right"], summed["only_after_right"]) == (
        2 * pair["only_probe_right"], 2 * pair["only_recipe_right"])
    assert (f"only before right on {2 * pair['only_probe_right']} photos, only after on "
            f"{2 * pair['only_recipe_right']}") in printed.getvalue()
    # A split without held-out photos (the full suite) compares on the photos it was scored on.
    assert row["predictions"] != row["heldout_predictions"]
    on_test = paired(row["predictions"], weaker["predictions"], names=("before", "after"))
    for name, probe in (("before", row), ("after", weaker)):
        write_report(BenchTrain(out=tmp_path / f"full-{name}"), [
            {"dataset": "clothing-small", "seed": 0,
             **{k: v for k, v in probe.items() if not k.startswith("heldout_")}}])
    compared = compare_runs(tmp_path / "full-before", tmp_path / "full-after",
                            Console(file=io.StringIO()))
    assert [{k: s[k] for k in on_test} | {"images": s["images"]} for s in compared["splits"]] == [
        on_test | {"images": row["images"]}]
    # A run that scored other photos is refused, not matched in part.
    with open(weaker["heldout_predictions"]) as handle:
        fewer = handle.readlines()[:-1]
    (tmp_path / "fewer.csv").write_text("".join(fewer))
    with pytest.raises(SystemExit, match="score different photos"):
        paired(row["heldout_predictions"], str(tmp_path / "fewer.csv"))
