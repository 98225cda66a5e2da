"""The export is a function of the images' content and the seed: two crawls of the same shop
whose rows arrived in a different order export identical train/val/test folders."""

from __future__ import annotations

import asyncio
import filecmp

import yaml

from collector.config import load_sources
from collector.crawl import crawl
from collector.demo_shop import write_sources
from collector.export import export_dataset
from collector.manifest import open_manifest
from tests.collector.conftest import rows


def tree(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "stats.json"}


def test_collector_two_crawls_export_the_same_split(crawled, faulty_shop, tmp_path):
    # The second crawl walks the labels in the opposite order with other concurrency, so
    # row ids (arrival order) differ from the first crawl's.
    sources = write_sources(faulty_shop, tmp_path / "sources.yaml", "again")
    data = yaml.safe_load(sources.read_text())
    data["categories"] = dict(reversed(list(data["categories"].items())))
    data["politeness"]["concurrency_per_host"] = 3
    sources.write_text(yaml.safe_dump(data, sort_keys=False))
    config = load_sources(sources)
    # Other tests count the session shop's requests per URL: leave its counts as they were.
    with faulty_shop.lock:
        counts = dict(faulty_shop.hits)
    try:
        asyncio.run(crawl(config))
    finally:
        with faulty_shop.lock:
            faulty_shop.hits.clear()
            faulty_shop.hits.update(counts)

    query = "SELECT label, url, id, sha256 FROM images WHERE status = 'ok' ORDER BY label, url"
    first, second = rows(crawled, query), rows(config.output_dir, query)
    assert [(r["label"], r["url"], r["sha256"]) for r in first] == \
        [(r["label"], r["url"], r["sha256"]) for r in second]          # same content kept
    assert [r["id"] for r in first] != [r["id"] for r in second]      # other arrival order

    exported = []
    for n, collection in enumerate((crawled, config.output_dir)):
        with open_manifest(collection) as manifest:
            exported.append(export_dataset(manifest, tmp_path / f"dataset{n}", seed=5).out_dir)
    a, b = tree(exported[0]), tree(exported[1])
    assert len(a) > 200 and a.keys() == b.keys()
    assert a == b                                  # folders and manifest.csv, byte for byte
    assert not filecmp.dircmp(exported[0] / "test", exported[1] / "test").diff_files
