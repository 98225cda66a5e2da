"""Block pages, unknown hosts and failed items in whole crawls: a captcha is a block (paused,
retried, then the host stopped with exit 3 and the cure), the same command resumes from it;
a next page on a host without a profile is a recorded failure; --retry-failed retries."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from collector.config import load_sources
from collector.crawl import crawl
from collector.demo_shop import write_sources
from tests.collector.conftest import rows, start_shop
from tests.collector.test_collector_web import Stub, answer, text

REPO = Path(__file__).resolve().parents[2]


def sources_for(shop, folder: Path, labels=("hat", "shoes"), **politeness) -> Path:
    sources = write_sources(shop, folder / "sources.yaml", "collected")
    data = yaml.safe_load(sources.read_text())
    data["categories"] = {k: v for k, v in data["categories"].items() if k in labels}
    data["politeness"].update(politeness)
    sources.write_text(yaml.safe_dump(data))
    return sources


def crawl_command(sources: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "collector", "crawl", str(sources)],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_collector_captcha_stops_the_host_and_the_same_command_resumes(tmp_path):
    shop = start_shop(faults=(), per_label=14)
    try:
        sources = sources_for(shop, tmp_path, block_pause=0.05, block_retries=2)
        shop.blocking = "captcha"
        first = crawl_command(sources)
        assert first.returncode == 3, first.stderr[-3000:]
        message = " ".join(first.stderr.split())
        assert f"stopped crawling {urlsplit(shop.url).netloc}" in message
        assert "does not solve captchas or change identity" in message
        assert "requests_per_second_per_host" in message and "run the same command again" in message
        assert "pausing the host 0.05 s, then retry 1 of 2" in message
        assert "pausing the host 0.1 s, then retry 2 of 2" in message   # growing
        collection = tmp_path / "collected"
        pages = rows(collection, "SELECT status, reason, http_status FROM pages")
        assert {(p["status"], p["reason"]) for p in pages} <= {("blocked", "captcha"),
                                                               ("pending", None)}
        assert any(p["status"] == "blocked" for p in pages)
        assert not rows(collection, "SELECT id FROM images")      # nothing read as products
        searches = sum(v for k, v in shop.hits.items() if k.startswith("GET /search"))
        assert searches <= 2 + 2          # one per label, then bounded retries: no hammering

        shop.blocking = None              # later, the shop answers again
        again = crawl_command(sources)
        assert again.returncode == 0, again.stderr[-3000:]
    finally:
        shop.stop()
    assert {p["status"] for p in rows(collection, "SELECT status FROM pages")} == {"done"}
    listed = {(label, pid) for label, ids in shop.plan.listings.items() if label in ("hat", "shoes")
              for pid in ids}
    assert {(r["label"], r["product_id"]) for r in rows(
        collection, "SELECT label, product_id FROM images")} == listed


def test_collector_empty_listing_is_a_block_unless_the_profile_says_otherwise(tmp_path):
    shop = start_shop(faults=(), per_label=3)
    try:
        shop.blocking = "no_cards"
        config = load_sources(sources_for(shop, tmp_path / "a", labels=("hat",),
                                          block_pause=0, block_retries=1))
        result = asyncio.run(crawl(config))
        assert list(result.stopped) == [urlsplit(shop.url).netloc]
        assert {(p["status"], p["reason"]) for p in rows(
            config.output_dir, "SELECT status, reason FROM pages")} == {("blocked", "no_cards")}

        sources = sources_for(shop, tmp_path / "b", labels=("hat",))
        data = yaml.safe_load(sources.read_text())
        for profile in data["sites"].values():
            profile["empty_listing_is_block"] = False
        sources.write_text(yaml.safe_dump(data))
        config = load_sources(sources)
        result = asyncio.run(crawl(config))
        assert not result.stopped                 # a really empty category: just done
        assert {p["status"] for p in rows(config.output_dir, "SELECT status FROM pages")} \
            == {"done"}
    finally:
        shop.stop()


def test_collector_next_page_on_a_host_without_a_profile_is_a_recorded_failure(tmp_path):
    """Two profiles, and page 1 links its next page to a third host: that page is 'failed:
    no_profile' (it used to raise KeyError outside the worker and end the whole crawl)."""
    shop = start_shop(faults=(), per_label=2)
    photo = shop.url + shop.image_url(next(iter(shop.plan.products.values())))
    other = Stub({"/robots.txt": text("", 404)})
    listing = (f'<div class="card" data-id="A1"><img src="{photo}"></div>'
               f'<a class="next" href="{other.url}/s?page=2">Next</a>')
    with other, Stub({"/robots.txt": text("", 404),
                      "/s": lambda h: answer(h, 200, listing.encode())}) as site:
        profile = {"card": "div.card", "id_attr": "data-id", "next_page": "a.next"}
        (tmp_path / "sources.yaml").write_text(yaml.safe_dump({
            "categories": {"hat": [site.url + "/s"]},
            "sites": {urlsplit(site.url).netloc: profile, "shop.example": profile},
            "politeness": {"requests_per_second_per_host": 100}}))
        config = load_sources(tmp_path / "sources.yaml")
        asyncio.run(crawl(config))
    shop.stop()
    pages = {p["page_no"]: p for p in rows(config.output_dir, "SELECT * FROM pages")}
    assert (pages[1]["status"], pages[2]["status"], pages[2]["reason"]) == \
        ("done", "failed", "no_profile")
    assert not other.hits.get("/s?page=2")               # never fetched: nothing to read it
    assert [r["status"] for r in rows(config.output_dir, "SELECT status FROM images")] == ["ok"]


def test_collector_retry_failed(tmp_path):
    """Failed images stay failed on a plain re-run and are fetched again with --retry-failed."""
    shop = start_shop(faults=("500",), per_label=4)
    try:
        sources = sources_for(shop, tmp_path, labels=tuple(shop.plan.listings))
        data = yaml.safe_load(sources.read_text())
        data["download"]["retries"] = 0             # the shop's burst of two 500s wins
        sources.write_text(yaml.safe_dump(data))
        config = load_sources(sources)
        asyncio.run(crawl(config))
        failed = rows(config.output_dir, "SELECT url, reason FROM images WHERE status = 'failed'")
        assert failed and {r["reason"] for r in failed} == {"http_500"}

        hits = dict(shop.hits)
        asyncio.run(crawl(config))                  # plain re-run: nothing retried
        assert len(rows(config.output_dir, "SELECT id FROM images WHERE status = 'failed'")) \
            == len(failed)
        assert all(shop.hits["GET " + urlsplit(r["url"]).path] == hits["GET " +
                   urlsplit(r["url"]).path] for r in failed)

        data["download"]["retries"] = 1             # the second 500, then the photo
        sources.write_text(yaml.safe_dump(data))
        config = load_sources(sources)
        asyncio.run(crawl(config, retry_failed=True))
    finally:
        shop.stop()
    assert not rows(config.output_dir, "SELECT id FROM images WHERE status = 'failed'")
    for row in failed:
        assert shop.hits["GET " + urlsplit(row["url"]).path] == 3
