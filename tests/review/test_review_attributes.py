"""Attributes on the review page: shown per card, set with the keyboard, undone, stored in the
manifest's review_attributes, honoured by `collector export`, and never undone by the rules."""

from __future__ import annotations

import csv
import json
import sqlite3

import httpx
import pytest

from collector.export import export_dataset
from collector.manifest import Manifest
from tests.review.conftest import card, open_page, row, wait_for_thumbnails


def give_colours(manifest_path, ids: dict[str, list[int]]) -> dict[int, str]:
    """What the title rules write into `attributes` (collector.rules.apply_rules): a colour
    for some images, 'unknown' for the rest."""
    colours = {}
    db = sqlite3.connect(manifest_path)
    with db:
        for label_ids in ids.values():
            for n, image_id in enumerate(label_ids):
                colour = ("blue", "red", "unknown")[n % 3]
                colours[image_id] = colour
                db.execute("UPDATE images SET attributes = ? WHERE id = ?",
                           (json.dumps({"colour": colour}), image_id))
    db.close()
    return colours


@pytest.mark.parametrize("review_manifest", [4], indirect=True)
def test_review_api_sets_undoes_and_exports_attribute_decisions(review_server, review_manifest,
                                                                tmp_path):
    manifest, ids = review_manifest["manifest"], review_manifest["ids"]
    give_colours(manifest, ids)
    blue, red = ids["hat"][0], ids["hat"][1]
    with httpx.Client(base_url=review_server.url, timeout=30) as client:
        summary = client.get("/api/summary").json()
        assert set(summary["attributes"]["colour"]) == {"blue", "red", "unknown"}
        item = client.get(f"/api/images/{blue}").json()
        assert item["attributes"] == {"colour": "blue"} and item["review_attributes"] == {}

        response = client.post("/api/actions", json={"action": "set_attribute", "ids": [blue, red],
                                                     "attribute": "colour", "value": "black"})
        assert response.status_code == 200
        changed = {c["id"]: c for c in response.json()["changed"]}
        assert changed[blue]["attributes"] == {"colour": "black"}
        assert changed[blue]["rule_attributes"] == {"colour": "blue"}
        # The label decision is untouched: an attribute edit is not an approval.
        assert row(manifest, blue)["review_status"] is None
        assert json.loads(row(manifest, blue)["review_attributes"]) == {"colour": "black"}

        # Undo restores exactly what was there.
        undone = client.post("/api/undo", json={}).json()
        assert undone["action"] == "set_attribute"
        assert row(manifest, blue)["review_attributes"] is None
        client.post("/api/actions", json={"action": "set_attribute", "ids": [blue],
                                          "attribute": "colour", "value": "black"})
        # null goes back to the rules' value, a bad attribute name is refused.
        client.post("/api/actions", json={"action": "set_attribute", "ids": [red],
                                          "attribute": "colour", "value": "green"})
        client.post("/api/actions", json={"action": "set_attribute", "ids": [red],
                                          "attribute": "colour", "value": None})
        assert row(manifest, red)["review_attributes"] is None
        bad = client.post("/api/actions", json={"action": "set_attribute", "ids": [red],
                                                "attribute": "../x", "value": "blue"})
        assert bad.status_code == 400 and "attribute" in bad.json()["error"]

    # The title rules re-applied (a crawl run) rewrite `attributes`, never the decision.
    with Manifest(manifest) as m:
        m.db.execute("UPDATE images SET attributes = ? WHERE id = ?",
                     (json.dumps({"colour": "blue"}), blue))
        counts = m.attribute_counts()["colour"]
        result = export_dataset(m, tmp_path / "dataset")
    assert counts["black"] == 1
    with open(result.out_dir / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_url = {r["url"]: r for r in rows}
    assert by_url[row(manifest, blue)["url"]]["attr_colour"] == "black"
    assert by_url[row(manifest, red)["url"]]["attr_colour"] == "red"


@pytest.mark.parametrize("review_manifest", [4], indirect=True)
def test_review_page_sets_an_attribute_with_the_keyboard(browser, review_manifest, review_server,
                                                         screenshots):
    manifest, ids = review_manifest["manifest"], review_manifest["ids"]
    give_colours(manifest, ids)
    page = open_page(browser, review_server.url + "/#label=shorts", [])
    first, second = ids["shorts"][:2]
    page.wait_for_selector(f'#grid .card[data-id="{first}"] .attr')
    assert card(page, first).locator(".attr").text_content() == "colour: blue"
    card(page, first).click()
    # v, type a value, Enter: stored at once; the card shows it marked as reviewed.
    page.keyboard.press("v")
    page.wait_for_selector("#attr-dialog[open]")
    page.keyboard.type("re")
    wait_for_thumbnails(page, first=2)
    page.screenshot(path=str(screenshots / "10-attribute-dialog.png"))
    page.keyboard.press("Enter")
    page.wait_for_selector(f'#grid .card[data-id="{first}"] .attr.reviewed')
    assert card(page, first).locator(".attr").text_content() == "colour: red"
    assert json.loads(row(manifest, first)["review_attributes"]) == {"colour": "red"}
    assert "focused" in card(page, second).get_attribute("class")
    # A value no image has yet is offered as new.
    page.keyboard.press("v")
    page.keyboard.type("navy")
    assert "navy (new value)" in page.locator("#attr-values li").first.text_content()
    page.keyboard.press("Enter")
    page.wait_for_selector(f'#grid .card[data-id="{second}"] .attr.reviewed')
    assert json.loads(row(manifest, second)["review_attributes"]) == {"colour": "navy"}
    page.keyboard.press("u")
    page.wait_for_function(f"!document.querySelector('#grid .card[data-id=\"{second}\"] "
                           ".attr.reviewed')")
    assert row(manifest, second)["review_attributes"] is None
    assert not page.errors
