"""Collector fixtures: a demo shop on 127.0.0.1 with every fault on, and one full crawl of it
that several tests read (crawling once keeps the area's tests near two minutes)."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from collector.config import load_sources
from collector.crawl import crawl
from collector.demo_shop import FAULTS, DemoShop, write_sources
from loadtests.servers import free_port
from tests.conftest import DEMO_CATALOG


def start_shop(faults=FAULTS, per_label: int | None = None, **options) -> DemoShop:
    return DemoShop(DEMO_CATALOG, set(faults), port=free_port(), per_label=per_label,
                    **options).start()


@pytest.fixture(scope="session")
def faulty_shop():
    shop = start_shop()
    yield shop
    shop.stop()


@pytest.fixture(scope="session")
def crawled(faulty_shop, tmp_path_factory) -> Path:
    """The collection folder of one uninterrupted crawl of the faulty shop."""
    root = tmp_path_factory.mktemp("crawl-full")
    sources = write_sources(faulty_shop, root / "sources.yaml", "collected")
    config = load_sources(sources)
    asyncio.run(crawl(config))
    return config.output_dir


def rows(collection: Path, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
    db = sqlite3.connect(collection / "manifest.sqlite")
    db.row_factory = sqlite3.Row
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def outcome(collection: Path) -> set[tuple]:
    """What a crawl ended with, independent of host:port, row ids and timing."""
    return {(r["label"], r["product_id"], urlsplit(r["url"]).path, r["status"], r["reason"],
             r["sha256"], r["path"])
            for r in rows(collection, "SELECT * FROM images")}


def crawl_command(sources: Path) -> list[str]:
    return [sys.executable, "-m", "collector", "crawl", str(sources)]


def finished_count(manifest: Path) -> int:
    """Images a running crawl has finished (any status but pending); 0 before its schema."""
    if not manifest.exists():
        return 0
    db = sqlite3.connect(f"file:{manifest}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute("SELECT COUNT(*) FROM images WHERE status != 'pending'").fetchone()[0]
    except sqlite3.OperationalError:      # schema not created yet, or busy
        return 0
    finally:
        db.close()


def wait_until_finished(proc: subprocess.Popen, manifest: Path, images: int,
                        what: str) -> None:
    """Poll (bounded: ~120 s) until the crawl `proc` has finished `images` images; fail if
    it ended first (`what` says what it was meant to still be running for)."""
    for _ in range(1200):
        if proc.poll() is not None or finished_count(manifest) >= images:
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"the crawl ended before {what}"
