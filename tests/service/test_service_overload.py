"""Overload: the service sheds load with 429/503 + Retry-After instead of piling up, then recovers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.service.conftest import SERVER_ENV, Server, build_tiny_cnn, tiny_contract


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """A model that takes ~15 ms per run, a 10 ms queueing budget and 4 requests in flight."""
    folder = tmp_path_factory.mktemp("slow")
    model = build_tiny_cnn(folder / "slow.onnx", tiny_contract(), slow_layers=200)
    srv = Server({**SERVER_ENV, "MODEL_TAG": str(model), "CLASSIFIER_MAX_LATENCY_MS": "10",
                  "CLASSIFIER_MAX_CONCURRENCY": "4", "CLASSIFIER_RETRY_AFTER_S": "2"},
                 folder / "serve.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_overload_answers_429_and_503_with_retry_after(slow_server, demo_catalog):
    photo = min((demo_catalog / "hat").iterdir()).read_bytes()
    with httpx.Client(base_url=slow_server.url, timeout=60) as client:
        for _ in range(12):  # past BentoML's batcher warm-up
            assert client.post("/classify", files={"image": ("a.jpg", photo)}).status_code == 200

        def post(_):
            return client.post("/classify", files={"image": ("a.jpg", photo)})

        with ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(post, range(240)))
        statuses = {r.status_code for r in responses}
        assert statuses <= {200, 429, 503}, [r.text for r in responses if r.status_code >= 500]
        assert {429, 503} <= statuses, f"expected both kinds of shedding, got {statuses}"
        for response in responses:
            if response.status_code != 200:
                assert response.headers["retry-after"] == "2"
                assert response.json()["error"]
        assert client.get("/readyz").status_code == 200
        assert client.post("/classify", files={"image": ("a.jpg", photo)}).status_code == 200
