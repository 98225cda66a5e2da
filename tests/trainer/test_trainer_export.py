"""Export: the ONNX file computes what torch computes, carries the contract, and the BentoML
model store entry loads the way the service loads it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from service.contract import ONNX_INPUT, ONNX_OUTPUT
from service.model_store import read_contract, resolve_model
from trainer.data import EvalImages, Skipped
from trainer.export import run_samples
from trainer.onnx_graph import onnx_logits, session, torch_logits
from trainer.runs import RunDir, load_trained


@pytest.fixture(scope="module")
def exported(int8_export):
    return int8_export[0]


def test_onnx_matches_torch_on_real_photos(exported, tiny_run):
    model, contract, _ = load_trained(tiny_run)
    images = EvalImages(run_samples(RunDir(tiny_run), "val"), contract, Skipped()).tensor.numpy()
    sess = session(exported.onnx_path)
    ours, theirs = onnx_logits(sess, images), torch_logits(model, images)
    assert np.abs(ours - theirs).max() < 1e-3
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    parity = exported.report["parity"]
    assert parity["top1_identical"] and parity["max_abs_logit_diff"] < 1e-3
    assert exported.report["val_acc_onnx"] == exported.report["val_acc_torch"]


def test_batch_axis_is_dynamic_and_named_as_the_contract_says(exported, tiny_run):
    sess = session(exported.onnx_path)
    assert [i.name for i in sess.get_inputs()] == [ONNX_INPUT]
    assert [o.name for o in sess.get_outputs()] == [ONNX_OUTPUT]
    contract = read_contract(exported.onnx_path)
    size = contract.input_size
    for batch in (1, 5):
        x = np.zeros((batch, 3, size, size), np.float32)
        assert sess.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0].shape == (batch, len(contract.labels))


def test_contract_is_in_the_onnx_metadata(exported, tiny_run):
    _, trained_contract, _ = load_trained(tiny_run)
    assert read_contract(exported.onnx_path) == trained_contract
    assert trained_contract.labels == ["hat", "pants", "shoes", "t-shirt"]
    assert trained_contract.architecture == "tf_efficientnet_lite0"
    assert (trained_contract.mean, trained_contract.std) == ((0.5,) * 3, (0.5,) * 3)
    props = {p.key: p.value for p in onnx.load(str(exported.onnx_path)).metadata_props}
    assert json.loads(props["labels"]) == trained_contract.labels


def test_int8_model_is_quantized_and_reported(exported, tiny_run):
    assert exported.int8_path.is_file()
    proto = onnx.load(str(exported.int8_path))
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert read_contract(exported.int8_path) == read_contract(exported.onnx_path)
    report = exported.report["int8"]
    assert report["images_per_s_batch16"] > 0 and report["calibration_images"] > 0
    # The accuracy the export reports is the int8 file's own, measured again here, and close
    # to fp32's: a broken quantization (wrong calibration, lost scales) lands near chance.
    _, contract, _ = load_trained(tiny_run)
    samples = run_samples(RunDir(tiny_run), "val")
    images = EvalImages(samples, contract, Skipped()).tensor.numpy()
    labels = np.array([s.label for s in samples])
    int8_acc = float((onnx_logits(session(exported.int8_path), images).argmax(1) == labels).mean())
    assert report["val_acc"] == pytest.approx(int8_acc)
    assert report["val_acc_change"] >= -0.25, report
    assert int8_acc > 2 / len(contract.labels), report  # well above guessing


def test_bentoml_store_entry_loads(exported, tiny_run):
    resolved = resolve_model("trainer-test-model:latest")
    assert resolved.tag == exported.tag
    assert resolved.contract == read_contract(exported.onnx_path)
    assert resolved.metrics["val_acc"] == exported.report["val_acc_onnx"]
    store_dir = resolved.onnx_path.parent
    assert (store_dir / "model.int8.onnx").is_file()
    assert (store_dir / "MODEL_CARD.md").is_file()
    x = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    assert np.array_equal(session(resolved.onnx_path).run(None, {ONNX_INPUT: x})[0],
                          session(exported.onnx_path).run(None, {ONNX_INPUT: x})[0])


def test_evaluation_report_is_written(tiny_run):
    report = tiny_run / "report"
    for name in ("confusion_matrix.png", "curves.png", "worst_mistakes.png"):
        assert (report / name).stat().st_size > 5000, name
        assert (report / name).read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((report / "metrics.json").read_text())
    matrix = json.loads((report / "confusion_matrix.json").read_text())
    total = np.array(matrix["rows_true_cols_predicted"])
    assert total.sum() == metrics["images"]
    assert metrics["accuracy"] == pytest.approx(np.trace(total) / total.sum())
    assert set(metrics["per_class"]) == {"hat", "pants", "shoes", "t-shirt"}
    card = (report / "MODEL_CARD.md").read_text()
    assert f"accuracy **{metrics['accuracy']:.4f}**" in card and "## Config" in card


def test_flip_tta_graph_averages_a_photo_and_its_mirror(exported, tiny_run):
    from trainer.tta import FlipAverage

    model, contract, _ = load_trained(tiny_run)
    images = EvalImages(run_samples(RunDir(tiny_run), "val"), contract, Skipped()).tensor.numpy()
    report = exported.report["flip_tta"]
    sess = session(Path(report["file"]))
    ours = onnx_logits(sess, images)
    assert np.abs(ours - torch_logits(FlipAverage(model), images)).max() < 1e-3
    # Mirror-invariant by construction: a photo and its mirror image score the same.
    mirrored = np.ascontiguousarray(images[:, :, :, ::-1])
    assert np.abs(onnx_logits(sess, mirrored) - ours).max() < 1e-3
    plain = onnx_logits(session(exported.onnx_path), images)
    assert np.abs(onnx_logits(session(exported.onnx_path), mirrored) - plain).max() > 1e-3
    assert report["val_acc_gain"] == pytest.approx(report["val_acc"] - report["val_acc_plain"])
    assert report["val_acc_plain"] == exported.report["val_acc_onnx"]
    assert read_contract(Path(report["file"])) == read_contract(exported.onnx_path)
