"""kill -9 in the middle of a crawl, run the same command again: the same images, no
duplicate rows, no partial files, as an uninterrupted crawl of the same shop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from collector.demo_shop import write_sources
from tests.collector.conftest import (
    crawl_command,
    finished_count,
    outcome,
    rows,
    start_shop,
    wait_until_finished,
)

REPO = Path(__file__).resolve().parents[2]


def test_collector_kill_9_midway_then_resume(crawled, tmp_path):
    shop = start_shop()            # a fresh shop: the resumed crawl meets every fault too
    try:
        sources = write_sources(shop, tmp_path / "sources.yaml", "collected")
        manifest = tmp_path / "collected" / "manifest.sqlite"
        proc = subprocess.Popen(crawl_command(sources), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_until_finished(proc, manifest, 80, "it could be killed")
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        killed_at = finished_count(manifest)
        pending = rows(tmp_path / "collected",
                       "SELECT (SELECT COUNT(*) FROM images WHERE status = 'pending') + "
                       "(SELECT COUNT(*) FROM pages WHERE status = 'pending') AS n")[0]["n"]
        assert pending > 0 or killed_at < 300, "nothing was left to resume"

        again = subprocess.run(crawl_command(sources), check=False, cwd=REPO,
                               capture_output=True, text=True,
                               timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
    finally:
        shop.stop()

    resumed = tmp_path / "collected"
    assert outcome(resumed) == outcome(crawled)
    assert not rows(resumed, "SELECT id FROM images WHERE status = 'pending'")
    assert not list(resumed.rglob("*.tmp"))
    files = {p.relative_to(resumed).as_posix() for p in (resumed / "images").rglob("*.*")}
    assert files == {r["path"] for r in rows(resumed, "SELECT path FROM images "
                                                      "WHERE path IS NOT NULL")}


def test_collector_ctrl_c_keeps_finished_work(tmp_path):
    """SIGINT: exit 130 with a hint, finished images kept; the same command then completes."""
    shop = start_shop(per_label=12)
    try:
        sources = write_sources(shop, tmp_path / "sources.yaml", "collected")
        manifest = tmp_path / "collected" / "manifest.sqlite"
        # Python ignores SIGINT when started with it ignored (a background job): re-arm it,
        # as a terminal's Ctrl-C would find it.
        armed = [sys.executable, "-c",
                 ("import runpy, signal, sys; signal.signal(signal.SIGINT, "
                 "signal.default_int_handler); sys.argv = ['collector', 'crawl', sys.argv[1]]; "
                 "runpy.run_module('collector', run_name='__main__')"), str(sources)]
        proc = subprocess.Popen(armed, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            wait_until_finished(proc, manifest, 20, "it could be interrupted")
            proc.send_signal(signal.SIGINT)
            output, _ = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 130, output
        assert "run the same command again to resume" in output
        assert finished_count(manifest) >= 20
        again = subprocess.run(crawl_command(sources), check=False, cwd=REPO,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
    finally:
        shop.stop()
    collection = tmp_path / "collected"
    assert not rows(collection, "SELECT id FROM images WHERE status IN ('pending', 'downloaded')")
    listed = {(label, pid) for label, ids in shop.plan.listings.items() for pid in ids}
    assert {(r["label"], r["product_id"]) for r in rows(
        collection, "SELECT label, product_id FROM images")} == listed


def test_collector_lost_files_are_fetched_again(tmp_path):
    """A file that vanished or was cut short (a machine crash, a stray rm) is not trusted: the
    next run sends its row back to pending and downloads it again."""
    import asyncio

    from collector.config import load_sources
    from collector.crawl import crawl

    shop = start_shop(faults=(), per_label=3)
    try:
        sources = write_sources(shop, tmp_path / "sources.yaml", "collected")
        config = load_sources(sources)
        asyncio.run(crawl(config))
        collection = config.output_dir
        before = outcome(collection)
        stored = rows(collection, "SELECT DISTINCT path FROM images WHERE path IS NOT NULL")
        gone, short = (collection / stored[0]["path"]), (collection / stored[1]["path"])
        lost_rows = len(rows(collection, "SELECT id FROM images WHERE path IN (?, ?)",
                             (stored[0]["path"], stored[1]["path"])))
        gone.unlink()
        short.write_bytes(short.read_bytes()[:100])
        hits = sum(shop.hits.values())
        asyncio.run(crawl(config))
    finally:
        shop.stop()
    assert outcome(collection) == before
    assert gone.is_file() and len(short.read_bytes()) > 100
    # only the rows of the two lost files were fetched again (+ robots.txt, once per run)
    assert sum(shop.hits.values()) - hits == lost_rows + 1
