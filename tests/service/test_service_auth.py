"""API keys: with CLASSIFIER_API_KEYS / CLASSIFIER_API_KEY_FILE set, only a valid Bearer key
gets in (401 otherwise, before any body is read); health and metrics stay open as configured;
keys never reach the log."""

from __future__ import annotations

import httpx
import pytest

from loadtests.servers import ServerNotReady
from tests.service.conftest import SERVER_ENV, serve

ENV_KEYS = ["k-env-one-7f3a", "k-env-two-91bc"]
FILE_KEY = "k-file-3d0e55"
WRONG = "k-env-one-7f3b"  # one character off a real key


@pytest.fixture(scope="module")
def keyed_server(tiny_onnx, tmp_path_factory):
    folder = tmp_path_factory.mktemp("auth")
    key_file = folder / "keys.txt"
    key_file.write_text(f"# rotated monthly\n{FILE_KEY}\n\n")
    with serve({**SERVER_ENV, "MODEL_TAG": str(tiny_onnx),
                "CLASSIFIER_API_KEYS": ",".join(ENV_KEYS),
                "CLASSIFIER_API_KEY_FILE": str(key_file),
                "CLASSIFIER_OPEN_PATHS": "/livez,/readyz"}, folder) as srv:
        yield srv


@pytest.fixture(scope="module")
def photo(demo_catalog) -> bytes:
    return min((demo_catalog / "hat").iterdir()).read_bytes()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


REQUESTS = {
    "/classify": lambda c, photo, h: c.post("/classify", files={"image": ("a.jpg", photo)},
                                            headers=h),
    "/classify_batch": lambda c, photo, h: c.post("/classify_batch", headers=h,
                                                  files=[("images", ("a.jpg", photo))]),
    "/model": lambda c, photo, h: c.get("/model", headers=h),
    "/metrics (not in CLASSIFIER_OPEN_PATHS here)": lambda c, photo, h: c.get("/metrics",
                                                                              headers=h),
    "/docs.json": lambda c, photo, h: c.get("/docs.json", headers=h),
}


@pytest.mark.parametrize("path", list(REQUESTS))
def test_without_a_valid_key_every_endpoint_is_401(keyed_server, photo, path):
    with httpx.Client(base_url=keyed_server.url, timeout=60) as client:
        for headers in ({}, bearer(WRONG), {"Authorization": ENV_KEYS[0]},  # no scheme
                        {"Authorization": f"Basic {ENV_KEYS[0]}"}, {"Authorization": "Bearer"}):
            response = REQUESTS[path](client, photo, headers)
            assert response.status_code == 401, (headers, response.text)
            assert response.json()["reason"] == "unauthorized"
            assert "Authorization: Bearer" in response.json()["error"]
            assert response.headers["www-authenticate"].startswith("Bearer")
        for key in (*ENV_KEYS, FILE_KEY):
            assert REQUESTS[path](client, photo, bearer(key)).status_code == 200


def test_a_keyed_answer_is_the_same_answer(keyed_server, photo):
    response = httpx.post(f"{keyed_server.url}/classify", files={"image": ("a.jpg", photo)},
                          headers=bearer(FILE_KEY), timeout=60)
    assert response.status_code == 200 and response.json()["label"]


def test_open_paths_need_no_key(keyed_server):
    for path in ("/livez", "/readyz"):
        assert httpx.get(keyed_server.url + path, timeout=10).status_code == 200


def test_401_comes_before_the_body_is_read(keyed_server):
    """A keyless client cannot make the server buffer its body: no 413, a 401 at once."""
    body = (b"\0" * 65536 for _ in range(64))  # 4 MiB, over the 2 MiB image limit, chunked
    response = httpx.post(f"{keyed_server.url}/classify", content=body, timeout=60,
                          headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 401


def test_keys_never_reach_the_log_and_refusals_are_counted(keyed_server, photo):
    with httpx.Client(base_url=keyed_server.url, timeout=60) as client:
        client.post("/classify", files={"image": ("a.jpg", photo)}, headers=bearer(WRONG))
        client.post("/classify", files={"image": ("a.jpg", photo)}, headers=bearer(ENV_KEYS[1]))
        metrics = client.get("/metrics", headers=bearer(ENV_KEYS[0])).text
    assert 'classifier_rejected_requests_total{reason="unauthorized"}' in metrics
    log = keyed_server.log_path.read_text(errors="replace")
    for secret in (*ENV_KEYS, FILE_KEY, WRONG):
        assert secret not in log


def test_an_unreadable_key_file_stops_start_up_with_its_cure(tiny_onnx, tmp_path):
    missing = tmp_path / "no-such-keys.txt"
    with pytest.raises(ServerNotReady) as failure:
        serve({**SERVER_ENV, "MODEL_TAG": str(tiny_onnx),
               "CLASSIFIER_API_KEY_FILE": str(missing)}, tmp_path)
    assert f"CLASSIFIER_API_KEY_FILE={missing} cannot be read" in str(failure.value)
    assert "mount the key file there or unset it" in str(failure.value)
