"""A multi-head model exported by the trainer, served end to end: one batched model call
answers the label and every attribute, each attribute's scores calibrated with its head's own
temperature from the contract; per-attribute min_score; /model lists the attributes. A
single-head model's answers and card carry no attributes key at all; a contract from before
calibrated heads means T = 1."""

from __future__ import annotations

import json

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service.contract import (
    CONTRACT_KEY,
    ModelContract,
    calibrated_attribute_scores,
    load_and_preprocess,
    softmax,
)
from tests.service.conftest import SERVER_ENV, onnx_contract, serve


def test_multi_head_model_answers_every_attribute_in_one_call(attribute_export, demo_catalog,
                                                              tmp_path):
    contract = onnx_contract(attribute_export)
    values = contract.attributes["colour"]
    photos = sorted(demo_catalog.glob("*/*.jpg"))[20::37][:4]
    session = ort.InferenceSession(str(attribute_export))
    with serve({**SERVER_ENV, "MODEL_TAG": str(attribute_export)}, tmp_path) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        card = client.get("/model").json()
        assert card["attributes"] == {"colour": values}
        body = client.post("/classify", files={"image": (photos[0].name,
                                                         photos[0].read_bytes())}).json()
        colour = body["attributes"]["colour"]
        # What ONNX Runtime says on the same file through the contract's preprocessing.
        tensor = load_and_preprocess(photos[0].read_bytes(), contract)[None]
        logits, attr = session.run(["logits", "attr_colour"], {"input": tensor})
        temperature = contract.attribute_temperatures["colour"]
        expected = softmax(attr[0] / temperature)
        # The temperature moves this photo's score, so an uncalibrated answer would fail here.
        assert abs(float(expected.max()) - float(softmax(attr[0]).max())) > 1e-3
        assert colour["label"] == values[int(expected.argmax())]
        assert abs(colour["score"] - float(expected.max())) < 1e-4
        assert [t["label"] for t in colour["top_k"]] == [
            values[i] for i in np.argsort(expected)[::-1][:len(colour["top_k"])]]
        assert [t["score"] for t in colour["top_k"]] == pytest.approx(
            sorted(expected, reverse=True)[:len(colour["top_k"])], abs=1e-4)
        assert body["label"] == contract.labels[int(logits[0].argmax())]

        batch = client.post("/classify_batch", files=[
            ("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]).json()
        assert len(batch["predictions"]) == len(photos)
        assert batch["predictions"][0]["attributes"] == body["attributes"]
        # min_score per attribute: the colour's label is null below it, the main label stays.
        unsure = client.post("/classify", files={"image": (photos[0].name,
                                                           photos[0].read_bytes())},
                             data={"attribute_min_score": json.dumps(
                                 {"colour": min(1.0, colour["score"] + 0.01)})}).json()
        assert unsure["attributes"]["colour"]["label"] is None
        assert unsure["label"] == body["label"]
        for bad in ('{"pattern": 0.5}', '{"colour": 2}', "[0.5]", "colour=0.5",
                    '{"colour": "high"}'):
            refused = client.post("/classify", files={"image": (photos[0].name,
                                                                photos[0].read_bytes())},
                                  data={"attribute_min_score": bad})
            assert refused.status_code == 400, bad
        assert refused.status_code == 400


def test_single_head_model_answers_without_attributes(server, demo_catalog):
    photo = max(demo_catalog.glob("hat/*.jpg"))
    with httpx.Client(base_url=server.url, timeout=60) as client:
        body = client.post("/classify", files={"image": (photo.name, photo.read_bytes())}).json()
        assert set(body) == {"label", "score", "top_k", "model"}
        assert "attributes" not in client.get("/model").json()
        refused = client.post("/classify", files={"image": (photo.name, photo.read_bytes())},
                              data={"attribute_min_score": '{"colour": 0.5}'})
        assert refused.status_code == 400 and "none" in refused.json()["error"]


def test_the_contract_round_trips_head_temperatures_and_old_contracts_mean_one():
    contract = ModelContract(version="v", labels=["a", "b"],
                             attributes={"colour": ["blue", "red"], "pattern": ["dot", "plain"]},
                             attribute_temperatures={"colour": 1.7})
    back = ModelContract.from_metadata(contract.to_metadata())
    assert back == contract and back.attribute_temperatures == {"colour": 1.7}
    logits = np.array([[0.3, 2.0], [1.0, -1.0]])
    assert np.allclose(calibrated_attribute_scores(logits, back, "colour"), softmax(logits / 1.7))
    # A head without a fitted temperature (here: pattern) has T = 1.
    assert np.allclose(calibrated_attribute_scores(logits, back, "pattern"), softmax(logits))

    # What a multi-head model exported before calibrated heads carries: no such key; T = 1.
    old = json.loads(contract.to_metadata()[CONTRACT_KEY])
    del old["attribute_temperatures"]
    older = ModelContract.from_metadata({CONTRACT_KEY: json.dumps(old)})
    assert older.attribute_temperatures is None
    assert np.allclose(calibrated_attribute_scores(logits, older, "colour"), softmax(logits))
    assert "attribute_temperatures" not in older.to_metadata()[CONTRACT_KEY]
    for bad in ({"size": 2.0}, {"colour": 0.0}, {"colour": float("inf")}):
        with pytest.raises(ValueError, match="attribute"):
            ModelContract(version="v", labels=["a", "b"], attributes={"colour": ["blue", "red"]},
                          attribute_temperatures=bad)


def test_the_exported_model_carries_the_heads_temperatures(attribute_export):
    """What the trainer fitted (attributes.json) is what the ONNX file's contract says."""
    fitted = json.loads((attribute_export.parents[1] / "attributes.json").read_text())
    contract = onnx_contract(attribute_export)
    assert contract.attribute_temperatures == {
        name: head["calibration"]["temperature"] for name, head in fitted["metrics"].items()}
    assert contract.attribute_temperatures["colour"] != 1.0
