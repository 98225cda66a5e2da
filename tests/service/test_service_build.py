"""`bentoml build` packs service + model without torch; the built Bento serves real photos."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from service.model_store import save_to_store
from tests.conftest import REPO
from tests.service.conftest import LABELS, SERVER_ENV, serve

BENTOML = [sys.executable, "-m", "bentoml"]


def build(*args: str, env: dict[str, str] | None = None) -> Path:
    """Run `bentoml build` in the repo; return the Bento's folder in the model store home."""
    result = subprocess.run([*BENTOML, "build", "-o", "tag", *args], cwd=REPO,
                            env={**os.environ, **(env or {})}, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    return Path(os.environ["BENTOML_HOME"]) / "bentos" / name / version


@pytest.fixture(scope="module")
def stored_model(tiny_onnx) -> str:
    return save_to_store(tiny_onnx, metrics={"top1_accuracy": 0.5})


def test_bento_holds_service_code_serve_deps_and_model_but_no_torch(stored_model):
    bento = build()
    sources = sorted(p.relative_to(bento / "src").as_posix()
                     for p in (bento / "src").rglob("*.py"))
    assert sources and all(s.startswith("service/") for s in sources), sources
    requirements = (bento / "env/python/requirements.txt").read_text()
    assert "onnxruntime" in requirements and "bentoml" in requirements
    assert "torch" not in requirements and "timm" not in requirements
    for source in (bento / "src").rglob("*.py"):
        assert "import torch" not in source.read_text(), source
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert [m["tag"] for m in info["models"]] == [stored_model]
    assert info["service"] == "service.service:ProductClassifier"


def test_gpu_variant_builds_with_cuda_image_and_gpu_resources(stored_model):
    bento = build("-f", "bentofile.gpu.yaml",
                  env={"CLASSIFIER_GPUS": "1", "CLASSIFIER_DEVICE": "cuda"})
    requirements = (bento / "env/python/requirements.txt").read_text()
    assert "onnxruntime-gpu" in requirements and "torch" not in requirements
    assert "FROM nvidia/cuda:" in (bento / "env/docker/Dockerfile").read_text()
    services = yaml.safe_load((bento / "bento.yaml").read_text())["services"]
    model_service = next(s for s in services if s["name"] == "onnx-model")
    assert model_service["config"]["resources"] == {"gpu": 1}


def test_built_bento_serves_from_the_model_store(stored_model, demo_catalog, tmp_path):
    bento = build()
    tag = f"{bento.parent.name}:{bento.name}"
    env = {k: v for k, v in SERVER_ENV.items()}  # MODEL_TAG unset: product-classifier:latest
    with serve(env, tmp_path, target=tag, cwd=tmp_path) as server:
        card = httpx.get(f"{server.url}/model").json()
        assert card["tag"] == stored_model and card["metrics"] == {"top1_accuracy": 0.5}
        photo = min((demo_catalog / "shoes").iterdir()).read_bytes()
        response = httpx.post(f"{server.url}/classify", files={"image": ("s.jpg", photo)},
                              timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["label"] in LABELS
