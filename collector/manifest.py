"""The crawl's memory: one SQLite file (WAL) holding every page and every image seen.

Everything the collector knows lives here, so a crawl killed at any point (Ctrl-C, kill -9)
resumes from this file alone: pending rows are retried, finished rows are never redone, and
UNIQUE keys make re-discovery a no-op instead of a duplicate row.

Location: `<output_dir>/manifest.sqlite` (MANIFEST_FILE); image files live beside it under
`<output_dir>/images/` and `images.path` is relative to `<output_dir>`.

Schema (only ever ADD columns or tables; the review page reads and writes this file)
------
images: one row per (label, image url) discovered.
    id, url, label, product_id, product_title, product_url, page_url (listing page it was
    found on), shop (host of the image url), position (card index on its page),
    status, reason, detail, http_status, attempts,
    bytes, width, height, format, sha256, phash (16 hex digits, imagehash.phash),
    group_id (near-duplicate cluster id, shared across labels; the id of the cluster's
    representative image), dup_of (id of the kept image this one duplicates),
    path (content-addressed file, relative to the manifest's folder),
    created_at, updated_at, downloaded_at (unix seconds),
    review_status ('approved' | 'rejected' | NULL = not reviewed),
    review_label (relabelled to; the effective label is COALESCE(review_label, label)),
    review_reason, reviewed_at,
    found_under (the category whose listing found it; differs from label when label_rules
    split that listing), title_verdict ('on_topic' | 'off_topic' | 'unmatched' | NULL = no
    rule applies or no title), title_rule (the rule that decided, e.g. "exclude 'blouse'"),
    extra (JSON: the site profile's extra card fields, e.g. {"price": "$19.99"}),
    attributes (JSON: attribute -> value from the attribute rules, "unknown" when unclear),
    review_attributes (JSON: attribute -> value a reviewer set; wins over `attributes` and is
    never touched by the rules; see EFFECTIVE_ATTRIBUTES_SQL).

    status, in the order an image moves through them:
      pending     discovered on a page, not downloaded yet (resume retries these)
      failed      download gave up: reason http_404, http_500, timeout, too_large, ...
      blocked     robots.txt disallows the image url
      rejected    bytes are not a usable image: reason not_an_image, corrupt, empty,
                  too_many_pixels (decompression bomb), too_small; or its title ruled it
                  out (not downloaded): off_topic_title, no_label_rule (detail: the rule)
      downloaded  valid, hashed and stored; waiting for the dedup pass
      ok          kept: the representative of its near-duplicate cluster within its label
      duplicate   same or near-same image as `dup_of` in the same label (reason
                  exact_duplicate | near_duplicate); stored but not exported
      conflict    its cluster holds images under two or more labels (reason names them);
                  left out of the export unless a reviewer approves it

pages: one row per (label, url) of a listing page or product page.
    id, url, label, kind ('listing' | 'product'), page_no (1-based along pagination),
    parent_url, product_id, product_title (product pages), status ('pending' | 'done' |
    'failed' | 'blocked'), reason, http_status, n_found (cards or images found),
    next_url, attempts, created_at, fetched_at.

meta: key/value (schema_version).

Export rule (collector.export): an image is exported when review_status is not 'rejected' and
either status = 'ok', or review_status = 'approved' and status is 'duplicate' or 'conflict'
(the reviewer resolved it). Its label is COALESCE(review_label, label); its attributes are
`attributes` with `review_attributes` laid over them.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.sqlite"

IMAGE_STATUSES = ("pending", "failed", "blocked", "rejected", "downloaded", "ok", "duplicate",
                  "conflict")
PAGE_STATUSES = ("pending", "done", "failed", "blocked")
REVIEW_STATUSES = ("approved", "rejected")

# The label an image counts under, after review.
EFFECTIVE_LABEL_SQL = "COALESCE(review_label, label)"
# Attribute values after review: a reviewer's value wins, key by key.
EFFECTIVE_ATTRIBUTES_SQL = ("CASE WHEN review_attributes IS NULL THEN attributes "
                            "ELSE json_patch(COALESCE(attributes, '{}'), review_attributes) END")
# Which rows go into a dataset (see the module docstring).
EXPORTABLE_SQL = (
    "(review_status IS NULL OR review_status != 'rejected') AND "
    "(status = 'ok' OR (review_status = 'approved' AND status IN ('duplicate', 'conflict')))"
)
# Rows whose bytes are valid and stored (the dedup pass works on these).
STORED_STATUSES = ("downloaded", "ok", "duplicate", "conflict")
# Rejections decided by title rules (not by the bytes): re-applying rules may undo them.
RULE_REASONS = ("off_topic_title", "no_label_rule")
# Columns added after schema version 1: older manifests get them on open.
_ADDED_COLUMNS = {"found_under": "TEXT", "title_verdict": "TEXT", "title_rule": "TEXT",
                  "extra": "TEXT", "attributes": "TEXT",
                  "review_attributes": "TEXT"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pages (
    id            INTEGER PRIMARY KEY,
    url           TEXT NOT NULL,
    label         TEXT NOT NULL,
    kind          TEXT NOT NULL DEFAULT 'listing',
    page_no       INTEGER NOT NULL DEFAULT 1,
    parent_url    TEXT,
    product_id    TEXT,
    product_title TEXT,
    status        TEXT NOT NULL DEFAULT 'pending',
    reason        TEXT,
    http_status   INTEGER,
    n_found       INTEGER,
    next_url      TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    created_at    REAL NOT NULL,
    fetched_at    REAL,
    UNIQUE (label, url)
);
CREATE INDEX IF NOT EXISTS pages_status ON pages (status, kind);
CREATE TABLE IF NOT EXISTS images (
    id            INTEGER PRIMARY KEY,
    url           TEXT NOT NULL,
    label         TEXT NOT NULL,
    product_id    TEXT,
    product_title TEXT,
    product_url   TEXT,
    page_url      TEXT,
    shop          TEXT,
    position      INTEGER,
    status        TEXT NOT NULL DEFAULT 'pending',
    reason        TEXT,
    detail        TEXT,
    http_status   INTEGER,
    attempts      INTEGER NOT NULL DEFAULT 0,
    bytes         INTEGER,
    width         INTEGER,
    height        INTEGER,
    format        TEXT,
    sha256        TEXT,
    phash         TEXT,
    group_id      INTEGER,
    dup_of        INTEGER,
    path          TEXT,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    downloaded_at REAL,
    review_status TEXT,
    review_label  TEXT,
    review_reason TEXT,
    reviewed_at   REAL,
    found_under   TEXT,
    title_verdict TEXT,
    title_rule    TEXT,
    extra         TEXT,
    attributes    TEXT,
    review_attributes TEXT,
    UNIQUE (label, url)
);
CREATE INDEX IF NOT EXISTS images_status ON images (status);
CREATE INDEX IF NOT EXISTS images_sha ON images (sha256);
CREATE INDEX IF NOT EXISTS images_product ON images (label, shop, product_id);
"""


def open_manifest(output_dir: str | Path) -> Manifest:
    """The manifest of a collection folder (created if missing)."""
    return Manifest(Path(output_dir) / MANIFEST_FILE)


class Manifest:
    """A thin, typed door to the SQLite file. One instance per process; not thread-safe."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.root = self.path.parent
        self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL loses nothing on a process kill (only on power loss) and is much faster.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=30000")
        self.db.executescript(_SCHEMA)
        have = {row[1] for row in self.db.execute("PRAGMA table_info(images)")}
        for column, kind in _ADDED_COLUMNS.items():
            if column not in have:
                self.db.execute(f"ALTER TABLE images ADD COLUMN {column} {kind}")
        self.db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),))

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing, COMMIT included: when the COMMIT fails (a full disk: SQLITE_FULL)
        the transaction is rolled back too, so the connection is usable again and the file
        holds exactly what earlier transactions committed."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back on its own (it does on SQLITE_FULL): then ROLLBACK
            # would fail with "no transaction is active" and hide the real error.
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    # -- pages ---------------------------------------------------------------------------
    def add_page(self, url: str, label: str, kind: str = "listing", page_no: int = 1,
                 parent_url: str | None = None, product_id: str | None = None,
                 product_title: str | None = None) -> int | None:
        """Queue a page: its id, or None if it was already known (resume, another path)."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO pages (url, label, kind, page_no, parent_url, product_id, "
            "product_title, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (url, label, kind, page_no, parent_url, product_id, product_title, time.time()))
        return cur.lastrowid if cur.rowcount == 1 else None

    def pending_pages(self, kind: str | None = None) -> list[sqlite3.Row]:
        sql = "SELECT * FROM pages WHERE status = 'pending'"
        args: tuple = ()
        if kind:
            sql += " AND kind = ?"
            args = (kind,)
        return self.db.execute(sql + " ORDER BY label, page_no, id", args).fetchall()

    def finish_page(self, page_id: int, status: str, reason: str | None = None,
                    http_status: int | None = None, n_found: int | None = None,
                    next_url: str | None = None) -> None:
        assert status in PAGE_STATUSES, status
        self.db.execute(
            "UPDATE pages SET status = ?, reason = ?, http_status = ?, n_found = ?, "
            "next_url = ?, attempts = attempts + 1, fetched_at = ? WHERE id = ?",
            (status, reason, http_status, n_found, next_url, time.time(), page_id))

    # -- images --------------------------------------------------------------------------
    def add_image(self, url: str, label: str, *, product_id: str | None = None,
                  product_title: str | None = None, product_url: str | None = None,
                  page_url: str | None = None, shop: str | None = None,
                  position: int | None = None, found_under: str | None = None,
                  title_verdict: str | None = None, title_rule: str | None = None,
                  extra: dict[str, str] | None = None) -> int | None:
        """Record a discovered image: its id, or None if (label, url) is already known."""
        now = time.time()
        cur = self.db.execute(
            "INSERT OR IGNORE INTO images (url, label, product_id, product_title, product_url, "
            "page_url, shop, position, found_under, title_verdict, title_rule, extra, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (url, label, product_id, product_title, product_url, page_url, shop, position,
             found_under, title_verdict, title_rule,
             json.dumps(extra, sort_keys=True) if extra else None, now, now))
        return cur.lastrowid if cur.rowcount == 1 else None

    def has_product(self, label: str, shop: str | None, product_id: str) -> bool:
        """The same product seen on another page of this label counts once."""
        row = self.db.execute(
            "SELECT 1 FROM images WHERE label = ? AND shop IS ? AND product_id = ? "
            "UNION ALL SELECT 1 FROM pages WHERE kind = 'product' AND label = ? "
            "AND product_id = ? LIMIT 1", (label, shop, product_id, label, product_id)).fetchone()
        return row is not None

    def count_products(self, label: str) -> int:
        """Images discovered for a label plus product pages still to open (limit checks);
        products its title rules turned away do not count."""
        images = self.db.execute(
            "SELECT COUNT(*) FROM images WHERE label = ? AND NOT (status = 'rejected' AND "
            f"reason IN {RULE_REASONS!r})", (label,)).fetchone()[0]
        pages = self.db.execute(
            "SELECT COUNT(*) FROM pages WHERE label = ? AND kind = 'product' AND status != 'done'",
            (label,)).fetchone()[0]
        return images + pages

    def image(self, image_id: int) -> sqlite3.Row:
        return self.db.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()

    def page(self, page_id: int) -> sqlite3.Row:
        return self.db.execute("SELECT * FROM pages WHERE id = ?", (page_id,)).fetchone()

    def stored_copy(self, url: str) -> sqlite3.Row | None:
        """Another row with the same URL already downloaded (same product, other label)."""
        marks = ",".join("?" * len(STORED_STATUSES))
        return self.db.execute(
            f"SELECT * FROM images WHERE url = ? AND status IN ({marks}) LIMIT 1",
            (url, *STORED_STATUSES)).fetchone()

    def retry_failed(self) -> int:
        """Put failed pages and images back in the queue (`collector crawl --retry-failed`)."""
        pages = self.db.execute("UPDATE pages SET status = 'pending' WHERE status = 'failed'")
        images = self.db.execute(
            "UPDATE images SET status = 'pending' WHERE status = 'failed'")
        return pages.rowcount + images.rowcount

    def pending_images(self) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT * FROM images WHERE status = 'pending' ORDER BY label, id").fetchall()

    def mark_stored(self, image_id: int, *, path: str, size: int, width: int, height: int,
                    fmt: str, sha256: str, phash: str, http_status: int | None = 200) -> None:
        now = time.time()
        self.db.execute(
            "UPDATE images SET status = 'downloaded', reason = NULL, detail = NULL, path = ?, "
            "bytes = ?, width = ?, height = ?, format = ?, sha256 = ?, phash = ?, "
            "http_status = ?, attempts = attempts + 1, downloaded_at = ?, updated_at = ? "
            "WHERE id = ?",
            (path, size, width, height, fmt, sha256, phash, http_status, now, now, image_id))

    def mark_unusable(self, image_id: int, status: str, reason: str, detail: str = "",
                      http_status: int | None = None, size: int | None = None) -> None:
        """A final 'failed' / 'blocked' / 'rejected' outcome, with its reason."""
        assert status in ("failed", "blocked", "rejected"), status
        self.db.execute(
            "UPDATE images SET status = ?, reason = ?, detail = ?, http_status = ?, bytes = ?, "
            "attempts = attempts + 1, updated_at = ? WHERE id = ?",
            (status, reason, detail[:500], http_status, size, time.time(), image_id))

    def stored_images(self) -> list[sqlite3.Row]:
        marks = ",".join("?" * len(STORED_STATUSES))
        return self.db.execute(
            f"SELECT id, label, {EFFECTIVE_LABEL_SQL} AS effective_label, sha256, phash, width, "
            f"height, review_status FROM images WHERE status IN ({marks}) ORDER BY id",
            STORED_STATUSES).fetchall()

    def set_dedup(self, outcomes: Iterable[tuple[int, str, str | None, int, int | None]]) -> None:
        """Write (id, status, reason, group_id, dup_of) from the dedup pass in one transaction."""
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "UPDATE images SET status = ?, reason = ?, group_id = ?, dup_of = ?, "
                "updated_at = ? WHERE id = ?",
                [(status, reason, group, dup_of, now, image_id)
                 for image_id, status, reason, group, dup_of in outcomes])

    def set_review(self, image_id: int, status: str | None, label: str | None = None,
                   reason: str | None = None) -> None:
        """What the review page records (status None clears a review)."""
        assert status is None or status in REVIEW_STATUSES, status
        self.db.execute(
            "UPDATE images SET review_status = ?, review_label = ?, review_reason = ?, "
            "reviewed_at = ? WHERE id = ?",
            (status, label, reason, None if status is None and label is None else time.time(),
             image_id))

    def cluster_keys(self) -> dict[int, str]:
        """group_id -> the smallest sha256 among the cluster's stored members: a name for
        the cluster that depends on its content only (ids follow arrival order)."""
        marks = ",".join("?" * len(STORED_STATUSES))
        return {row[0]: row[1] for row in self.db.execute(
            f"SELECT group_id, MIN(sha256) FROM images WHERE group_id IS NOT NULL "
            f"AND sha256 IS NOT NULL AND status IN ({marks}) GROUP BY group_id",
            STORED_STATUSES)}

    def exportable_images(self) -> list[sqlite3.Row]:
        return self.db.execute(
            f"SELECT *, {EFFECTIVE_LABEL_SQL} AS effective_label, "
            f"{EFFECTIVE_ATTRIBUTES_SQL} AS effective_attributes FROM images "
            f"WHERE {EXPORTABLE_SQL} AND path IS NOT NULL ORDER BY id").fetchall()

    # -- summaries -----------------------------------------------------------------------
    def image_counts(self) -> dict[str, dict[str, int]]:
        """{label: {status: count}} over discovered images."""
        out: dict[str, dict[str, int]] = {}
        for row in self.db.execute(
                "SELECT label, status, COUNT(*) FROM images GROUP BY label, status"):
            out.setdefault(row[0], {})[row[1]] = row[2]
        return out

    def attribute_counts(self) -> dict[str, dict[str, int]]:
        """{attribute: {value: images}} over the images export would write (after review)."""
        out: dict[str, dict[str, int]] = {}
        for row in self.db.execute(
                f"SELECT a.key, a.value, COUNT(*) FROM images, "
                f"json_each({EFFECTIVE_ATTRIBUTES_SQL}) a WHERE (attributes IS NOT NULL OR "
                f"review_attributes IS NOT NULL) AND {EXPORTABLE_SQL} GROUP BY 1, 2 ORDER BY 1, 2"):
            out.setdefault(row[0], {})[row[1]] = row[2]
        return out

    def title_counts(self) -> dict[str, int]:
        """{title_verdict: images} among stored images (flagged ones are 'off_topic')."""
        marks = ",".join("?" * len(STORED_STATUSES))
        return {row[0]: row[1] for row in self.db.execute(
            f"SELECT title_verdict, COUNT(*) FROM images WHERE title_verdict IS NOT NULL "
            f"AND status IN ({marks}) GROUP BY 1", STORED_STATUSES)}

    def page_counts(self) -> dict[str, int]:
        return {row[0]: row[1] for row in self.db.execute(
            "SELECT status, COUNT(*) FROM pages GROUP BY status")}

    def reasons(self) -> dict[tuple[str, str], int]:
        """{(status, reason): count} for everything that was not kept."""
        return {(row[0], row[1]): row[2] for row in self.db.execute(
            "SELECT status, reason, COUNT(*) FROM images WHERE reason IS NOT NULL "
            "GROUP BY status, reason ORDER BY COUNT(*) DESC")}

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return self.db.execute(sql, args).fetchall()
