"""More than one worker, and a model worker that dies: real `bentoml serve` processes."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from loadtests.servers import process_role
from service.contract import load_and_preprocess
from tests.service.conftest import LABELS, SERVER_ENV, serve, tiny_contract

TIMEOUT_S = 10  # the service's per-request timeout in these tests


@pytest.fixture(scope="module")
def photos(demo_catalog) -> list[bytes]:
    return [min((demo_catalog / label).iterdir()).read_bytes() for label in LABELS]


def expected_labels(onnx_path, photos) -> list[str]:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batch = np.stack([load_and_preprocess(p, tiny_contract()) for p in photos])
    return [LABELS[i] for i in session.run(["logits"], {"input": batch})[0].argmax(1)]


def by_role(server) -> dict[str, list]:
    roles: dict[str, list] = {}
    for proc in server.tree():
        roles.setdefault(process_role(proc), []).append(proc)
    return roles


def cpu_seconds(procs) -> list[float]:
    return [sum(p.cpu_times()[:2]) for p in procs]


def test_two_api_and_two_model_workers_share_the_work_and_agree(tiny_onnx, photos, tmp_path):
    expected = expected_labels(tiny_onnx, photos)
    with serve({**SERVER_ENV, "MODEL_TAG": str(tiny_onnx), "CLASSIFIER_API_WORKERS": "2",
                "CLASSIFIER_MODEL_WORKERS": "2"}, tmp_path) as server:
        roles = by_role(server)
        assert len(roles["api"]) == 2 and len(roles["model"]) == 2, roles
        before = cpu_seconds(roles["api"])
        with httpx.Client(base_url=server.url, timeout=60,
                          limits=httpx.Limits(max_keepalive_connections=0)) as client:
            def label(i):
                response = client.post("/classify", files={"image": ("p.jpg", photos[i % 10])})
                assert response.status_code == 200, response.text
                return response.json()["label"]

            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(label, range(160)))
        assert answers == [expected[i % 10] for i in range(160)]
        # Fresh connections are spread by the kernel across both API processes.
        used = [after - b for after, b in zip(cpu_seconds(roles["api"]), before)]
        assert all(u > 0.05 for u in used), f"CPU seconds per API worker: {used}"


@pytest.mark.slow
def test_killed_model_worker_is_respawned_while_requests_get_503_not_hangs(tiny_onnx, photos,
                                                                          tmp_path):
    with serve({**SERVER_ENV, "MODEL_TAG": str(tiny_onnx),
                "CLASSIFIER_TIMEOUT_S": str(TIMEOUT_S)}, tmp_path) as server, \
            httpx.Client(base_url=server.url, timeout=TIMEOUT_S + 15) as client:
        (victim,) = by_role(server)["model"]
        answers: list[tuple[float, int]] = []

        def post(i):
            started = time.monotonic()
            response = client.post("/classify", files={"image": ("p.jpg", photos[i % 10])})
            answers.append((time.monotonic() - started, response.status_code))
            return response

        with ThreadPoolExecutor(8) as pool:
            warm = list(pool.map(post, range(16)))
            assert {r.status_code for r in warm} == {200}
            during = [pool.submit(post, i) for i in range(200)]
            time.sleep(0.2)
            victim.send_signal(signal.SIGKILL)
            statuses = [f.result().status_code for f in during]  # no hang: httpx would raise
        assert set(statuses) <= {200, 503}, [f.result().text for f in during
                                              if f.result().status_code not in (200, 503)]
        for future in during:
            if future.result().status_code == 503:
                assert future.result().headers["retry-after"]
                assert future.result().json()["reason"]

        deadline = time.monotonic() + 90  # bounded: BentoML respawns the worker by itself
        recovered = None
        while time.monotonic() < deadline:
            models = by_role(server).get("model", [])
            if models and models[0].pid != victim.pid:
                response = client.post("/classify", files={"image": ("p.jpg", photos[0])})
                if response.status_code == 200:
                    recovered = models[0].pid
                    break
            time.sleep(0.5)
        assert recovered, "the model worker was not respawned within 90 s"
        assert client.get("/readyz").status_code == 200
