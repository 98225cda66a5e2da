"""The disk fills in the middle of a crawl: a clean stop, a manifest that tells the truth, and
the same command finishing the job once there is room.

Real full disks: a small tmpfs mounted over the image store (the photos fill it) or over the
collection folder (a filler file takes the rest of it while the crawl runs, so SQLite is the
one refused), the crawl as its real command against the faulty demo shop. Each case then
checks the stop (exit 4, one message naming the disk, no traceback, no image recorded as bad
for it), the manifest (SQLite's integrity check; every stored row's file there with its
sha256; no partial file under a final name), makes room and runs the same command again,
which must end exactly where an uninterrupted crawl of the same shop ends.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from collector.demo_shop import write_sources
from collector.manifest import STORED_STATUSES, open_manifest
from collector.store import RESERVE_FILE, out_of_space
from tests.collector.conftest import (
    crawl_command,
    outcome,
    rows,
    start_shop,
    wait_until_finished,
)

REPO = Path(__file__).resolve().parents[2]
PAGE = 4096                       # tmpfs hands out space in pages


@pytest.fixture
def tmpfs():
    """mount(folder, size_kb): a tmpfs of that size on `folder`; unmounted at teardown."""
    if not shutil.which("mount"):
        pytest.skip("no mount(8) here: the disk-full tests need a real small file system")
    mounted: list[Path] = []

    def mount(folder: Path, size_kb: int) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                               str(folder)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs on {folder} ({done.stderr.strip()}): the "
                        "disk-full tests need root or CAP_SYS_ADMIN")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):   # inner mounts first
        if subprocess.run(["umount", str(folder)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def remount(folder: Path, size_kb: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_kb}k", str(folder)], check=True)


def run_crawl(sources: Path) -> subprocess.CompletedProcess:
    return subprocess.run(crawl_command(sources), cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)


def store_bytes(collection: Path) -> int:
    """Space the image files of a collection take on a tmpfs."""
    return sum(-(-p.stat().st_size // PAGE) * PAGE
               for p in (collection / "images").rglob("*") if p.is_file())


def fill(folder: Path, name: str = "filler") -> Path:
    """A filler file that takes every last page of `folder`'s file system."""
    filler = folder / name
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for chunk in (b"\0" * (1 << 16), b"\0" * PAGE):
            for _ in range(1 << 16):     # bounded: 4 GiB of 64 KiB chunks at most
                try:
                    if os.write(fd, chunk) < len(chunk):
                        break
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler


def assert_stopped_cleanly(done: subprocess.CompletedProcess, names: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 4, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    message = [line for line in done.stderr.splitlines() if line.startswith("disk full:")]
    assert len(message) == 1, done.stderr[-3000:]
    assert names in message[0] and "run the same command again" in message[0], message[0]


def assert_manifest_true(collection: Path, uninterrupted: Path) -> dict[str, int]:
    """The manifest is whole and says only what is so; returns its status counts."""
    db = sqlite3.connect(collection / "manifest.sqlite")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()
    marks = ",".join("?" * len(STORED_STATUSES))
    stored = rows(collection, f"SELECT * FROM images WHERE status IN ({marks})",
                  STORED_STATUSES)
    for row in stored:                   # every stored row's file is there, whole
        data = (collection / row["path"]).read_bytes()
        assert len(data) == row["bytes"]
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
    for file in (collection / "images").rglob("*"):   # no partial file under a final name
        if file.is_file():
            assert not file.name.endswith(".tmp"), file
            assert hashlib.sha256(file.read_bytes()).hexdigest() == file.name.split(".")[0]
    # Nothing was recorded as bad because the disk was full: every finished row says what
    # the same row says after an uninterrupted crawl (kept ones await dedup: 'downloaded').
    final = {(r["label"], r["product_id"]): (r["status"], r["reason"])
             for r in rows(uninterrupted, "SELECT label, product_id, status, reason "
                                          "FROM images")}
    counts: dict[str, int] = {}
    for row in rows(collection, "SELECT label, product_id, status, reason FROM images"):
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        if row["status"] == "pending":
            continue
        status, reason = final[(row["label"], row["product_id"])]
        if row["status"] == "downloaded":
            assert status in STORED_STATUSES, (row["product_id"], status, reason)
        else:
            assert (row["status"], row["reason"]) == (status, reason), row["product_id"]
    return counts


def assert_finished_like(collection: Path, uninterrupted: Path) -> None:
    assert outcome(collection) == outcome(uninterrupted)
    assert not rows(collection, "SELECT id FROM images WHERE status IN ('pending', "
                                "'downloaded')")
    assert not rows(collection, "SELECT id FROM pages WHERE status = 'pending'")
    files = {p.relative_to(collection).as_posix() for p in (collection / "images").rglob("*")
             if p.is_file()}
    assert files == {r["path"] for r in rows(collection, "SELECT path FROM images "
                                                         "WHERE path IS NOT NULL")}
    assert not (collection / RESERVE_FILE).exists()


def test_collector_image_store_fills_midway_then_resumes(crawled, tmp_path, tmpfs):
    """The photos fill their disk (a tmpfs half the size of the whole crawl's files): the
    crawl stops at the first refused write; remounted larger, the same command finishes."""
    images = tmpfs(tmp_path / "collected" / "images", store_bytes(crawled) // 2 // 1024)
    shop = start_shop()
    try:
        sources = write_sources(shop, tmp_path / "sources.yaml", "collected")
        stopped = run_crawl(sources)
        assert_stopped_cleanly(stopped, str(images))
        assert "No space left on device" in stopped.stderr
        collection = tmp_path / "collected"
        counts = assert_manifest_true(collection, crawled)
        assert counts.get("downloaded", 0) > 50 and counts.get("pending", 0) > 0, counts

        remount(images, store_bytes(crawled) * 2 // 1024)
        again = run_crawl(sources)
        assert again.returncode == 0, again.stderr[-3000:]
    finally:
        shop.stop()
    assert_finished_like(collection, crawled)


def test_collector_manifest_disk_fills_midway_then_resumes(crawled, tmp_path, tmpfs):
    """The manifest's disk fills (another file takes it while the crawl runs; the photos
    have a disk of their own): SQLite is refused, the crawl stops with what it committed;
    run again on the still-full disk it stops again at once, changing nothing; with the
    filler gone it finishes. (A whole crawl of the shop writes ~670 WAL frames, under
    SQLite's 1000-frame checkpoint, so each commit grows the WAL: the first one after the
    filler is refused.)"""
    collection = tmpfs(tmp_path / "collected", 8 * 1024)
    tmpfs(collection / "images", store_bytes(crawled) * 2 // 1024)
    manifest = collection / "manifest.sqlite"
    shop = start_shop()
    try:
        sources = write_sources(shop, tmp_path / "sources.yaml", "collected")
        proc = subprocess.Popen(crawl_command(sources), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            wait_until_finished(proc, manifest, 40, "its disk could be filled")
            filler = fill(collection)
            out, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        stopped = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        assert_stopped_cleanly(stopped, str(manifest))
        assert "database or disk is full" in stopped.stderr
        counts = assert_manifest_true(collection, crawled)
        assert counts.get("pending", 0) > 0, counts
        before = sorted(tuple(r) for r in rows(collection, "SELECT * FROM images"))

        more = fill(collection, "filler-2")   # what the stop gave back: full again
        still = run_crawl(sources)
        assert_stopped_cleanly(still, str(collection))
        more.unlink()                     # (room for SQLite's index file when reading)
        assert sorted(tuple(r) for r in rows(collection, "SELECT * FROM images")) == before

        filler.unlink()
        again = run_crawl(sources)
        assert again.returncode == 0, again.stderr[-3000:]
    finally:
        shop.stop()
    assert_finished_like(collection, crawled)


def test_collector_tells_a_full_disk_from_other_write_errors():
    assert out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not out_of_space(OSError(errno.EIO, "Input/output error"))
    assert not out_of_space(OSError(errno.EACCES, "Permission denied"))
    assert not out_of_space(sqlite3.OperationalError("database is locked"))
    assert not out_of_space(ValueError("No space left on device"))


def test_collector_manifest_survives_a_full_database(tmp_path):
    """SQLITE_FULL mid-transaction (here a database at its page limit: SQLite's same error
    as a full disk, and it rolls the transaction back by itself): what comes out is that
    error, not "cannot rollback", and the manifest holds what it held, usable again."""
    with open_manifest(tmp_path) as manifest:
        manifest.add_image("http://127.0.0.1:1/img/kept.jpg", "hat")
        pages = manifest.db.execute("PRAGMA page_count").fetchone()[0]
        manifest.db.execute(f"PRAGMA max_page_count = {pages + 2}")
        with pytest.raises(sqlite3.OperationalError) as raised, manifest.transaction():
            for i in range(2000):
                manifest.add_image(f"http://127.0.0.1:1/img/{i}-{'x' * 200}.jpg", "hat")
        assert raised.value.sqlite_errorcode == sqlite3.SQLITE_FULL, raised.value
        assert out_of_space(raised.value) and not manifest.db.in_transaction
        assert [r["url"] for r in manifest.query("SELECT url FROM images")] == [
            "http://127.0.0.1:1/img/kept.jpg"]
        with manifest.transaction():
            manifest.add_image("http://127.0.0.1:1/img/after.jpg", "hat")
        assert len(manifest.query("SELECT id FROM images")) == 2
