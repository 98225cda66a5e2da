"""ReviewStore on real manifests: decisions, undo, groups, thumbnails, and 20,000-image paging."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from collector.manifest import Manifest
from collector.review.store import ImageQuery, ReviewError, ReviewStore
from collector.review.thumbnails import ThumbnailCache
from service.contract import ImageDecodeError


def rows(manifest: Path, *ids: int) -> list[sqlite3.Row]:
    db = sqlite3.connect(manifest)
    db.row_factory = sqlite3.Row
    try:
        return [db.execute("SELECT * FROM images WHERE id = ?", (i,)).fetchone() for i in ids]
    finally:
        db.close()


def exportable_urls(manifest: Path) -> dict[str, str]:
    with Manifest(manifest) as opened:
        return {row["url"]: row["effective_label"] for row in opened.exportable_images()}


def test_review_actions_are_written_logged_and_undone_in_order(review_manifest):
    manifest = review_manifest["manifest"]
    store = ReviewStore(manifest)
    a, b, c = review_manifest["ids"]["skirt"][:3]

    store.apply("approve", [a])
    store.apply("reject", [b, c], reason="banner")
    store.apply("relabel", [a], label="dress")
    ra, rb, rc = rows(manifest, a, b, c)
    assert (ra["review_status"], ra["review_label"]) == ("approved", "dress")
    assert ra["review_reason"] == "moved from skirt to dress"
    assert (rb["review_status"], rb["review_reason"]) == ("rejected", "banner")
    assert rb["reviewed_at"] is not None and rc["review_status"] == "rejected"
    urls = exportable_urls(manifest)
    assert urls[ra["url"]] == "dress" and rb["url"] not in urls and rc["url"] not in urls

    # Moving an image back to its crawled label clears the relabel instead of storing it.
    store.apply("relabel", [a], label="skirt")
    assert rows(manifest, a)[0]["review_label"] is None

    # Undo walks back one action at a time, restoring exactly the previous values.
    assert store.undo()["action"] == "relabel"
    assert rows(manifest, a)[0]["review_label"] == "dress"
    assert store.undo()["action"] == "relabel"
    assert (rows(manifest, a)[0]["review_status"], rows(manifest, a)[0]["review_label"]) == \
        ("approved", None)
    undone = store.undo()
    assert undone["action"] == "reject" and {x["id"] for x in undone["changed"]} == {b, c}
    assert [r["review_status"] for r in rows(manifest, b, c)] == [None, None]
    store.undo()
    ra = rows(manifest, a)[0]
    assert (ra["review_status"], ra["reviewed_at"]) == (None, None)
    with pytest.raises(ReviewError, match="nothing to undo"):
        store.undo()
    assert [h["action"] for h in store.history()] == ["relabel", "relabel", "reject", "approve"]
    assert all(h["undone_at"] for h in store.history())


def test_review_refuses_bad_requests_without_writing(review_manifest):
    manifest = review_manifest["manifest"]
    store = ReviewStore(manifest)
    good = review_manifest["ids"]["hat"][0]
    with pytest.raises(ReviewError, match="no images with ids"):
        store.apply("approve", [good, 10**9])
    assert rows(manifest, good)[0]["review_status"] is None   # one transaction: all or nothing
    for bad in ("", "  ", "a/b", ".."):
        with pytest.raises(ReviewError):
            store.apply("relabel", [good], label=bad)
    with pytest.raises(ReviewError, match="no images selected"):
        store.apply("approve", [])
    with pytest.raises(FileNotFoundError, match="collector crawl"):
        ReviewStore(manifest.parent / "missing.sqlite")
    # Reject without a reason still records why it is out.
    store.apply("reject", [good], reason="   ")
    assert rows(manifest, good)[0]["review_reason"] == "rejected"


def test_review_keep_one_resolves_duplicates_and_conflicts(review_manifest):
    manifest = review_manifest["manifest"]
    store = ReviewStore(manifest)
    conflicts = store.groups("conflict")["groups"]
    assert len(conflicts) == 1 and conflicts[0]["labels"] == ["shirt", "t-shirt"]
    duplicates = store.groups("duplicate")["groups"]
    dup_group = next(g for g in duplicates
                     if review_manifest["duplicate"] in [m["id"] for m in g["members"]])
    # The kept image may be the copy dedup marked duplicate: the reviewer knows better.
    store.keep_one(dup_group["group_id"], review_manifest["duplicate"])
    kept, other = rows(manifest, review_manifest["duplicate"],
                       *[m["id"] for m in dup_group["members"]
                         if m["id"] != review_manifest["duplicate"]])
    assert kept["review_status"] == "approved" and kept["status"] == "duplicate"
    assert other["review_status"] == "rejected"
    assert other["review_reason"] == f"duplicate of #{kept['id']}"
    urls = exportable_urls(manifest)
    assert kept["url"] in urls and other["url"] not in urls

    group = conflicts[0]["group_id"]
    store.keep_one(group, review_manifest["conflict"])   # the copy under 't-shirt'
    assert exportable_urls(manifest)[rows(manifest, review_manifest["conflict"])[0]["url"]] \
        == "t-shirt"
    assert store.groups("conflict")["groups"][0]["resolved"]
    with pytest.raises(ReviewError, match="not in group"):
        store.keep_one(group, review_manifest["ids"]["hat"][0])


def test_review_filters_combine(review_manifest):
    store = ReviewStore(review_manifest["manifest"])
    page = store.list_images(ImageQuery(shop="shop-b.example", label="dress", limit=500))
    assert page.total == len(page.items) > 0
    assert all(i["shop"] == "shop-b.example" and i["effective_label"] == "dress"
               for i in page.items)
    assert store.list_images(ImageQuery(status="conflict")).total == 2
    assert store.list_images(ImageQuery(status="duplicate")).total == 1
    assert [i["id"] for i in store.list_images(ImageQuery(text="50%_off")).items] == []
    hat = review_manifest["ids"]["hat"][0]
    store.apply("relabel", [hat], label="shoes")
    assert hat in [i["id"] for i in store.list_images(
        ImageQuery(label="shoes", review="relabelled")).items]
    assert hat not in [i["id"] for i in store.list_images(ImageQuery(label="hat",
                                                                     limit=500)).items]


def test_review_thumbnails_are_made_once_and_broken_files_say_why(review_manifest, tmp_path):
    store = ReviewStore(review_manifest["manifest"])
    cache = ThumbnailCache(tmp_path / "thumbs")
    source, key = store.file_for(review_manifest["ids"]["dress"][0])
    thumb = cache.path_for(key, source)
    first = thumb.stat().st_mtime_ns
    with Image.open(thumb) as made:
        assert max(made.size) == cache.size
    assert cache.path_for(key, source).stat().st_mtime_ns == first   # cached, not redone
    source, key = store.file_for(review_manifest["broken"])
    with pytest.raises(ImageDecodeError) as caught:
        cache.path_for(key, source)
    assert caught.value.reason in ("corrupt", "not_an_image")
    assert not list((tmp_path / "thumbs").rglob("*.tmp"))


# -- 20,000 images ------------------------------------------------------------------------------
LABELS = [f"label-{n:02d}" for n in range(10)]


@pytest.fixture(scope="module")
def big_manifest(tmp_path_factory, demo_catalog) -> Path:
    """20,000 stored images (10 real files reused), 10 labels, 3 shops, predictions for all."""
    root = tmp_path_factory.mktemp("big")
    photos = sorted(demo_catalog.glob("*/*.jpg"))[:10]
    for n, photo in enumerate(photos):
        (root / "images").mkdir(exist_ok=True)
        (root / "images" / f"{n}.jpg").write_bytes(photo.read_bytes())
    rng = random.Random(0)
    with Manifest(root / "manifest.sqlite") as manifest, manifest.transaction():
        for n in range(20_000):
            label = LABELS[n % 10]
            image_id = manifest.add_image(f"https://s{n % 3}.example/{n}.jpg", label,
                                          shop=f"s{n % 3}.example", product_title=f"item {n}")
            manifest.mark_stored(image_id, path=f"images/{n % 10}.jpg", size=1, width=1,
                                 height=1, fmt="JPEG", sha256=f"{n:064x}", phash="0" * 16)
    with Manifest(root / "manifest.sqlite") as manifest:
        manifest.set_dedup((i, "ok", None, i, None) for i in range(1, 20_001))
    store = ReviewStore(root / "manifest.sqlite")
    # Scores rounded to 2 decimals: thousands of ties, which keyset paging must not lose.
    store.save_predictions([(i, LABELS[(i - 1) % 10], LABELS[0], 0.5, 0.5,
                             round(rng.random(), 2), False, {}) for i in range(1, 20_001)],
                           model="test-scores")
    return root / "manifest.sqlite"


def all_pages(store: ReviewStore, query: ImageQuery) -> list[dict]:
    items, cursor = [], None
    for _ in range(200):  # bounded: 20,000 / 500 = 40 pages at most
        page = store.list_images(ImageQuery(**{**query.__dict__, "cursor": cursor}))
        items += page.items
        cursor = page.next_cursor
        if cursor is None:
            return items
    raise AssertionError("paging did not end")


def test_review_keyset_paging_over_20000_images_is_complete_and_indexed(big_manifest):
    store = ReviewStore(big_manifest)
    by_id = all_pages(store, ImageQuery(limit=500))
    assert [i["id"] for i in by_id] == list(range(1, 20_001))

    label = all_pages(store, ImageQuery(label="label-03", limit=300))
    assert [i["id"] for i in label] == list(range(4, 20_001, 10))

    suspect = all_pages(store, ImageQuery(sort="suspect", limit=500))
    keys = [(-i["suspect_score"], i["id"]) for i in suspect]
    assert keys == sorted(keys) and len({i["id"] for i in suspect}) == 20_000

    # Deep pages read from an index, never by scanning the rows before them.
    cursor = str(by_id[15_000]["id"])
    plan = " | ".join(store.explain(ImageQuery(label="label-03", cursor=cursor)))
    assert "review_images_effective_label" in plan, plan
    assert "TEMP B-TREE" not in plan, plan    # read in page order: LIMIT stops the walk
    plan = " | ".join(store.explain(ImageQuery(cursor=cursor)))
    assert "USING INTEGER PRIMARY KEY (rowid>?)" in plan and "TEMP B-TREE" not in plan, plan
