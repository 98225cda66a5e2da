"""CLASSIFIER_PRECISION=int8 serves model.int8.onnx from the model store entry, same contract."""

from __future__ import annotations

import httpx
import onnxruntime as ort
import pytest

from service.contract import load_and_preprocess, softmax
from service.model_store import save_to_store
from tests.service.conftest import (
    LABELS,
    SERVER_ENV,
    build_tiny_cnn,
    quantize_int8,
    serve,
    tiny_contract,
)


@pytest.fixture(scope="module")
def int8_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8")
    fp32 = build_tiny_cnn(folder / "model.onnx", tiny_contract("int8-test"))
    int8 = quantize_int8(fp32, folder / "model.int8.onnx")
    tag = save_to_store(fp32, extra_files=[int8])
    # Compared below with ONNX Runtime's own run of this dynamically quantized file, whose
    # per-batch activation scales OpenVINO computes differently.
    with serve({**SERVER_ENV, "MODEL_TAG": tag, "CLASSIFIER_PRECISION": "int8",
                "CLASSIFIER_RUNTIME": "onnxruntime"}, folder) as srv:
        yield srv, tag, int8


def test_int8_model_from_the_store_is_served(int8_server, demo_catalog):
    server, tag, int8 = int8_server
    card = httpx.get(f"{server.url}/model").json()
    assert card["tag"] == tag and card["file"] == "model.int8.onnx"
    assert card["precision"] == "int8" and card["version"] == "int8-test"
    photos = [min((demo_catalog / label).iterdir()).read_bytes() for label in LABELS[:5]]
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    # One image per run, like lone requests: dynamic quantization scales by the whole batch.
    expected = [softmax(session.run(["logits"], {
        "input": load_and_preprocess(p, tiny_contract())[None]})[0])[0] for p in photos]
    for photo, scores in zip(photos, expected):
        body = httpx.post(f"{server.url}/classify", files={"image": ("p.jpg", photo)},
                          timeout=60).json()
        assert body["label"] == LABELS[int(scores.argmax())]
        assert body["score"] == pytest.approx(float(scores.max()), abs=1e-5)
