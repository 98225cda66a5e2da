"""A model the service cannot use stops `bentoml serve` at once, with a message saying why."""

from __future__ import annotations

import os
import subprocess
import sys

import onnx
import pytest

from loadtests.servers import free_port
from service.contract import ModelContract
from service.runtime import choose_providers, create_session
from tests.conftest import REPO
from tests.service.conftest import LABELS, build_tiny_cnn


def _no_metadata(tmp_path, tiny_onnx):
    model = onnx.load(tiny_onnx)
    del model.metadata_props[:]
    onnx.save(model, tmp_path / "m.onnx")
    return str(tmp_path / "m.onnx")


def _too_few_labels(tmp_path, tiny_onnx):
    path = build_tiny_cnn(tmp_path / "m.onnx", ModelContract(version="v", labels=LABELS,
                                                              input_size=64))
    model = onnx.load(path)
    wrong = ModelContract(version="v", labels=LABELS[:3], input_size=64).to_metadata()
    for prop in model.metadata_props:
        prop.value = wrong.get(prop.key, prop.value)
    onnx.save(model, path)
    return str(path)


def _wrong_input_size(tmp_path, tiny_onnx):
    model = onnx.load(tiny_onnx)
    wrong = ModelContract(version="v", labels=LABELS, input_size=96).to_metadata()
    for prop in model.metadata_props:
        prop.value = wrong.get(prop.key, prop.value)
    onnx.save(model, tmp_path / "m.onnx")
    return str(tmp_path / "m.onnx")


CASES = {
    "no contract in metadata": (_no_metadata, "no 'product_classifier.contract'"),
    "labels disagree with outputs": (_too_few_labels, "outputs 10 classes but"),
    "input size disagrees with graph": (_wrong_input_size, "does not match the contract"),
    "tag not in the model store": (lambda *_: "no-such-model:latest", "no model 'no-such-model"),
    "int8 asked for, none exported": (lambda _, tiny: str(tiny), "CLASSIFIER_PRECISION=int8 but"),
}
EXTRA_ENV = {"int8 asked for, none exported": {"CLASSIFIER_PRECISION": "int8"}}


@pytest.mark.parametrize("case", list(CASES))
def test_unusable_model_stops_startup_with_a_reason(tmp_path, tiny_onnx, case):
    make_model, message = CASES[case]
    env = {"MODEL_TAG": make_model(tmp_path, tiny_onnx), **EXTRA_ENV.get(case, {})}
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "service.service:ProductClassifier",
         "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=REPO, env={**os.environ, **env},
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout


def test_cuda_request_without_gpu_runtime_is_a_clear_error():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    assert choose_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="install onnxruntime-gpu"):
        choose_providers("cuda")


@pytest.mark.parametrize("spin_wait, expected", [(False, "0"), (True, "1")])
def test_session_threads_spin_only_when_asked(tiny_onnx, spin_wait, expected):
    """Off by default in the service: spinning ORT threads steal the API process's cores."""
    session = create_session(tiny_onnx, threads=2, device="cpu", spin_wait=spin_wait)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == expected
