"""Overload: the service sheds load with 429/503 + Retry-After instead of piling up, then recovers.

Each kind of shedding gets its own server so that each is forced by construction, not by how
busy the machine happens to be: 429 by a tiny in-flight limit, 503 by a model run far longer
than the queueing budget.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.service.conftest import SERVER_ENV, build_tiny_cnn, serve, tiny_contract

SHEDDING = {
    # 4 requests in flight per API worker, then 429; the queueing budget never runs out.
    "in_flight_limit_429": ({"CLASSIFIER_MAX_CONCURRENCY": "4",
                             "CLASSIFIER_MAX_LATENCY_MS": "60000"}, 200, 429),
    # No in-flight limit to speak of; each model run (~150 ms) outlasts the 10 ms budget, 503.
    "queueing_budget_503": ({"CLASSIFIER_MAX_CONCURRENCY": "1000",
                             "CLASSIFIER_MAX_LATENCY_MS": "10"}, 2000, 503),
}


@pytest.fixture(scope="module", params=list(SHEDDING))
def shedding_server(request, tmp_path_factory):
    settings, slow_layers, expected = SHEDDING[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    model = build_tiny_cnn(folder / "slow.onnx", tiny_contract(), slow_layers=slow_layers)
    with serve({**SERVER_ENV, "MODEL_TAG": str(model), "CLASSIFIER_RETRY_AFTER_S": "2",
                **settings}, folder) as srv:
        yield srv, expected


def test_overload_sheds_with_retry_after_and_recovers(shedding_server, demo_catalog):
    server, expected = shedding_server
    photo = min((demo_catalog / "hat").iterdir()).read_bytes()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for _ in range(12):  # past BentoML's batcher warm-up
            assert client.post("/classify", files={"image": ("a.jpg", photo)}).status_code == 200

        def post(_):
            return client.post("/classify", files={"image": ("a.jpg", photo)})

        with ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(post, range(240)))
        statuses = {r.status_code for r in responses}
        assert statuses <= {200, 429, 503}, [r.text for r in responses if r.status_code >= 500]
        assert expected in statuses, f"expected {expected} shedding, got {statuses}"
        for response in responses:
            if response.status_code != 200:
                assert response.headers["retry-after"] == "2"
                assert response.json()["error"]
        assert client.get("/readyz").status_code == 200
        assert client.post("/classify", files={"image": ("a.jpg", photo)}).status_code == 200
