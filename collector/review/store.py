"""The review page's reads and writes on the collector's manifest (SQLite, WAL).

Decisions go into the manifest's own review columns (review_status, review_label,
review_reason, reviewed_at, review_attributes; see collector/manifest.py), so `collector export` honours them
with no hand-off file. Each action is ONE transaction that writes those columns and appends
the previous values to `review_actions`, so undo can restore exactly what was there.

Tables this module adds beside the collector's (CREATE ... IF NOT EXISTS, never ALTERs theirs):
    review_actions      one row per image per action: before/after values, batch, undone_at
    review_predictions  out-of-sample model predictions per image (collector.review.rank)

Files are served only from `<collection>/images/` (IMAGE_DIR): a row's path is resolved
(symlinks included) and refused if it lands anywhere else.

Paging is keyset (WHERE (sort key, id) after the cursor ... LIMIT n): page 500 of 20,000
images costs what page 1 costs, where OFFSET would scan every row before it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from collector.manifest import (
    EFFECTIVE_ATTRIBUTES_SQL,
    EFFECTIVE_LABEL_SQL,
    EXPORTABLE_SQL,
    MANIFEST_FILE,
    STORED_STATUSES,
    Manifest,
)

REVIEW_SCHEMA = """
CREATE TABLE IF NOT EXISTS review_actions (
    id            INTEGER PRIMARY KEY,
    batch         INTEGER NOT NULL,
    image_id      INTEGER NOT NULL,
    action        TEXT NOT NULL,
    before_status TEXT, before_label TEXT, before_reason TEXT, before_at REAL,
    after_status  TEXT, after_label  TEXT, after_reason  TEXT,
    at            REAL NOT NULL,
    undone_at     REAL,
    before_attributes TEXT, after_attributes TEXT
);
CREATE INDEX IF NOT EXISTS review_actions_batch ON review_actions (batch);
CREATE TABLE IF NOT EXISTS review_predictions (
    image_id        INTEGER PRIMARY KEY,
    given_label     TEXT NOT NULL,
    predicted_label TEXT NOT NULL,
    predicted_prob  REAL NOT NULL,
    self_confidence REAL NOT NULL,
    suspect_score   REAL NOT NULL,
    confident       INTEGER NOT NULL,
    probs           TEXT NOT NULL,
    model           TEXT NOT NULL,
    computed_at     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS review_predictions_suspect
    ON review_predictions (suspect_score DESC, image_id);
CREATE INDEX IF NOT EXISTS review_images_group ON images (group_id);
CREATE INDEX IF NOT EXISTS review_images_effective_label
    ON images (COALESCE(review_label, label), id);
CREATE INDEX IF NOT EXISTS review_images_shop ON images (shop, id);
"""

IMAGE_DIR = "images"   # the collector's content-addressed store, beside the manifest

Action = Literal["approve", "reject", "relabel", "accept_suggestion", "clear", "set_attribute"]
# Columns review_actions gained after its first release: older manifests get them on open.
_ADDED_ACTION_COLUMNS = ("before_attributes", "after_attributes")
ReviewFilter = Literal["all", "todo", "approved", "rejected", "relabelled"]
StatusFilter = Literal["all", "ok", "duplicate", "conflict", "downloaded"]
GroupKind = Literal["all", "duplicate", "conflict"]
# off_topic: a title rule flagged it (sources.yaml `off_topic: flag`)
TitleFilter = Literal["all", "off_topic", "on_topic"]

_STORED = "(" + ",".join(f"'{s}'" for s in STORED_STATUSES) + ")"
# Cards show only images whose bytes are stored; failed/blocked/unusable rows have no picture.
# The unary + keeps SQLite off the status index here: nearly every row passes this test, and
# walking the primary key (or the label index) in page order lets LIMIT stop early.
_VISIBLE = f"+i.status IN {_STORED} AND i.path IS NOT NULL"
_COLUMNS = f"""
    i.id, i.label, {EFFECTIVE_LABEL_SQL} AS effective_label, i.status, i.reason, i.group_id,
    i.dup_of, i.shop, i.product_id, i.product_title, i.product_url, i.page_url, i.url,
    i.width, i.height, i.bytes, i.sha256, i.path, i.review_status, i.review_label,
    i.review_reason, i.reviewed_at, i.title_verdict, i.title_rule, i.extra, i.attributes,
    i.review_attributes, ({EXPORTABLE_SQL}) AS exported,
    p.predicted_label, p.predicted_prob, p.self_confidence, p.suspect_score, p.confident,
    (SELECT COUNT(*) FROM images g WHERE g.group_id = i.group_id) AS group_size
"""
_FROM = "FROM images i LEFT JOIN review_predictions p ON p.image_id = i.id"


class ReviewError(ValueError):
    """A request the store refuses (unknown image, bad label, nothing to undo...)."""


@dataclass
class Page:
    items: list[dict]
    total: int
    next_cursor: str | None


@dataclass
class ImageQuery:
    label: str | None = None
    review: ReviewFilter = "all"
    status: StatusFilter = "all"
    shop: str | None = None
    group: int | None = None
    min_suspect: float | None = None
    confident_only: bool = False
    text: str | None = None
    title: TitleFilter = "all"
    sort: Literal["id", "suspect"] = "id"
    cursor: str | None = None
    limit: int = 60


class ReviewStore:
    """Opens a short-lived connection per call: safe under the ASGI server's thread pool."""

    def __init__(self, manifest_path: Path):
        self.path = Path(manifest_path)
        if self.path.is_dir():  # the collection folder itself is fine too
            self.path = self.path / MANIFEST_FILE
        if not self.path.is_file():
            raise FileNotFoundError(
                f"no manifest at {self.path}; run `collector crawl` first, or pass --data")
        self.root = self.path.parent
        Manifest(self.path).close()  # the collector's schema (idempotent), WAL mode on
        with self._connect() as db:
            db.executescript(REVIEW_SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(review_actions)")}
            for column in _ADDED_ACTION_COLUMNS:
                if column not in have:
                    db.execute(f"ALTER TABLE review_actions ADD COLUMN {column} TEXT")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=30000")
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- reads -------------------------------------------------------------------------------
    def summary(self) -> dict:
        with self._connect() as db:
            labels = [dict(row) for row in db.execute(f"""
                SELECT {EFFECTIVE_LABEL_SQL} AS label, COUNT(*) AS total,
                       SUM(review_status IS NULL) AS todo,
                       SUM(review_status = 'approved') AS approved,
                       SUM(review_status = 'rejected') AS rejected,
                       SUM(review_label IS NOT NULL) AS relabelled,
                       SUM({EXPORTABLE_SQL}) AS exported
                FROM images i WHERE {_VISIBLE} GROUP BY 1 ORDER BY 1""")]
            known = {row["label"] for row in labels}
            for (label,) in db.execute("SELECT DISTINCT label FROM images"):
                if label not in known:  # every label stays a relabel target, even if emptied
                    labels.append({"label": label, "total": 0, "todo": 0, "approved": 0,
                                   "rejected": 0, "relabelled": 0, "exported": 0})
            labels.sort(key=lambda row: row["label"])
            shops = [dict(row) for row in db.execute(
                f"SELECT shop, COUNT(*) AS total FROM images i WHERE {_VISIBLE} "
                "GROUP BY shop ORDER BY total DESC")]
            statuses = {row[0]: row[1] for row in db.execute(
                f"SELECT status, COUNT(*) FROM images i WHERE {_VISIBLE} GROUP BY status")}
            groups = db.execute(f"""
                SELECT SUM(has_dup), SUM(has_conflict) FROM (
                    SELECT MAX(status = 'duplicate') AS has_dup,
                           MAX(status = 'conflict') AS has_conflict
                    FROM images i WHERE {_VISIBLE} AND group_id IS NOT NULL
                    GROUP BY group_id HAVING COUNT(*) > 1)""").fetchone()
            model = db.execute("SELECT model, COUNT(*) AS n, MAX(computed_at) AS at, "
                               "SUM(confident) AS confident FROM review_predictions "
                               "GROUP BY model ORDER BY at DESC LIMIT 1").fetchone()
            total = db.execute(f"SELECT COUNT(*) FROM images i WHERE {_VISIBLE}").fetchone()[0]
            undoable = db.execute("SELECT COUNT(DISTINCT batch) FROM review_actions "
                                  "WHERE undone_at IS NULL").fetchone()[0]
            attributes: dict[str, dict[str, int]] = {}
            for name, value, n in db.execute(
                    f"SELECT a.key, a.value, COUNT(*) FROM images i, json_each("
                    f"{EFFECTIVE_ATTRIBUTES_SQL}) a WHERE {_VISIBLE} AND (i.attributes IS NOT "
                    "NULL OR i.review_attributes IS NOT NULL) GROUP BY 1, 2 ORDER BY 1, 2"):
                attributes.setdefault(name, {})[value] = n
        return {
            "attributes": attributes,
            "manifest": str(self.path), "total": total, "labels": labels, "shops": shops,
            "statuses": statuses,
            "groups": {"duplicate": groups[0] or 0, "conflict": groups[1] or 0},
            "predictions": dict(model) if model else None, "undoable": undoable,
        }

    def labels(self) -> list[str]:
        with self._connect() as db:
            return [row[0] for row in db.execute(
                "SELECT label FROM images UNION SELECT review_label FROM images "
                "WHERE review_label IS NOT NULL ORDER BY 1")]

    def list_images(self, query: ImageQuery) -> Page:
        page_sql, page_args, count_sql, count_args = build_page_query(query)
        limit = max(1, min(query.limit, 500))
        with self._connect() as db:
            rows = db.execute(page_sql, page_args).fetchall()
            total = db.execute(count_sql, count_args).fetchone()[0]
        items = [_card(row) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = items[-1]
            next_cursor = (f"{last['suspect_score'] if last['suspect_score'] is not None else -1.0}"
                           f":{last['id']}" if query.sort == "suspect" else str(last["id"]))
        return Page(items, total, next_cursor)

    def explain(self, query: ImageQuery) -> list[str]:
        """SQLite's plan for a page query (tests check that it uses an index)."""
        page_sql, page_args, _, _ = build_page_query(query)
        with self._connect() as db:
            return [row["detail"] for row in db.execute(f"EXPLAIN QUERY PLAN {page_sql}",
                                                        page_args)]

    def get(self, image_id: int) -> dict:
        with self._connect() as db:
            row = db.execute(f"SELECT {_COLUMNS} {_FROM} WHERE i.id = ?", (image_id,)).fetchone()
        if row is None:
            raise ReviewError(f"no image with id {image_id}")
        return _card(row)

    def file_for(self, image_id: int) -> tuple[Path, str]:
        """(absolute path of the stored image, thumbnail cache key)."""
        with self._connect() as db:
            row = db.execute("SELECT path, sha256 FROM images WHERE id = ?",
                             (image_id,)).fetchone()
        if row is None or not row["path"]:
            raise ReviewError(f"image {image_id} has no stored file")
        return self.image_path(image_id, row["path"]), row["sha256"] or f"id{image_id}"

    def image_path(self, image_id: int, relative: str) -> Path:
        """The file of a manifest row, refused unless it lies inside the image store: a
        hand-edited or foreign manifest (`/etc/passwd`, `../..`, a symlink out) serves nothing."""
        store = (self.root / IMAGE_DIR).resolve()
        path = (self.root / relative).resolve()
        if not path.is_relative_to(store):
            raise ReviewError(f"image {image_id}: its file {relative!r} is outside the image "
                              f"store {store}; this manifest row was edited by hand or comes "
                              "from another collection")
        return path

    def groups(self, kind: GroupKind = "all", cursor: int | None = None,
               limit: int = 20) -> dict:
        """Near-duplicate clusters (and cross-label conflicts) with their members side by side."""
        having = {"all": "", "duplicate": " AND MAX(status = 'duplicate') = 1",
                  "conflict": " AND MAX(status = 'conflict') = 1"}[kind]
        limit = max(1, min(limit, 100))
        with self._connect() as db:
            ids = [row[0] for row in db.execute(
                f"SELECT group_id FROM images i WHERE {_VISIBLE} AND group_id IS NOT NULL "
                f"AND group_id > ? GROUP BY group_id HAVING COUNT(*) > 1{having} "
                "ORDER BY group_id LIMIT ?", (cursor if cursor is not None else -1, limit + 1))]
            page_ids = ids[:limit]
            members: dict[int, list[dict]] = {gid: [] for gid in page_ids}
            if page_ids:
                marks = ",".join("?" * len(page_ids))
                for row in db.execute(
                        f"SELECT {_COLUMNS} {_FROM} WHERE {_VISIBLE} AND i.group_id IN ({marks}) "
                        "ORDER BY i.group_id, i.status = 'ok' DESC, i.id", page_ids):
                    members[row["group_id"]].append(_card(row))
        out = []
        for gid in page_ids:
            cards = members[gid]
            labels = sorted({card["effective_label"] for card in cards})
            out.append({"group_id": gid, "members": cards, "labels": labels,
                        "conflict": any(card["status"] == "conflict" for card in cards),
                        "resolved": all(card["review_status"] for card in cards)})
        return {"groups": out, "next_cursor": page_ids[-1] if len(ids) > limit else None}

    def history(self, limit: int = 50) -> list[dict]:
        with self._connect() as db:
            return [dict(row) for row in db.execute(
                "SELECT batch, action, COUNT(*) AS images, MIN(at) AS at, "
                "MAX(undone_at) AS undone_at, GROUP_CONCAT(image_id) AS image_ids, "
                "MAX(after_reason) AS reason, MAX(after_label) AS label "
                "FROM review_actions GROUP BY batch ORDER BY batch DESC LIMIT ?", (limit,))]

    # -- writes ------------------------------------------------------------------------------
    def apply(self, action: Action, ids: list[int], reason: str | None = None,
              label: str | None = None, attribute: str | None = None,
              value: str | None = None) -> dict:
        """One decision on one or many images, in one transaction, logged for undo."""
        ids = list(dict.fromkeys(int(i) for i in ids))
        if not ids:
            raise ReviewError("no images selected")
        if action == "set_attribute":
            return self._set_attribute(ids, attribute, value)
        if action == "reject" and not (reason or "").strip():
            reason = "rejected"
        if action == "relabel":
            label = _check_label(label)
        now = time.time()
        with self._transaction() as db:
            rows = _fetch_rows(db, ids)
            batch = _next_batch(db)
            changes = []
            for image_id in ids:
                row = rows[image_id]
                after = _decide(action, row, reason, label)
                if after is None:
                    continue  # e.g. accept_suggestion on an image without a prediction
                _write(db, image_id, *after, at=now)
                _log_action(db, batch, image_id, action, row, after, now)
                changes.append(image_id)
        return {"batch": batch if changes else None, "changed": [self.get(i) for i in changes]}

    def _set_attribute(self, ids: list[int], attribute: str | None,
                       value: str | None) -> dict:
        """A reviewer's attribute value (None: back to what the title rules say); the label
        and review status are left as they are."""
        attribute, value = _check_attribute(attribute, value)
        now = time.time()
        with self._transaction() as db:
            rows = _fetch_rows(db, ids)
            batch = _next_batch(db)
            changes = []
            for image_id in ids:
                row = rows[image_id]
                before = json.loads(row["review_attributes"]) if row["review_attributes"] else {}
                after = {k: v for k, v in before.items() if k != attribute}
                if value is not None:
                    after[attribute] = value
                if after == before:
                    continue
                encoded = json.dumps(after, sort_keys=True) if after else None
                db.execute("UPDATE images SET review_attributes = ?, reviewed_at = ? "
                           "WHERE id = ?", (encoded, now, image_id))
                unchanged = (row["review_status"], row["review_label"],
                             f"{attribute}: {value or 'from title rules'}")
                _log_action(db, batch, image_id, "set_attribute", row, unchanged, now,
                            attributes=(row["review_attributes"], encoded))
                changes.append(image_id)
        return {"batch": batch if changes else None, "changed": [self.get(i) for i in changes]}

    def keep_one(self, group_id: int, keep_id: int) -> dict:
        """Resolve a cluster: approve `keep_id`, reject every other member with why."""
        now = time.time()
        with self._transaction() as db:
            members = db.execute(
                f"SELECT i.id, {EFFECTIVE_LABEL_SQL} AS effective_label, i.review_status, "
                f"i.review_label, i.review_reason, i.reviewed_at FROM images i "
                f"WHERE {_VISIBLE} AND i.group_id = ?", (group_id,)).fetchall()
            by_id = {row["id"]: row for row in members}
            if keep_id not in by_id:
                raise ReviewError(f"image {keep_id} is not in group {group_id}")
            kept_label = by_id[keep_id]["effective_label"]
            batch = _next_batch(db)
            for row in members:
                if row["id"] == keep_id:
                    after = ("approved", row["review_label"], f"kept from group {group_id}")
                elif row["effective_label"] != kept_label:
                    after = ("rejected", row["review_label"],
                             f"conflict: kept #{keep_id} as {kept_label}")
                else:
                    after = ("rejected", row["review_label"], f"duplicate of #{keep_id}")
                _write(db, row["id"], *after, at=now)
                _log_action(db, batch, row["id"], "keep_one", row, after, now)
        return {"batch": batch, "changed": [self.get(row["id"]) for row in members]}

    def undo(self) -> dict:
        """Restore the images of the last action not yet undone (repeat to go further back)."""
        now = time.time()
        with self._transaction() as db:
            found = db.execute("SELECT MAX(batch) FROM review_actions "
                               "WHERE undone_at IS NULL").fetchone()[0]
            if found is None:
                raise ReviewError("nothing to undo")
            rows = db.execute("SELECT * FROM review_actions WHERE batch = ? ORDER BY id DESC",
                              (found,)).fetchall()
            for row in rows:
                db.execute(
                    "UPDATE images SET review_status = ?, review_label = ?, review_reason = ?, "
                    "reviewed_at = ? WHERE id = ?",
                    (row["before_status"], row["before_label"], row["before_reason"],
                     row["before_at"], row["image_id"]))
                if row["action"] == "set_attribute":   # other actions never touch attributes
                    db.execute("UPDATE images SET review_attributes = ? WHERE id = ?",
                               (row["before_attributes"], row["image_id"]))
            db.execute("UPDATE review_actions SET undone_at = ? WHERE batch = ?", (now, found))
        ids = list(dict.fromkeys(row["image_id"] for row in rows))
        return {"batch": found, "action": rows[0]["action"],
                "changed": [self.get(i) for i in ids]}

    # -- predictions -------------------------------------------------------------------------
    def stored_images(self) -> list[sqlite3.Row]:
        """(id, path, sha256, effective_label) of every image with bytes, for ranking."""
        with self._connect() as db:
            return db.execute(
                f"SELECT i.id, i.path, i.sha256, {EFFECTIVE_LABEL_SQL} AS effective_label, "
                f"i.review_status FROM images i WHERE {_VISIBLE} ORDER BY i.id").fetchall()

    def save_predictions(self, rows: list[tuple], model: str) -> None:
        """rows: (image_id, given, predicted, predicted_prob, self_conf, suspect, confident,
        probs dict). Replaces every earlier prediction: one model's view at a time."""
        now = time.time()
        with self._transaction() as db:
            db.execute("DELETE FROM review_predictions")
            db.executemany(
                "INSERT INTO review_predictions (image_id, given_label, predicted_label, "
                "predicted_prob, self_confidence, suspect_score, confident, probs, model, "
                "computed_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                [(image_id, given, predicted, float(prob), float(self_conf), float(suspect),
                  int(confident), json.dumps(probs), model, now)
                 for image_id, given, predicted, prob, self_conf, suspect, confident, probs
                 in rows])


# -- helpers ------------------------------------------------------------------------------------
def build_page_query(query: ImageQuery) -> tuple[str, list, str, list]:
    """(page SQL, its args, count SQL, its args) for one keyset page of filtered cards."""
    where, args = [_VISIBLE], []
    if query.label:
        where.append(f"{EFFECTIVE_LABEL_SQL} = ?")
        args.append(query.label)
    where.append({
        "all": "1", "todo": "i.review_status IS NULL",
        "approved": "i.review_status = 'approved'",
        "rejected": "i.review_status = 'rejected'",
        "relabelled": "i.review_label IS NOT NULL",
    }[query.review])
    if query.status != "all":
        where.append("i.status = ?")
        args.append(query.status)
    if query.shop:
        where.append("i.shop = ?")
        args.append(query.shop)
    if query.group is not None:
        where.append("i.group_id = ?")
        args.append(query.group)
    if query.min_suspect is not None:
        where.append("p.suspect_score >= ?")
        args.append(query.min_suspect)
    if query.confident_only:
        where.append("p.confident = 1")
    if query.title != "all":
        where.append("i.title_verdict = ?")
        args.append(query.title)
    if query.text:
        where.append("i.product_title LIKE ? ESCAPE '\\'")
        escaped = query.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        args.append(f"%{escaped}%")
    filters = " AND ".join(where)
    limit = max(1, min(query.limit, 500))
    if query.sort == "suspect":
        # Images without a prediction sort last (-1), then by id.
        key = "COALESCE(p.suspect_score, -1.0)"
        order = f"{key} DESC, i.id ASC"
        page_where, page_args = filters, list(args)
        if query.cursor:
            score, last_id = _parse_cursor(query.cursor, float)
            page_where += f" AND ({key} < ? OR ({key} = ? AND i.id > ?))"
            page_args += [score, score, last_id]
    else:
        order = "i.id ASC"
        page_where, page_args = filters, list(args)
        if query.cursor:
            (last_id,) = _parse_cursor(query.cursor, None)
            page_where += " AND i.id > ?"
            page_args.append(last_id)
    return (f"SELECT {_COLUMNS} {_FROM} WHERE {page_where} ORDER BY {order} LIMIT ?",
            [*page_args, limit + 1], f"SELECT COUNT(*) {_FROM} WHERE {filters}", args)


def _card(row: sqlite3.Row) -> dict:
    card = dict(row)
    for key in ("extra", "attributes", "review_attributes"):
        card[key] = json.loads(card[key]) if card[key] else {}
    # What export writes: the title rules' values with the reviewer's laid over them.
    card["rule_attributes"] = card["attributes"]
    card["attributes"] = {**card["attributes"], **card["review_attributes"]}
    card["exported"] = bool(card["exported"])
    card["confident"] = bool(card["confident"]) if card["confident"] is not None else None
    card.pop("path", None)
    return card


def _parse_cursor(cursor: str, score_type) -> tuple:
    try:
        if score_type is None:
            return (int(cursor),)
        score, last_id = cursor.rsplit(":", 1)
        return score_type(score), int(last_id)
    except ValueError as exc:
        raise ReviewError(f"bad cursor {cursor!r}") from exc


def _check_label(label: str | None) -> str:
    label = (label or "").strip()
    if not label:
        raise ReviewError("relabel needs a label")
    if "/" in label or "\\" in label or label in (".", "..") or len(label) > 100:
        raise ReviewError(f"{label!r} cannot be a label: it becomes a folder name on export")
    return label


def _check_attribute(attribute: str | None, value: str | None) -> tuple[str, str | None]:
    attribute = (attribute or "").strip()
    if not attribute or not attribute.replace("_", "").isalnum():
        raise ReviewError(f"attribute {attribute!r}: use letters, digits and '_' (as in "
                          "sources.yaml)")
    if value is not None:
        value = value.strip()
        if not value or len(value) > 100:
            raise ReviewError(f"attribute {attribute!r}: a value of 1-100 characters, or null "
                              "to go back to the title rules")
    return attribute, value


def _fetch_rows(db: sqlite3.Connection, ids: list[int]) -> dict[int, sqlite3.Row]:
    marks = ",".join("?" * len(ids))
    rows = {row["id"]: row for row in db.execute(
        f"SELECT i.id, i.label, i.review_status, i.review_label, i.review_reason, i.reviewed_at, "
        f"i.review_attributes, p.predicted_label, p.predicted_prob {_FROM} WHERE i.id IN ({marks})", ids)}
    missing = [i for i in ids if i not in rows]
    if missing:
        raise ReviewError(f"no images with ids {missing}")
    return rows


def _next_batch(db: sqlite3.Connection) -> int:
    return db.execute("SELECT COALESCE(MAX(batch), 0) + 1 FROM review_actions").fetchone()[0]


def _decide(action: str, row: sqlite3.Row, reason: str | None,
            label: str | None) -> tuple[str | None, str | None, str | None] | None:
    """(review_status, review_label, review_reason) after `action` on `row`."""
    if action == "approve":
        return "approved", row["review_label"], reason
    if action == "reject":
        return "rejected", row["review_label"], reason
    if action == "clear":
        return None, None, None
    if action == "relabel":
        target = label
        why = reason or f"moved from {row['review_label'] or row['label']} to {label}"
    elif action == "accept_suggestion":
        if row["predicted_label"] is None:
            return None
        target = row["predicted_label"]
        why = reason or f"model suggestion: {target} ({row['predicted_prob']:.2f})"
    else:
        raise ReviewError(f"unknown action {action!r}")
    # Moving an image back to its crawled label is no relabel at all.
    return "approved", (None if target == row["label"] else target), why


def _write(db: sqlite3.Connection, image_id: int, status: str | None, label: str | None,
           reason: str | None, at: float) -> None:
    db.execute("UPDATE images SET review_status = ?, review_label = ?, review_reason = ?, "
               "reviewed_at = ? WHERE id = ?",
               (status, label, reason, None if status is None and label is None else at,
                image_id))


def _log_action(db, batch: int, image_id: int, action: str, row, after: tuple, at: float,
                attributes: tuple[str | None, str | None] = (None, None)) -> None:
    """One undo-log row: the image's review columns before (from `row`) and `after`
    (status, label, reason), and its reviewed attributes before and after."""
    db.execute(
        "INSERT INTO review_actions (batch, image_id, action, before_status, before_label, "
        "before_reason, before_at, after_status, after_label, after_reason, at, "
        "before_attributes, after_attributes) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (batch, image_id, action, row["review_status"], row["review_label"],
         row["review_reason"], row["reviewed_at"], *after, at, *attributes))
