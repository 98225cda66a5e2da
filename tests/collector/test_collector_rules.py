"""Title rules: patterns, per-label include/exclude, label_rules splits, attribute values,
applied at crawl time on a real shop and re-applied to its manifest without recrawling."""

from __future__ import annotations

import asyncio
import csv
import json
import re

import pytest
import yaml
from rich.console import Console

from collector.cli import status_tables
from collector.config import ConfigError, load_sources
from collector.crawl import crawl
from collector.dedup import run_dedup
from collector.export import export_dataset
from collector.manifest import open_manifest
from collector.review.store import ImageQuery, ReviewStore
from collector.rules import apply_rules, attribute_value, first_match, judge
from tests.collector.conftest import rows, start_shop


def test_collector_title_patterns():
    assert first_match(["saree*"], "Women's Silk SAREES with blouse piece") == "saree*"
    assert first_match(["t-shirt"], "Men T Shirt, cotton") == "t-shirt"
    assert first_match(["tee"], "Teen party dress") is None          # whole words only
    assert first_match(["jeans"], "Skinny jeggings") is None
    assert first_match([r"re:\bjean(s)?\b"], "Slim Jean") == r"re:\bjean(s)?\b"
    assert judge("Cotton petticoat for saree", ["saree*"], ["petticoat", "blouse"]) \
        .rule == "exclude 'petticoat'"
    assert judge("Banarasi saree", ["saree*", "sari"], ["blouse"]).on_topic
    off = judge("Ready blouse", ["saree*"], [])
    assert not off.on_topic and off.rule == "no include pattern matched"
    assert judge("", ["saree"], []) is None and judge("Saree", [], []) is None
    colours = {"red": ["red", "maroon"], "blue": ["blue", "navy"]}
    assert attribute_value("Maroon kurta", colours) == ("red", "maroon")
    assert attribute_value("Red and navy stripes", colours) == ("unknown", None)   # several
    assert attribute_value("Printed kurta", colours) == ("unknown", None)          # none


GOOD = {"categories": {"saree": ["http://127.0.0.1:1/s?k=saree"]},
        "sites": {"127.0.0.1:1": {"card": "div"}}}


@pytest.mark.parametrize("patch, words", [
    ({"title_rules": {"sari": {"title_exclude": ["blouse"]}}}, "title_rules.sari: no such label"),
    ({"title_rules": {"saree": {"title_include": ["re:(unclosed"]}}},
     "not a valid regular expression"),
    ({"title_rules": {"saree": {"title_exclude": ["***"]}}}, "no letters or digits"),
    ({"title_rules": {"saree": {"include": ["x"]}}}, "unknown field"),
    ({"off_topic": "hide"}, "off_topic"),
    ({"label_rules": {"dress": [{"label": "a", "title_include": ["a"]}]}},
     "label_rules.dress: not a category"),
    ({"label_rules": {"saree": [{"label": "../x", "title_include": ["a"]}]}}, "folder name"),
    ({"label_rules": {"saree": [{"label": "x"}]}}, "needs title_include"),
    ({"attributes": {"colour": {"unknown": ["grey"]}}}, "'unknown' is reserved"),
    ({"sites": {"127.0.0.1:1": {"card": "div", "extra": {"price": "span >"}}}},
     "invalid CSS selector"),
    ({"sites": {"127.0.0.1:1": {"card": "div", "image_rewrites": [
        {"pattern": "/image/(\\d+)/", "replace": "/image/\\g<2>/"}]}}}, "image rewrite"),
])
def test_collector_bad_rules_name_the_field(tmp_path, patch, words):
    path = tmp_path / "sources.yaml"
    path.write_text(yaml.safe_dump({**GOOD, **patch}))
    with pytest.raises(ConfigError, match="problem") as info:
        load_sources(path)
    assert words in str(info.value), str(info.value)


def shop_sources(shop, tmp_path, **changes):
    from collector.demo_shop import write_sources

    sources = write_sources(shop, tmp_path / "sources.yaml", "collected")
    data = yaml.safe_load(sources.read_text())
    data.update(changes)
    sources.write_text(yaml.safe_dump(data, sort_keys=False))
    return sources


def test_collector_off_topic_title_rejected_then_flagged_without_recrawl(tmp_path):
    shop = start_shop(faults=("offtopic",), per_label=4)
    try:
        sources = shop_sources(shop, tmp_path)
        config = load_sources(sources)
        asyncio.run(crawl(config))
        (off,) = [p for p in shop.plan.products.values() if "offtopic" in p.faults]
        (row,) = rows(config.output_dir, "SELECT * FROM images WHERE product_id = ?",
                      (off.product_id,))
        assert (row["status"], row["reason"]) == ("rejected", "off_topic_title")
        assert row["detail"] == row["title_rule"] == "exclude 'gift card*'"
        assert row["title_verdict"] == "off_topic" and row["path"] is None
        image_path = f"/img/{off.product_id}/"
        assert not any(image_path in key for key in shop.hits)            # never downloaded
        others = rows(config.output_dir, "SELECT status FROM images WHERE product_id != ?",
                      (off.product_id,))
        assert {r["status"] for r in others} <= {"ok", "duplicate"}

        # The user prefers to see them: flag instead of reject, re-applied to the manifest.
        data = yaml.safe_load(sources.read_text())
        data["off_topic"] = "flag"
        sources.write_text(yaml.safe_dump(data))
        config = load_sources(sources)
        with open_manifest(config.output_dir) as manifest:
            summary = apply_rules(manifest, config)
        assert summary.restored == 1 and summary.rejected == 0
        (row,) = rows(config.output_dir, "SELECT * FROM images WHERE product_id = ?",
                      (off.product_id,))
        assert row["status"] == "pending" and row["title_verdict"] == "off_topic"
        listing_hits = sum(v for k, v in shop.hits.items() if k.startswith("GET /search"))
        asyncio.run(crawl(config))                  # fetches that one image, no listing page
        assert sum(v for k, v in shop.hits.items() if k.startswith("GET /search")) == \
            listing_hits
        (row,) = rows(config.output_dir, "SELECT * FROM images WHERE product_id = ?",
                      (off.product_id,))
        assert row["status"] == "ok" and row["title_verdict"] == "off_topic"
        console = Console(record=True, width=120)
        for table in status_tables(config.output_dir):
            console.print(table)
        assert re.search(r"flagged\s+.\s+off_topic_title \(kept, to review\)\s+.\s+1\b",
                         console.export_text())
        # The review page lists the flagged ones on their own.
        page = ReviewStore(config.output_dir).list_images(ImageQuery(title="off_topic"))
        assert [item["product_id"] for item in page.items] == [off.product_id]
        assert page.items[0]["title_rule"] == "exclude 'gift card*'"
    finally:
        shop.stop()


def test_collector_label_rules_split_one_listing_with_extra_fields_and_attributes(tmp_path):
    shop = start_shop(faults=(), per_label=3)
    try:
        base = f"{shop.url}/search?q="
        sources = shop_sources(
            shop, tmp_path,
            categories={"clothing": [base + "hat", base + "shoes", base + "skirt"]},
            label_rules={"clothing": [
                {"label": "headwear", "title_include": ["hat*"]},
                {"label": "footwear", "title_include": ["shoe*"], "title_exclude": ["outlet"]}]})
        data = yaml.safe_load(sources.read_text())
        profile = next(iter(data["sites"].values()))
        profile["extra"] = {"price": "span.price"}
        sources.write_text(yaml.safe_dump(data, sort_keys=False))
        config = load_sources(sources)
        asyncio.run(crawl(config))
        got = rows(config.output_dir, "SELECT * FROM images ORDER BY id")
        by_label: dict[str, list] = {}
        for row in got:
            by_label.setdefault(row["label"], []).append(row)
            assert row["found_under"] == "clothing"
            assert json.loads(row["extra"]) == {"price": "$19.99"}
        assert set(by_label) == {"headwear", "footwear", "clothing"}
        assert all(r["title_rule"] == "headwear: include 'hat*'" for r in by_label["headwear"])
        assert all("Shoes" in r["product_title"] and "outlet" not in r["product_title"]
                   for r in by_label["footwear"])
        assert all(r["title_rule"] == "footwear: include 'shoe*'" for r in by_label["footwear"])
        # Skirts (and the shoe outlet copy) fit no rule: recorded, not downloaded.
        assert {(r["status"], r["reason"], r["title_rule"]) for r in by_label["clothing"]} == {
            ("rejected", "no_label_rule", "no label rule matched")}
        assert any("Skirt" in r["product_title"] for r in by_label["clothing"])
        assert all(r["path"] is None for r in by_label["clothing"])

        # Attribute rules added later: re-applied to the manifest, no crawl.
        data["attributes"] = {"shape": {"round": ["hat*"], "long": ["shoe*", "skirt*"]},
                              "edition": {"outlet": ["outlet"], "resale": ["reseller"]}}
        sources.write_text(yaml.safe_dump(data, sort_keys=False))
        config = load_sources(sources)
        requests = sum(shop.hits.values())
        with open_manifest(config.output_dir) as manifest:
            apply_rules(manifest, config)
            run_dedup(manifest, config.dedup.hamming_threshold)
            counts = manifest.attribute_counts()
            kept = manifest.query("SELECT COUNT(*) FROM images WHERE status = 'ok'")[0][0]
            assert sum(counts["shape"].values()) == kept
            assert counts["shape"]["round"] == len([r for r in by_label["headwear"]
                                                    if r["status"] == "ok"])
            assert counts["edition"]["unknown"] >= 4
            result = export_dataset(manifest, tmp_path / "dataset", val=0.0, test=0.0)
        assert sum(shop.hits.values()) == requests
        console = Console(record=True, width=120)
        for table in status_tables(config.output_dir):
            console.print(table)
        shown = console.export_text()
        assert "attributes (exported images)" in shown and "no_label_rule" in shown
        assert re.search(rf"shape\s+.\s+round\s+.\s+{counts['shape']['round']}\b", shown), shown
        with open(result.out_dir / "manifest.csv", newline="") as handle:
            entries = list(csv.DictReader(handle))
        assert {e["label"] for e in entries} == {"headwear", "footwear"}
        assert all(e["extra_price"] == "$19.99" and e["found_under"] == "clothing"
                   for e in entries)
        assert {e["attr_shape"] for e in entries if e["label"] == "headwear"} == {"round"}
        assert {e["attr_edition"] for e in entries} == {"unknown"}   # copies are not exported
        resold = rows(config.output_dir, "SELECT attributes FROM images "
                      "WHERE product_title LIKE '%reseller%' AND label = 'headwear'")
        assert json.loads(resold[0]["attributes"]) == {"edition": "resale", "shape": "round"}
    finally:
        shop.stop()
