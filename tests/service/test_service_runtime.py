"""The runtime choice (auto and forced), the export's accuracy gate as the service applies it,
and OpenVINO and ONNX Runtime serving a real exported model (fp32 and `--int8`) alike."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import httpx
import numpy as np
import onnx
import pytest
from onnx import helper

from service import runtime as rt
from service.contract import ContractError, load_and_preprocess
from service.model_store import (
    read_gate,
    resolve_model,
    save_to_store,
    select_variant,
)
from tests.service.conftest import SERVER_ENV, serve


def test_auto_prefers_cuda_then_openvino_on_x86_then_onnxruntime(monkeypatch):
    monkeypatch.setattr(rt.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(rt, "openvino_installed", lambda: True)
    assert rt.choose_runtime("auto", "auto") == ("openvino", "cpu")
    monkeypatch.setattr(rt.platform, "machine", lambda: "aarch64")
    assert rt.choose_runtime("auto", "auto") == ("onnxruntime", "cpu")
    monkeypatch.setattr(rt.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(rt, "openvino_installed", lambda: False)
    assert rt.choose_runtime("auto", "auto") == ("onnxruntime", "cpu")
    monkeypatch.setattr(rt.ort, "get_available_providers", lambda: [rt.CUDA, rt.CPU])
    assert rt.choose_runtime("auto", "auto") == ("onnxruntime", "cuda")
    monkeypatch.setattr(rt, "openvino_installed", lambda: True)
    assert rt.choose_runtime("auto", "cpu") == ("openvino", "cpu")  # CPU forced: no CUDA


def test_forced_runtimes(monkeypatch):
    assert rt.choose_runtime("onnxruntime", "cpu") == ("onnxruntime", "cpu")
    with pytest.raises(RuntimeError, match="runs on the CPU here"):
        rt.choose_runtime("openvino", "cuda")
    monkeypatch.setattr(rt, "openvino_installed", lambda: False)
    with pytest.raises(RuntimeError, match="openvino is not installed"):
        rt.choose_runtime("openvino", "auto")


def test_both_runtimes_compute_the_same_logits(tiny_onnx):
    pytest.importorskip("openvino")
    x = np.random.default_rng(0).normal(size=(5, 3, 64, 64)).astype(np.float32)
    ort_logits = rt.open_runtime(tiny_onnx, runtime="onnxruntime", threads=1).run(x)
    ov = rt.open_runtime(tiny_onnx, runtime="openvino", precision="fp32", threads=1)
    assert ov.name == "openvino" and ov.precision == "fp32"
    assert np.abs(ov.run(x) - ort_logits).max() < 1e-4
    assert np.abs(ov.run(x[:1]) - ort_logits[:1]).max() < 1e-4  # dynamic batch axis
    with pytest.raises(RuntimeError, match="bf16 is served by OpenVINO"):
        rt.open_runtime(tiny_onnx, runtime="onnxruntime", precision="bf16")


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """`trainer export --int8` of a real (head-only Lite0) run, into the model store."""
    pytest.importorskip("openvino")
    from trainer.export import export
    from trainer.variants import gate_variants

    run = tmp_path_factory.mktemp("runtime") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export"))
    result = export(run, int8=True, name="runtime-test")
    gate = result.report["accuracy_gate"]
    assert read_gate(result.onnx_path) == gate
    # The run validates on 10 photos, so one photo is 10 points: re-gate with a budget this
    # size of validation set can meet, to serve every variant below whatever it scored.
    from trainer.data import EvalImages, Skipped
    from trainer.export import run_samples
    from trainer.onnx_graph import torch_logits
    from trainer.runs import RunDir, load_trained

    model, contract, _ = load_trained(run)
    val = EvalImages(run_samples(RunDir(run), "val"), contract, Skipped())
    images, labels = val.tensor.numpy(), val.labels.numpy()
    # On a CPU without VNNI, int8 flips a photo or two of this barely trained model and the
    # export's own gate, correctly, refuses it. The re-gated files go into the store as a new
    # entry: the store checksums every file, so an entry changed in place is refused.
    gate_variants(result.onnx_path, result.int8_path, images, labels,
                  torch_logits(model, images), budget=1.0)
    tag = save_to_store(result.onnx_path, name="runtime-test", extra_files=[result.int8_path])
    assert read_gate(resolve_model(tag).onnx_path) == read_gate(result.onnx_path)
    result = dataclasses.replace(result, tag=tag)
    return result, images, labels, torch_logits(model, images)


def _answers(server, photos) -> list[str]:
    return [httpx.post(f"{server.url}/classify", files={"image": ("p.jpg", photo)},
                       timeout=60).json()["label"] for photo in photos]


def _photos(catalog, per_label: int = 2) -> list[bytes]:
    return [p.read_bytes() for label in sorted(d.name for d in catalog.iterdir())
            for p in sorted((catalog / label).iterdir())[:per_label]]


def test_openvino_and_onnxruntime_answer_alike_on_real_photos(exported, demo_catalog, tmp_path):
    result = exported[0]
    photos = _photos(demo_catalog)
    answers = {}
    for runtime in ("openvino", "onnxruntime"):
        env = {**SERVER_ENV, "MODEL_TAG": result.tag, "CLASSIFIER_RUNTIME": runtime,
               "CLASSIFIER_PRECISION": "fp32"}
        with serve(env, tmp_path, name=runtime) as server:
            card = httpx.get(f"{server.url}/model").json()
            assert (card["runtime"], card["precision"], card["file"]) == (runtime, "fp32",
                                                                          "model.onnx")
            assert card["accuracy_gate"]["passed"] and card["accuracy_gate"]["runtime"] == runtime
            info = (f'classifier_runtime_info{{device="cpu",precision="fp32",'
                    f'runtime="{runtime}"}} 1.0')
            assert info in httpx.get(f"{server.url}/metrics").text
            answers[runtime] = _answers(server, photos)
    assert answers["openvino"] == answers["onnxruntime"]


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_the_int8_that_export_writes_is_served(exported, demo_catalog, tmp_path, runtime):
    result = exported[0]
    photos = _photos(demo_catalog, per_label=1)
    contract = resolve_model(result.tag).contract
    local = rt.open_runtime(result.int8_path, runtime=runtime, precision="int8", threads=1)
    expected = [contract.labels[int(local.run(load_and_preprocess(p, contract)[None]).argmax())]
                for p in photos]
    env = {**SERVER_ENV, "MODEL_TAG": result.tag, "CLASSIFIER_RUNTIME": runtime,
           "CLASSIFIER_PRECISION": "int8"}
    with serve(env, tmp_path, name=runtime) as server:
        card = httpx.get(f"{server.url}/model").json()
        assert (card["file"], card["precision"], card["runtime"]) == ("model.int8.onnx", "int8",
                                                                      runtime)
        assert card["accuracy_gate"]["precision"] == "int8"
        assert _answers(server, photos) == expected


def _negated(int8_path, target):
    """A variant made to fail: the int8 graph with its logits negated (top-1 = least likely)."""
    model = onnx.load(int8_path)
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["raw_logits" if out == "logits" else out for out in node.output]
    graph.node.append(helper.make_node("Neg", ["raw_logits"], ["logits"]))
    onnx.save(model, target)
    return target


def test_a_variant_that_fails_the_gate_is_refused(exported, tmp_path):
    from loadtests.servers import free_port
    from tests.conftest import REPO
    from trainer.variants import gate_variants

    result, images, labels, torch_logits = exported
    folder = tmp_path / "export"
    folder.mkdir()
    fp32 = shutil.copy(result.onnx_path, folder / "model.onnx")
    int8 = _negated(result.int8_path, folder / "model.int8.onnx")
    gate = gate_variants(fp32, int8, images, labels, torch_logits)  # the default budget
    assert not gate["variants"]["onnxruntime-int8"]["passed"]
    assert gate["variants"]["onnxruntime-int8"]["val_acc_change"] < -0.003
    assert gate["default"] not in ("onnxruntime-int8", "openvino-int8")

    model = resolve_model(str(fp32))
    with pytest.raises(ContractError, match="onnxruntime-int8 loses .* points"):
        select_variant(model, "onnxruntime", "int8")
    assert select_variant(model, "onnxruntime", "auto")[1] == "fp32"  # auto skips it
    env = {"MODEL_TAG": str(fp32), "CLASSIFIER_RUNTIME": "onnxruntime",
           "CLASSIFIER_PRECISION": "int8"}
    started = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "service.service:ProductClassifier",
         "--host", "127.0.0.1", "--port", str(free_port())], cwd=REPO,
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
        check=False)
    assert started.returncode != 0
    assert "onnxruntime-int8 loses" in started.stderr + started.stdout

    # A file changed after the gate measured it is refused too.
    shutil.copy(result.int8_path, int8)
    with pytest.raises(ContractError, match="changed since its accuracy was checked"):
        select_variant(model, "onnxruntime", "int8")
