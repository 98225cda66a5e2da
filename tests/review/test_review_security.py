"""The review app's two guards, on a real process: files come only from inside the image
store (a hostile manifest row serves nothing), and off loopback every request needs the token
printed at start."""

from __future__ import annotations

import re
import sqlite3
import sys
import time

import httpx
import pytest

from collector.manifest import Manifest
from loadtests.servers import free_port, launch
from tests.review.conftest import card, open_page

SECRET = b"api_key=do-not-serve-me\n"


def add_hostile(manifest_path, path: str, n: int) -> int:
    with Manifest(manifest_path) as manifest:
        image_id = manifest.add_image(f"https://evil.example/{n}.jpg", "hat",
                                      product_title="hostile row", shop="evil.example")
        manifest.mark_stored(image_id, path=path, size=len(SECRET), width=100, height=100,
                             fmt="JPEG", sha256=f"{n:064x}", phash="0" * 16)
    return image_id


def test_review_serves_files_only_from_the_image_store(review_server, review_manifest,
                                                       tmp_path):
    root = review_manifest["root"]
    secret = tmp_path / "secret.txt"            # beside the collection, not in it
    secret.write_bytes(SECRET)
    (root / "notes.txt").write_bytes(SECRET)    # in the collection, outside images/
    link = root / "images" / "ee" / "link.jpg"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(secret)
    hostile = [add_hostile(review_manifest["manifest"], path, n) for n, path in enumerate([
        str(secret), "../secret.txt", "images/../../secret.txt", "notes.txt",
        "images/ee/link.jpg", "/etc/passwd"])]
    good = review_manifest["ids"]["hat"][0]
    with httpx.Client(base_url=review_server.url, timeout=60) as client:
        assert client.get(f"/api/images/{good}/file").status_code == 200
        for image_id in hostile:
            for kind in ("file", "thumb"):
                response = client.get(f"/api/images/{image_id}/{kind}")
                assert response.status_code == 404, (image_id, kind, response.text)
                assert "outside the image store" in response.json()["error"]
                assert b"do-not-serve-me" not in response.content
                assert b"root:" not in response.content
        # The card itself still lists, so a reviewer can see and reject the row.
        assert client.get(f"/api/images/{hostile[0]}").status_code == 200


def start_networked(review_manifest, tmp_path):
    port = free_port()
    server = launch("review-lan", [sys.executable, "-m", "collector", "review", "--data",
                                   str(review_manifest["root"]), "--host", "0.0.0.0",
                                   "--port", str(port), "--no-browser"],
                    port=port, log_dir=tmp_path, ready_path=None)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(rf"review page: (http://\S+:{port}/\?token=(\S+))",
                          server.log_path.read_text())
        if found:
            return server, found.group(2)
        assert server.exit_reason() is None, server.log_tail()
        time.sleep(0.1)
    server.stop()
    raise AssertionError(f"no token printed:\n{server.log_tail()}")


def test_review_off_loopback_needs_the_printed_token(review_manifest, tmp_path):
    server, token = start_networked(review_manifest, tmp_path)
    image = review_manifest["ids"]["hat"][0]
    body = {"action": "reject", "ids": [image], "reason": "from the network"}
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        assert len(token) >= 24
        # Without the token (or with a wrong one) nothing is read or written, whatever Host.
        for headers in ({}, {"Host": "lan-box:8765"}, {"Authorization": "token wrong"},
                        {"Cookie": "review_token=wrong"}):
            for method, path in (("GET", "/"), ("GET", "/api/summary"),
                                 ("GET", f"/api/images/{image}/file"),
                                 ("POST", "/api/actions")):
                response = client.request(method, path, headers=headers,
                                          json=body if method == "POST" else None)
                assert response.status_code == 403, (method, path, headers)
                assert "token" in response.json()["error"]
        assert client.get("/api/summary", params={"token": "x" + token}).status_code == 403
        # The printed link sets the cookie and drops the token from the address bar.
        first = client.get("/", params={"token": token})
        assert first.status_code == 303 and first.headers["location"] == "/"
        assert "httponly" in first.headers["set-cookie"].lower()
        assert "samesite=strict" in first.headers["set-cookie"].lower()
        assert client.get("/").status_code == 200              # the cookie now carries it
        assert client.post("/api/actions", json=body).status_code == 200


def test_review_token_by_header_and_the_host_check_off_loopback(review_manifest, tmp_path):
    server, token = start_networked(review_manifest, tmp_path)
    auth = {"Authorization": f"token {token}"}
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        # Reached under the machine's LAN name: the Host check is off, the token is the guard.
        response = client.get("/api/summary", headers={**auth, "Host": "lan-box:8765"})
        assert response.status_code == 200 and response.json()["total"] > 0
        # CSRF checks still apply on top of the token.
        response = client.post("/api/actions", headers={**auth, "Origin": "http://evil.example"},
                               json={"action": "approve", "ids": [1]})
        assert response.status_code == 403 and "cross-origin" in response.json()["error"]


@pytest.mark.parametrize("review_manifest", [4], indirect=True)
def test_review_page_filters_and_shows_flagged_titles(browser, review_manifest, review_server):
    """`off_topic: flag` in sources.yaml: the page filters the flagged cards and says why."""
    flagged = review_manifest["ids"]["dress"][1]
    db = sqlite3.connect(review_manifest["manifest"])
    with db:
        db.execute("UPDATE images SET title_verdict = 'off_topic', title_rule = ? WHERE id = ?",
                   ("exclude '<b>petticoat*</b>'", flagged))
        db.execute("UPDATE images SET title_verdict = 'on_topic' WHERE id != ?", (flagged,))
    db.close()
    page = open_page(browser, review_server.url + "/#title=off_topic", [])
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 1")
    note = card(page, flagged).locator(".off-topic")
    assert note.text_content() == "off-topic title: exclude '<b>petticoat*</b>'"   # as text
    assert page.locator("#f-title").input_value() == "off_topic"
    page.select_option("#f-title", "on_topic")
    page.wait_for_function("document.querySelectorAll('#grid .card').length > 1")
    assert card(page, flagged).count() == 0 and page.errors == []
