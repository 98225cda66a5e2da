"""The review app's HTTP API on a real process: clear 4xx for bad requests, files, thumbnails."""

from __future__ import annotations

import httpx

from collector.review.store import ReviewStore


def test_review_api_answers_bad_requests_with_clear_4xx(review_server, review_manifest):
    with httpx.Client(base_url=review_server.url, timeout=30) as client:
        response = client.get("/api/images", params={"sort": "random"})
        assert response.status_code == 400 and "sort" in response.json()["error"]
        response = client.get("/api/images", params={"lable": "hat"})   # a typo is named
        assert response.status_code == 400 and "lable" in response.json()["error"]
        assert client.get("/api/images", params={"cursor": "x:y", "sort": "suspect"}) \
            .status_code == 400
        response = client.post("/api/actions", content=b"{not json",
                               headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and "JSON" in response.json()["error"]
        response = client.post("/api/actions", json={"action": "explode", "ids": [1]})
        assert response.status_code == 400 and "action" in response.json()["error"]
        response = client.post("/api/actions", json={"action": "relabel", "ids": [1],
                                                     "label": "../etc"})
        assert response.status_code == 400 and "label" in response.json()["error"]
        response = client.post("/api/actions", json={"action": "approve", "ids": [10**9]})
        assert response.status_code == 404
        assert client.get("/api/images/999999").status_code == 404
        response = client.post("/api/undo", json={})
        assert response.status_code == 400 and "nothing to undo" in response.json()["error"]
        assert client.get("/api/groups", params={"kind": "both"}).status_code == 400
        # What another site open in the same browser could send is refused (CSRF, rebinding).
        ok_body = {"action": "approve", "ids": [review_manifest["ids"]["hat"][0]]}
        response = client.post("/api/actions", json=ok_body,
                               headers={"Origin": "http://evil.example"})
        assert response.status_code == 403 and "cross-origin" in response.json()["error"]
        response = client.post("/api/actions", content=str(ok_body).replace("'", '"'),
                               headers={"Content-Type": "text/plain"})
        assert response.status_code == 415
        response = client.get("/api/summary", headers={"Host": "evil.example"})
        assert response.status_code == 403
        # Nothing above wrote a decision.
        assert ReviewStore(review_manifest["manifest"]).summary()["undoable"] == 0


def test_review_api_serves_thumbnails_originals_and_broken_files(review_server, review_manifest):
    store = ReviewStore(review_manifest["manifest"])
    good = review_manifest["ids"]["dress"][1]
    with httpx.Client(base_url=review_server.url, timeout=60) as client:
        thumb = client.get(f"/api/images/{good}/thumb")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert thumb.content[:3] == b"\xff\xd8\xff"
        original = client.get(f"/api/images/{good}/file")
        assert original.content == store.file_for(good)[0].read_bytes()
        broken = client.get(f"/api/images/{review_manifest['broken']}/thumb")
        assert broken.status_code == 200
        assert broken.headers["content-type"].startswith("image/svg+xml")
        page = client.get("/api/images", params={"label": "dress", "limit": 5})
        body = page.json()
        assert page.status_code == 200 and len(body["items"]) == 5 and body["next_cursor"]
        card = body["items"][0]
        assert {"product_title", "product_url", "shop", "effective_label", "exported",
                "predicted_label", "suspect_score"} <= set(card)
        assert "path" not in card          # file system paths stay on the server
        index = client.get("/")
        assert index.status_code == 200 and "/static/app.js" in index.text
    assert (review_manifest["root"] / ".review" / "thumbs").is_dir()
