"""bench_attributes' pieces on the demo photos: the three photo folders hold the same photos in
the same splits (the colour-only one: each photo whose colour is known, under its colour), the
trainer reads them as the benchmark means, and the quality part end to end with tiny trainings
(head only, 64 px) scores every model on the same test photos."""

from __future__ import annotations

import io

import onnx
import pytest
from rich.console import Console

from benchmarks.bench_attributes import (
    SPLITS,
    BenchAttributes,
    export_pair,
    make_datasets,
    predict,
    quality,
    render,
    serving,
)
from benchmarks.bench_train import DEMO_CATALOG
from collector.demo_shop import load_colours
from trainer.attributes import read_attributes
from trainer.data import discover


def _photos(folder):
    """(split, the photo file behind the link, the label folder it is under)."""
    return {(split, p.resolve(), p.parent.name) for split in SPLITS
            for p in (folder / split).glob("*/*")}


def test_the_three_folders_hold_the_same_photos_in_the_same_splits(tmp_path):
    datasets = make_datasets(tmp_path)
    colours = load_colours(DEMO_CATALOG)
    shared = _photos(datasets["shared"])
    assert shared == _photos(datasets["category-only"])
    assert {path for _, path, _ in shared} == set(DEMO_CATALOG.glob("*/*.jpg"))
    assert all(path.parent.name == label for _, path, label in shared)
    known = {(split, path, colours[f"{label}/{path.name}"]) for split, path, label in shared
             if f"{label}/{path.name}" in colours}
    assert _photos(datasets["colour-only"]) == known and known
    # The trainer reads the manifest as collector export's: the colour, else unknown.
    table = read_attributes(datasets["shared"])
    assert table.names == ["colour"]
    for _, path, label in shared:
        assert table.values_of(path)["colour"] == colours.get(f"{label}/{path.name}", "unknown")
    assert read_attributes(datasets["category-only"]) is None
    # The colour-only folder is a dataset the trainer accepts: every colour has enough photos.
    splits = discover(datasets["colour-only"])
    assert splits.labels == sorted({colour for split, _, colour in known if split == "train"})
    assert len(splits.test) == sum(split == "test" for split, _, _ in known)


@pytest.fixture(scope="module")
def tiny_quality(tmp_path_factory):
    """The quality part with tiny trainings: head only (the linear probe), 64 px, 1 thread."""
    out = tmp_path_factory.mktemp("bench-attributes")
    bench = BenchAttributes(out=out, threads=1, users=2, requests=16, lone_requests=5, rounds=2,
                            ort_threads=1,
                            overrides={"epochs": 0, "head_epochs": 2, "image_size": 64})
    datasets = make_datasets(out / "data")
    return bench, datasets, quality(bench, datasets, Console(file=io.StringIO()))


def test_quality_scores_every_model_on_the_same_test_photos(tiny_quality):
    bench, datasets, report = tiny_quality
    colours = load_colours(DEMO_CATALOG)
    test = [p for p in (datasets["shared"] / "test").glob("*/*")]
    known = [p for p in test if f"{p.parent.name}/{p.name}" in colours]
    assert report["test_photos"] == len(test) and report["colour_known"] == len(known)
    models = report["models"]
    assert models["shared"]["colour"]["images"] == models["colour-only"]["colour"]["images"] \
        == len(known)
    assert models["shared"]["category"]["images"] == len(test)
    for name, row in models.items():
        for figures in (row.get("colour"), row.get("category")):
            if figures:
                assert 0 <= figures["accuracy"] <= 1 and 0 <= figures["macro_f1"] <= 1, name
                assert sum(figures["correct"]) == round(figures["accuracy"] * figures["images"])
        assert row["training"]["wall_s"] > 0
    colour = report["paired"]["colour"]
    assert colour["only_first"] - colour["only_second"] == (
        sum(models["shared"]["colour"]["correct"]) - sum(models["colour-only"]["colour"]["correct"]))
    # The shared model's category comes from a backbone and head trained by the category alone
    # (the colour head is trained after, on its features): the category-only training of the
    # same photos with the same seed predicts exactly the same.
    assert models["shared"]["category"]["correct"] == models["category-only"]["category"]["correct"]
    assert report["paired"]["category"] == {"only_first": 0, "only_second": 0}
    # A probe's last weights are its best ones: the colour head refitted on them for
    # `--checkpoint last` is the one `fit_attributes` put in best.pt.
    photos = sorted((datasets["shared"] / "test").glob("*/*"))
    assert predict(bench.out / "runs" / "shared", photos, "last") == predict(
        bench.out / "runs" / "shared", photos, "best")
    markdown = render({"date": "d", "commit": "c", "machine": "m", "load_average_start": [0],
                       "settings": bench.model_dump(mode="json"), "quality": report})
    for name in models:
        assert f"| {name} |" in markdown


def test_serving_serves_the_same_model_with_and_without_its_heads(tiny_quality):
    """Both exports of the shared run served by `bentoml serve` on the same runtime and
    precision: one answers the colour, the other has no attributes; figures from both."""
    bench, datasets, _ = tiny_quality
    models, exporters = export_pair(bench.out / "runs" / "shared", bench.out / "exports",
                                    Console(file=io.StringIO()))
    assert exporters["with-heads"] == exporters["without-heads"]
    assert [o.name for o in onnx.load(models["with-heads"]).graph.output] == [
        "logits", "attr_colour"]
    assert [o.name for o in onnx.load(models["without-heads"]).graph.output] == ["logits"]
    photos = [p.read_bytes() for p in sorted((datasets["shared"] / "test").glob("*/*"))[:8]]
    report = serving(bench, models, photos, Console(file=io.StringIO()))
    with_, without = report["served"]["with-heads"], report["served"]["without-heads"]
    assert with_["answers_attributes"] == with_["attributes"] == ["colour"]
    assert without["answers_attributes"] == without["attributes"] == []
    assert (with_["runtime"], with_["precision"]) == (without["runtime"], "fp32")
    for name in models:
        assert len(report["rounds_raw"][name]) == bench.rounds
        assert report["median"][name]["loaded_images_per_s"] > 0
    assert report["ratio_with_over_without"]["req_per_s"] == pytest.approx(
        report["median"]["with-heads"]["loaded_images_per_s"]
        / report["median"]["without-heads"]["loaded_images_per_s"])
