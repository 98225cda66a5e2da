"""The review page driven in headless Chromium against the real app process.

Filter, approve, reject, relabel and undo with the keyboard, resolve a conflict, check the
manifest rows after every step, restart the app, then run the collector's export and see the
decisions in the dataset. Screenshots go to reports/review-screenshots/ for a person to look at.
"""

from __future__ import annotations

import csv
import signal

import pytest

from collector.export import export_dataset
from collector.manifest import Manifest
from loadtests.servers import start_review
from tests.review.conftest import XSS_TITLE, card, open_page, row, wait_for_thumbnails


@pytest.mark.parametrize("review_manifest", [8], indirect=True)  # 8 photos per label suffice
def test_review_page_keyboard_flow_survives_restart_and_reaches_export(
        browser, review_manifest, review_server, screenshots, tmp_path, request):
    manifest, ids = review_manifest["manifest"], review_manifest["ids"]
    requests: list[str] = []
    page = open_page(browser, review_server.url + "/", requests)
    wait_for_thumbnails(page)
    page.screenshot(path=str(screenshots / "01-grid.png"))

    # Title search; crawled text is shown as text: a title carrying HTML neither runs nor renders.
    page.fill("#f-text", "size chart")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 1")
    xss_title = card(page, review_manifest["xss"]).locator(".title")
    assert xss_title.text_content() == XSS_TITLE
    assert page.evaluate("document.body.dataset.pwned") is None
    page.click("#f-reset")

    # Filter by label: only 'shorts' cards, with title and source link on each.
    page.locator('#labels li[data-label="shorts"]').click()
    page.wait_for_function("document.querySelectorAll('#grid .card').length === "
                           f"{len(ids['shorts'])} && [...document.querySelectorAll('#grid .card')]"
                           ".every(c => c.dataset.label === 'shorts')")
    first, second, third, fourth = ids["shorts"][:4]
    assert card(page, first).locator(".title").text_content() == "Shorts no. 1, cotton"
    assert card(page, first).locator("a.shop").get_attribute("href") == \
        "https://shop-a.example/p/shorts-0"
    wait_for_thumbnails(page)
    page.screenshot(path=str(screenshots / "02-filter-shorts.png"))

    # a: approve the focused card; focus moves on to the next one.
    card(page, first).click()
    page.keyboard.press("a")
    page.wait_for_selector(f'#grid .card[data-id="{first}"][data-status="approved"]')
    approved = row(manifest, first)
    assert approved["review_status"] == "approved" and approved["reviewed_at"] is not None
    assert approved["review_label"] is None
    assert "focused" in card(page, second).get_attribute("class")

    # r: reject with a reason picked by its number.
    page.keyboard.press("r")
    page.wait_for_selector("#reject-dialog[open]")
    page.screenshot(path=str(screenshots / "03-reject-dialog.png"))
    page.keyboard.press("1")
    page.wait_for_selector(f'#grid .card[data-id="{second}"][data-status="rejected"]')
    rejected = row(manifest, second)
    assert (rejected["review_status"], rejected["review_reason"]) == ("rejected", "wrong product")

    # m: move to another label, typed and confirmed with Enter.
    page.keyboard.press("m")
    page.wait_for_selector("#move-dialog[open]")
    page.keyboard.type("t-sh")
    page.screenshot(path=str(screenshots / "04-move-dialog.png"))
    page.keyboard.press("Enter")
    page.wait_for_selector(f'#grid .card[data-id="{third}"][data-label="t-shirt"]')
    moved = row(manifest, third)
    assert (moved["review_status"], moved["review_label"], moved["label"]) == \
        ("approved", "t-shirt", "shorts")
    assert moved["review_reason"] == "moved from shorts to t-shirt"

    # u: undo, twice: the move, then the rejection; both rows are back as they were.
    page.keyboard.press("u")
    page.wait_for_selector(f'#grid .card[data-id="{third}"][data-status="todo"]')
    undone = row(manifest, third)
    assert (undone["review_status"], undone["review_label"], undone["reviewed_at"]) == \
        (None, None, None)
    page.keyboard.press("Control+z")
    page.wait_for_selector(f'#grid .card[data-id="{second}"][data-status="todo"]')
    assert row(manifest, second)["review_status"] is None
    assert row(manifest, first)["review_status"] == "approved"  # older action untouched

    # Selection: x on two cards, then reject both at once with a typed reason.
    card(page, second).click()
    page.keyboard.press("x")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("x")
    assert page.locator("#grid .card.selected").count() == 2
    page.keyboard.press("r")
    page.wait_for_selector("#reject-dialog[open]")
    page.keyboard.type("size chart, not a photo")
    page.keyboard.press("Enter")
    page.wait_for_selector(f'#grid .card[data-id="{third}"][data-status="rejected"]')
    for image_id in (second, third):
        assert row(manifest, image_id)["review_reason"] == "size chart, not a photo"

    # Move the fourth card to 'shirt' by arrow keys in the label list.
    card(page, fourth).click()
    page.keyboard.press("m")
    page.wait_for_selector("#move-dialog[open]")
    page.keyboard.type("shirt")
    page.wait_for_function("document.querySelector('#move-labels li.active')"
                           "?.dataset.label === 'shirt'")
    page.keyboard.press("Enter")
    page.wait_for_selector(f'#grid .card[data-id="{fourth}"][data-label="shirt"]')
    assert row(manifest, fourth)["review_label"] == "shirt"
    page.screenshot(path=str(screenshots / "05-decisions.png"))

    # Status filter: only the rejected ones.
    page.select_option("#f-review", "rejected")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 2")
    assert sorted(int(c.get_attribute("data-id")) for c in
                  page.locator("#grid .card").all()) == sorted([second, third])

    # Conflicts side by side: keep one, the other is rejected with why.
    page.keyboard.press("Alt+3")
    page.wait_for_selector("#groups .group-row .keep")
    wait_for_thumbnails(page, first=2)
    group = page.locator("#groups .group-row").first
    members = [int(c.get_attribute("data-id")) for c in group.locator(".card").all()]
    assert review_manifest["conflict"] in members and len(members) == 2
    page.screenshot(path=str(screenshots / "06-conflicts.png"))
    keep_id = next(i for i in members if row(manifest, i)["label"] == "shirt")
    drop_id = next(i for i in members if i != keep_id)
    group.locator(f'.card[data-id="{keep_id}"] .keep').click()
    page.wait_for_selector("#groups .group-row.resolved")
    assert row(manifest, keep_id)["review_status"] == "approved"
    assert row(manifest, drop_id)["review_status"] == "rejected"
    assert row(manifest, drop_id)["review_reason"] == f"conflict: kept #{keep_id} as shirt"
    page.screenshot(path=str(screenshots / "07-conflict-resolved.png"))
    assert not page.errors, page.errors
    page.close()

    # kill -9 the app and start it again: every decision is still there, in the page too.
    review_server.signal(signal.SIGKILL)
    review_server.stop()
    restarted = start_review(manifest, review_server.port, log_dir=tmp_path, name="restarted")
    request.addfinalizer(restarted.stop)
    page = open_page(browser, restarted.url + "/#review=rejected", requests)
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 3")
    shown = {int(c.get_attribute("data-id")) for c in page.locator("#grid .card").all()}
    assert shown == {second, third, drop_id}
    page.screenshot(path=str(screenshots / "08-after-restart-rejected.png"))
    assert not page.errors, page.errors
    page.close()

    # Everything the page needed came from the app itself: no CDN, no outside request.
    outside = [url for url in requests
               if not url.startswith((review_server.url + "/", "data:"))]
    assert not outside, outside

    # The collector's export honours every decision.
    with Manifest(manifest) as opened:
        result = export_dataset(opened, tmp_path / "dataset")
    with open(result.out_dir / "manifest.csv", newline="") as handle:
        exported = {row_["url"]: row_ for row_ in csv.DictReader(handle)}

    def url_of(image_id: int) -> str:
        return row(manifest, image_id)["url"]

    assert url_of(first) in exported and exported[url_of(first)]["label"] == "shorts"
    assert url_of(second) not in exported and url_of(third) not in exported
    assert url_of(drop_id) not in exported
    assert exported[url_of(fourth)]["label"] == "shirt"
    assert exported[url_of(keep_id)]["label"] == "shirt"   # conflict resolved -> exported
    moved_file = result.out_dir / exported[url_of(fourth)]["file"]
    assert moved_file.parent.name == "shirt" and moved_file.is_file()
