"""Service fixtures: a model exported by `trainer export`, a tiny hand-built ONNX CNN for what
needs a model of a given speed, and a real `bentoml serve`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from loadtests.servers import SERVICE_TARGET, ServerProcess, start_bentoml
from service.contract import ONNX_INPUT, ONNX_OUTPUT, ModelContract
from tests.conftest import REPO

LABELS = ["dress", "hat", "longsleeve", "outwear", "pants", "shirt", "shoes", "shorts", "skirt",
          "t-shirt"]
INPUT_SIZE = 64


def build_tiny_cnn(path: Path, contract: ModelContract, seed: int = 0,
                   slow_layers: int = 0) -> Path:
    """Conv(3->8, 3x3, stride 2) -> ReLU -> global average pool -> Gemm(8->C), dynamic batch.

    `slow_layers` adds that many 512x512 MatMuls (one shared weight) to make inference take
    tens of ms, for overload tests.
    """
    rng = np.random.default_rng(seed)
    classes = len(contract.labels)
    weights = [
        numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "conv_b"),
        numpy_helper.from_array(rng.normal(0, 2.0, (8, classes)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (classes,)).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", [ONNX_INPUT, "conv_w", "conv_b"], ["conv"], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [ONNX_OUTPUT]),
    ]
    if slow_layers:
        weights += [
            numpy_helper.from_array(rng.normal(0, 0.3, (8, 512)).astype(np.float32), "up_w"),
            numpy_helper.from_array(np.eye(512, dtype=np.float32) * 0.99, "slow_w"),
            numpy_helper.from_array(rng.normal(0, 0.3, (512, 8)).astype(np.float32), "down_w")]
        chain = [helper.make_node("MatMul", ["flat", "up_w"], ["slow0"])]
        chain += [helper.make_node("MatMul", [f"slow{i}", "slow_w"], [f"slow{i + 1}"])
                  for i in range(slow_layers)]
        chain += [helper.make_node("MatMul", [f"slow{slow_layers}", "down_w"], ["slow_out"])]
        nodes = nodes[:4] + chain + [
            helper.make_node("Gemm", ["slow_out", "fc_w", "fc_b"], [ONNX_OUTPUT])]
    size = contract.input_size
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, ["batch", classes])],
        initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # onnx writes 14; onnxruntime 1.31 reads at most 13
    helper.set_model_props(model, contract.to_metadata())
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def tiny_contract(version: str = "test-1") -> ModelContract:
    return ModelContract(version=version, labels=LABELS, input_size=INPUT_SIZE,
                         architecture="tiny-cnn")


@pytest.fixture(scope="session")
def exported_onnx(tmp_path_factory, demo_catalog) -> Path:
    """A real trainer run on 200 demo photos (head only, 128 px: ~40 s with the export) through
    `trainer export` (ONNX + contract + parity and accuracy gate), as a user's model gets to
    the service. Its run folder is two levels up (dataset.json names the photos it used)."""
    from trainer.config import TrainConfig
    from trainer.export import export
    from trainer.train import train

    run = tmp_path_factory.mktemp("exported") / "run"
    train(TrainConfig(data=demo_catalog, out=run, epochs=0, head_epochs=8, max_train_images=200,
                      max_val_images=30, image_size=128))
    return export(run, save=False).onnx_path


def held_out_photos(exported: Path, catalog: Path) -> list[tuple[str, Path]]:
    """(label, photo) of the catalog that the exported model's run neither trained nor
    validated on."""
    info = json.loads((exported.parents[1] / "dataset.json").read_text())
    used = {Path(path).resolve() for path, _ in info["train_samples"] + info["val_samples"]}
    return [(folder.name, photo) for folder in sorted(catalog.iterdir()) if folder.is_dir()
            for photo in sorted(folder.iterdir()) if photo.resolve() not in used]


def onnx_contract(path: Path) -> ModelContract:
    """The contract a model file carries, as the service reads it."""
    return ModelContract.from_metadata({p.key: p.value for p in onnx.load(path).metadata_props})


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    return build_tiny_cnn(tmp_path_factory.mktemp("model") / "tiny.onnx", tiny_contract())


def serve(env: dict[str, str], folder: Path, *, name: str = "serve",
          target: str = SERVICE_TARGET, cwd: Path = REPO) -> ServerProcess:
    """`bentoml serve` with these settings (MODEL_TAG among them, or the store's latest) on
    127.0.0.1, ready for requests; its log is folder/<name>.log, its tail shown on failure."""
    settings = dict(env)
    return start_bentoml(settings.pop("MODEL_TAG", None), target=target, settings=settings,
                         log_dir=folder, name=name, cwd=cwd)


SERVER_ENV = {
    "CLASSIFIER_MAX_IMAGE_BYTES": str(2 * 2**20),
    "CLASSIFIER_MAX_PIXELS": str(20_000_000),
    "CLASSIFIER_MAX_IMAGES_PER_REQUEST": "8",
    "CLASSIFIER_ORT_THREADS": "1",
    # The reference the API tests compare with is ONNX Runtime fp32 on the same file.
    "CLASSIFIER_RUNTIME": "onnxruntime",
    "CLASSIFIER_PRECISION": "fp32",
}


@pytest.fixture(scope="module")
def server(exported_onnx, tmp_path_factory):
    """The service on the trainer-exported model, started once per test module."""
    with serve({**SERVER_ENV, "MODEL_TAG": str(exported_onnx)},
               tmp_path_factory.mktemp("serve")) as srv:
        yield srv


def quantize_int8(fp32_path: Path, int8_path: Path) -> Path:
    """A real int8 copy (dynamic quantization of Conv/MatMul/Gemm) with the same contract."""
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(fp32_path), str(int8_path))
    model = onnx.load(int8_path)
    del model.metadata_props[:]
    for prop in onnx.load(fp32_path).metadata_props:
        model.metadata_props.add(key=prop.key, value=prop.value)
    onnx.save(model, int8_path)
    return int8_path
