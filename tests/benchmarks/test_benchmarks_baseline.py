"""The baseline app (FastAPI + PyTorch eager) on a real trained checkpoint, over real HTTP."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from benchmarks.bench_serve import start_baseline
from loadtests.checks import batch_problem, classify_problem
from loadtests.servers import free_port
from service.contract import load_and_preprocess


@pytest.fixture(scope="module")
def baseline(tiny_run, tmp_path_factory):
    server = start_baseline(tiny_run, free_port(), log_dir=tmp_path_factory.mktemp("baseline"))
    with server:
        yield server


@pytest.fixture(scope="module")
def photos(demo_catalog) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes())
            for label in ("dress", "hat", "shoes", "pants")
            for p in sorted((demo_catalog / label).iterdir())[:1]]


def reference_scores(run_dir, photos) -> tuple[np.ndarray, list[str]]:
    """The same checkpoint run directly in torch on the contract's preprocessing."""
    from trainer.runs import load_trained

    model, contract, _ = load_trained(run_dir)
    batch = torch.from_numpy(np.stack([load_and_preprocess(d, contract) for _, d in photos]))
    with torch.inference_mode():
        return torch.softmax(model(batch), dim=1).numpy(), contract.labels


def test_baseline_answers_what_the_checkpoint_computes(baseline, tiny_run, photos):
    expected, labels = reference_scores(tiny_run, photos)
    with httpx.Client(base_url=baseline.url, timeout=60) as client:
        for (name, data), scores in zip(photos, expected, strict=True):
            response = client.post("/classify", files={"image": (name, data, "image/jpeg")})
            assert response.status_code == 200, response.text
            assert classify_problem(response.text) is None
            body = response.json()
            assert body["label"] == labels[int(scores.argmax())]
            for entry in body["top_k"]:
                assert entry["score"] == pytest.approx(scores[labels.index(entry["label"])],
                                                       abs=1e-5)
        batch = client.post("/classify_batch",
                            files=[("images", (n, d, "image/jpeg")) for n, d in photos])
        assert batch.status_code == 200 and batch_problem(batch.text, len(photos)) is None
        assert [p["label"] for p in batch.json()["predictions"]] == \
            [labels[int(row.argmax())] for row in expected]


def test_baseline_refuses_a_non_image_with_400(baseline):
    response = httpx.post(f"{baseline.url}/classify", timeout=30,
                          files={"image": ("notes.jpg", b"not a photo at all", "image/jpeg")})
    assert response.status_code == 400
    assert response.json()["detail"]["reason"] == "not_an_image"
    assert httpx.get(f"{baseline.url}/readyz", timeout=10).status_code == 200
