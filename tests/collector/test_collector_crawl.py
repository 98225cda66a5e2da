"""One crawl of the demo shop with every fault on: each fault met and handled, robots.txt
obeyed, planted duplicates and cross-label conflicts found, files stored atomically."""

from __future__ import annotations

import hashlib
from collections import Counter

from tests.collector.conftest import rows

STORED = {"ok", "duplicate", "conflict"}


def by_product(crawled):
    return {(r["label"], r["product_id"]): r for r in rows(crawled, "SELECT * FROM images")}


def test_collector_every_listed_product_once(crawled, faulty_shop):
    plan = faulty_shop.plan
    listed = {(label, pid) for label, ids in plan.listings.items() for pid in ids}
    got = rows(crawled, "SELECT label, product_id FROM images")
    assert Counter((r["label"], r["product_id"]) for r in got).most_common(1)[0][1] == 1
    assert {(r["label"], r["product_id"]) for r in got} == listed
    # the promoted product shown on pages 1 and 2 of a label is one row, not two
    assert any(ids.count(pid) == 2 for ids in plan.listings.values() for pid in ids)
    assert not rows(crawled, "SELECT id FROM images WHERE url LIKE '%banner%'")  # widgets
    assert {r["status"] for r in rows(crawled, "SELECT status FROM pages")} == {"done"}


def test_collector_faults_are_met_and_handled(crawled, faulty_shop):
    expected = {"truncated": ("rejected", "corrupt"), "corrupt": ("rejected", "corrupt"),
                "html": ("rejected", "not_an_image"), "bomb": ("rejected", "too_many_pixels"),
                "tiny": ("rejected", "too_small"), "missing": ("failed", "http_404"),
                "robots": ("blocked", "robots"), "offtopic": ("rejected", "off_topic_title"),
                "offsite": ("failed", "refused_address")}
    images = by_product(crawled)
    seen = Counter()
    for (label, pid), row in images.items():
        product = faulty_shop.plan.products[pid]
        for fault in product.faults:
            seen[fault] += 1
            if fault in expected:
                assert (row["status"], row["reason"]) == expected[fault], (pid, fault)
            else:   # 429, 500, slow, webp: retried or waited out, then kept
                assert row["status"] in STORED, (pid, fault, row["status"], row["reason"])
        if not product.faults:
            assert row["status"] in STORED, (pid, row["status"], row["reason"])
    assert set(seen) == set(expected) | {"429", "500", "slow", "webp"}


def test_collector_retries_follow_the_rules(crawled, faulty_shop):
    hits = faulty_shop.hits
    for product in faulty_shop.plan.products.values():
        path = faulty_shop.image_url(product)
        if "500" in product.faults:
            assert hits["GET " + path] == 3          # a burst of two 500s, then the photo
        if "429" in product.faults:
            assert hits["GET " + path] == 2          # 429 + Retry-After, then the photo
        if "missing" in product.faults:
            assert hits["GET " + path] == 1          # a 404 is final: never retried
        if "robots" in product.faults:
            assert "GET " + path not in hits          # disallowed: never requested
    # the listing page that answered 500 twice was retried and parsed
    assert any(k.startswith("GET /search") and v == 3 for k, v in hits.items())
    # the one that answered a captcha page was paused, fetched again and parsed (pages: done)
    captcha = f"/search?q={max(faulty_shop.plan.listings)}"
    assert hits["captcha" + captcha] == 2 and hits["GET " + captcha] == 2
    # the off-site redirect was followed no further than its refusal
    offsite = [p for p in faulty_shop.plan.products.values() if "offsite" in p.faults]
    assert offsite and all(hits["GET " + faulty_shop.image_url(p)] == 1 for p in offsite)


def test_collector_webp_behind_jpg_name(crawled, faulty_shop):
    webp = [r for (label, pid), r in by_product(crawled).items()
            if "webp" in faulty_shop.plan.products[pid].faults]
    assert webp
    for row in webp:
        assert row["url"].endswith(".jpg")
        assert row["format"] == "WEBP" and row["path"].endswith(".webp")


def test_collector_planted_duplicates_and_conflicts(crawled, faulty_shop):
    images = by_product(crawled)
    plan = faulty_shop.plan
    for (label, pid), row in images.items():
        variant = plan.products[pid].variant
        if not variant:
            continue
        original = images[(label, pid[:-1])]
        assert row["status"] == "duplicate", (pid, row["status"])
        assert row["reason"] == ("near_duplicate" if variant == "near" else "exact_duplicate")
        assert row["dup_of"] == original["id"] and row["group_id"] == original["group_id"]
        assert original["status"] == "ok"            # the larger original is the one kept
    cross = [pid for pid in plan.products
             if sum(pid in ids for ids in plan.listings.values()) == 2]
    assert cross
    for pid in cross:
        members = [r for (label, p), r in images.items() if p == pid]
        assert len(members) == 2 and {r["status"] for r in members} == {"conflict"}
        assert len({r["group_id"] for r in members}) == 1
        labels = sorted(r["label"] for r in members)
        assert all(r["reason"] == f"labels: {labels[0]}, {labels[1]}" for r in members)


def test_collector_files_are_whole_and_content_addressed(crawled):
    stored = rows(crawled, "SELECT path, sha256, bytes FROM images "
                           "WHERE status IN ('ok', 'duplicate', 'conflict')")
    assert len(stored) > 250
    for row in stored:
        data = (crawled / row["path"]).read_bytes()
        assert len(data) == row["bytes"]
        assert hashlib.sha256(data).hexdigest() == row["sha256"] in row["path"]
    assert not list(crawled.rglob("*.tmp"))


def test_collector_url_lists_without_listing_pages(tmp_path):
    """The img2dataset-style input: label -> file of image URLs, same validation and dedup."""
    import asyncio

    import yaml

    from collector.config import load_sources
    from collector.crawl import crawl
    from tests.collector.conftest import start_shop

    shop = start_shop(faults=("html",), per_label=4)
    try:
        products = [p for p in shop.plan.products.values() if p.label in ("hat", "shoes")]
        for label in ("hat", "shoes"):
            urls = [shop.url + shop.image_url(p) for p in products if p.label == label]
            (tmp_path / f"{label}.txt").write_text("# comment\n\n" + "\n".join(urls * 2))
        (tmp_path / "sources.yaml").write_text(yaml.safe_dump({
            "url_lists": {"hat": "hat.txt", "shoes": "shoes.txt"},
            "limits": {"max_images_per_label": 5}}))
        config = load_sources(tmp_path / "sources.yaml")
        result = asyncio.run(crawl(config))
    finally:
        shop.stop()
    got = rows(config.output_dir, "SELECT label, url, status, reason FROM images")
    assert Counter(r["label"] for r in got) == {"hat": 5, "shoes": 5}   # cap, repeats once
    assert result.dedup.duplicates >= 2                    # the planted copies in each label
    for row in got:
        product = shop.plan.products[row["url"].split("/")[-2]]
        expected = ("rejected", "not_an_image") if "html" in product.faults else None
        if expected:
            assert (row["status"], row["reason"]) == expected
        else:
            assert row["status"] in STORED


def test_collector_follow_product_pages(tmp_path):
    """follow_product_pages: each card's product page is opened (sponsored redirect links
    unwrapped) and its data-old-hires image is the one downloaded."""
    import asyncio

    import yaml

    from collector.config import load_sources
    from collector.crawl import crawl
    from collector.demo_shop import write_sources
    from tests.collector.conftest import start_shop

    shop = start_shop(faults=(), per_label=3)
    try:
        sources = write_sources(shop, tmp_path / "sources.yaml", "collected")
        data = yaml.safe_load(sources.read_text())
        data["follow_product_pages"] = True
        data["categories"] = {k: v for k, v in data["categories"].items() if k in ("hat", "skirt")}
        sources.write_text(yaml.safe_dump(data))
        config = load_sources(sources)
        asyncio.run(crawl(config))
    finally:
        shop.stop()
    pages = rows(config.output_dir, "SELECT kind, status, url FROM pages")
    product_pages = [p for p in pages if p["kind"] == "product"]
    assert len(product_pages) == 10 and {p["status"] for p in pages} == {"done"}
    assert all("/p/" in p["url"] and "sspa" not in p["url"] for p in product_pages)
    images = rows(config.output_dir, "SELECT url, product_url, status FROM images")
    assert len(images) == 10
    assert all(r["url"].endswith("/full.jpg") and "/p/" in r["product_url"] for r in images)
    assert {r["status"] for r in images} <= STORED
