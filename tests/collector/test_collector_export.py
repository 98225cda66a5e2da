"""Export: grouped stratified split (near-duplicate clusters never straddle splits), review
decisions honoured, ImageFolder + manifest.csv + stats.json + zip, deterministic by seed."""

from __future__ import annotations

import csv
import json
import sqlite3
import zipfile
from collections import defaultdict
from pathlib import Path

import pytest

from collector.export import SPLITS, assign_splits, export_dataset
from collector.manifest import Manifest


@pytest.fixture
def manifest(crawled, tmp_path):
    """A private copy of the crawl's manifest (beside its images), so tests may review it."""
    copy = crawled / f"review-{tmp_path.name}.sqlite"
    source = sqlite3.connect(crawled / "manifest.sqlite")
    target = sqlite3.connect(copy)
    source.backup(target)
    source.close()
    target.close()
    m = Manifest(copy)
    yield m
    m.close()
    for path in crawled.glob(f"{copy.name}*"):
        path.unlink()


def read_csv(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_collector_export_tree_and_files(manifest, tmp_path):
    result = export_dataset(manifest, tmp_path / "dataset", seed=3, make_zip=True)
    entries = read_csv(result.out_dir)
    kept = manifest.query("SELECT COUNT(*) FROM images WHERE status = 'ok'")[0][0]
    assert len(entries) == kept
    labels = sorted({e["label"] for e in entries})
    assert len(labels) == 10
    for entry in entries:
        assert entry["file"].startswith(f"{entry['split']}/{entry['label']}/")
        assert (result.out_dir / entry["file"]).is_file()
    on_disk = sorted(p.relative_to(result.out_dir).as_posix()
                     for p in result.out_dir.glob("*/*/*"))
    assert on_disk == sorted(e["file"] for e in entries)
    # stratified: every label in every split, and roughly 80/10/10
    for label in labels:
        assert all(result.counts[label][split] >= 1 for split in SPLITS), result.counts[label]
    stats = json.loads((result.out_dir / "stats.json").read_text())
    assert stats["per_split"]["train"] > 3 * stats["per_split"]["test"]
    assert stats["not_exported"]["rejected: corrupt"] > 0
    with zipfile.ZipFile(result.zip_path) as archive:
        names = set(archive.namelist())
    assert {f"dataset/{e['file']}" for e in entries} | {"dataset/manifest.csv",
                                                        "dataset/stats.json"} == names
    with pytest.raises(FileExistsError):
        export_dataset(manifest, tmp_path / "dataset")


def test_collector_export_is_deterministic(manifest, tmp_path):
    first = read_csv(export_dataset(manifest, tmp_path / "a", seed=7).out_dir)
    second = read_csv(export_dataset(manifest, tmp_path / "b", seed=7).out_dir)
    other = read_csv(export_dataset(manifest, tmp_path / "c", seed=8).out_dir)
    assert first == second
    split_of = {(e["label"], e["sha256"]): e["split"] for e in first}
    assert split_of != {(e["label"], e["sha256"]): e["split"] for e in other}


def test_collector_review_decisions_are_honoured(manifest, tmp_path):
    ok = manifest.query("SELECT id, label, sha256 FROM images WHERE status = 'ok' "
                        "ORDER BY id LIMIT 2")
    rejected, relabelled = ok
    new_label = "dress" if relabelled["label"] != "dress" else "hat"
    manifest.set_review(rejected["id"], "rejected", reason="not a product photo")
    manifest.set_review(relabelled["id"], "approved", label=new_label)
    conflict = manifest.query("SELECT id, label, group_id, sha256 FROM images "
                              "WHERE status = 'conflict' ORDER BY id LIMIT 1")[0]
    manifest.set_review(conflict["id"], "approved", reason="belongs here")

    entries = read_csv(export_dataset(manifest, tmp_path / "reviewed").out_dir)
    by_sha = defaultdict(list)
    for entry in entries:
        by_sha[entry["sha256"]].append(entry)
    assert rejected["sha256"] not in by_sha
    assert [e["label"] for e in by_sha[relabelled["sha256"]]] == [new_label]
    assert by_sha[relabelled["sha256"]][0]["original_label"] == relabelled["label"]
    # the approved conflict member is in, under its label; its twin under the other label not
    assert [e["label"] for e in by_sha[conflict["sha256"]]] == [conflict["label"]]


def test_collector_near_duplicate_clusters_never_straddle_splits(manifest, tmp_path):
    # Approve every duplicate so whole clusters are exported, then check the grouping.
    for row in manifest.query("SELECT id FROM images WHERE status = 'duplicate'"):
        manifest.set_review(row["id"], "approved")
    for seed in range(3):
        entries = read_csv(export_dataset(manifest, tmp_path / f"s{seed}", seed=seed).out_dir)
        splits_of = defaultdict(set)
        for entry in entries:
            splits_of[entry["group_id"]].add(entry["split"])
        clusters = [g for g in splits_of if sum(e["group_id"] == g for e in entries) > 1]
        assert len(clusters) >= 10
        assert all(len(splits_of[g]) == 1 for g in clusters)


def test_collector_assign_splits_small_and_invalid():
    labels = ["a"] * 6 + ["b"] * 6
    groups = list(range(12))
    splits = assign_splits(labels, groups, val=0.2, test=0.2, seed=0)
    assert set(splits) <= set(SPLITS) and splits.count("train") >= 4
    assert assign_splits([], [], 0.1, 0.1, 0) == []
    with pytest.raises(ValueError, match="nothing to train on"):
        assign_splits(labels, groups, val=0.5, test=0.5, seed=0)


def test_collector_export_refuses_a_label_that_leaves_the_folder(manifest, tmp_path):
    ok = manifest.query("SELECT id FROM images WHERE status = 'ok' ORDER BY id LIMIT 1")[0]
    manifest.db.execute("UPDATE images SET label = '../escaped' WHERE id = ?", (ok["id"],))
    with pytest.raises(ValueError, match="cannot be a folder name"):
        export_dataset(manifest, tmp_path / "dataset")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "dataset").exists()
