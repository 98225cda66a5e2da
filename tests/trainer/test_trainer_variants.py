"""The export's accuracy gate: every servable runtime + precision measured against torch on the
validation photos, written into model.onnx's metadata, the fastest passing one the default."""

from __future__ import annotations

import pytest

from service.model_store import read_gate


@pytest.fixture(scope="module")
def gated(int8_export):
    pytest.importorskip("openvino")
    return int8_export


def test_every_variant_is_checked_and_written_into_the_model(gated):
    result, _ = gated
    gate = read_gate(result.onnx_path)
    assert gate == result.report["accuracy_gate"]
    assert {"onnxruntime-fp32", "openvino-fp32", "onnxruntime-int8", "openvino-int8"} <= set(
        gate["variants"])
    reference = gate["variants"]["onnxruntime-fp32"]
    assert reference["val_acc"] == gate["reference_val_acc"] == result.report["val_acc_onnx"]
    assert reference["top1_agreement"] == 1.0  # the fp32 parity check already demands it
    for name, entry in gate["variants"].items():
        assert 0 <= entry["val_acc"] <= 1 and 0 <= entry["top1_agreement"] <= 1, name
        assert entry["passed"] == (gate["reference_val_acc"] - entry["val_acc"]
                                   <= gate["budget"] + 1e-9)
        assert entry["images_per_s"] > 0
    assert gate["variants"]["onnxruntime-int8"]["sha256"]


def test_default_is_the_fastest_variant_within_the_budget_and_is_said(gated):
    result, output = gated
    gate = result.report["accuracy_gate"]
    passed = {n: e["images_per_s"] for n, e in gate["variants"].items() if e["passed"]}
    assert gate["default"] == max(passed, key=passed.get)
    assert f"default serving variant: {gate['default']}" in output


# --- int8 on CPUs without VNNI ---------------------------------------------------------------

def _int8_weights(path):
    """Every int8 weight tensor of a QDQ file (the initializers its DequantizeLinear nodes read)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    read = {node.input[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    return [numpy_helper.to_array(t) for t in model.graph.initializer
            if t.name in read and t.data_type == onnx.TensorProto.INT8
            and np.asarray(numpy_helper.to_array(t)).ndim == 4]


def test_reduce_range_writes_7_bit_weights_and_the_gate_says_which(gated, tmp_path):
    from service.runtime import int8_products_saturate
    from trainer.data import EvalImages, Skipped
    from trainer.export import run_samples
    from trainer.onnx_graph import quantize_int8
    from trainer.runs import RunDir, load_trained

    result, _ = gated
    gate = result.report["accuracy_gate"]
    assert gate["variants"]["onnxruntime-int8"]["weight_bits"] == 8
    assert gate["int8_products_saturate"] == int8_products_saturate()
    eight = _int8_weights(result.int8_path)
    assert eight and max(abs(int(w.min())) for w in eight) == 127  # symmetric 8-bit scales
    run = RunDir(result.onnx_path.parents[1])
    calibration = EvalImages(run_samples(run, "train")[:8], load_trained(run.root)[1],
                             Skipped()).tensor.numpy()
    seven_path = tmp_path / "model.int8.onnx"
    quantize_int8(result.onnx_path, seven_path, calibration, reduce_range=True)
    seven = _int8_weights(seven_path)
    assert len(seven) == len(eight)
    assert max(max(abs(int(w.min())), int(w.max())) for w in seven) <= 64  # 2*255*64 < 2**15


def test_8_bit_weights_checked_with_vnni_are_refused_on_a_cpu_without_it(gated):
    """`saturates` stands for the serving CPU (this machine cannot be both): an x86 CPU without
    VNNI refuses int8 by name and auto passes over it, unless the weights have 7 bits or the
    gate itself was measured on such a CPU; fp32 is never affected."""
    import dataclasses

    from service.contract import ContractError
    from service.model_store import cpu_refusal, resolve_model, select_variant

    result, _ = gated
    gate = {**result.report["accuracy_gate"], "int8_products_saturate": False}
    model = dataclasses.replace(resolve_model(str(result.onnx_path)), gate=gate)
    assert "--int8-reduce-range" in cpu_refusal(gate, "onnxruntime-int8", saturates=True)
    with pytest.raises(ContractError, match="checked on a CPU with VNNI"):
        select_variant(model, "onnxruntime", "int8", saturates=True)
    assert select_variant(model, "onnxruntime", "auto", saturates=True)[1] != "int8"
    assert select_variant(model, "onnxruntime", "fp32", saturates=True)[1] == "fp32"
    assert cpu_refusal(gate, "onnxruntime-int8", saturates=False) is None
    assert cpu_refusal(gate, "onnxruntime-fp32", saturates=True) is None
    measured_here = {**gate, "int8_products_saturate": True}
    assert cpu_refusal(measured_here, "onnxruntime-int8", saturates=True) is None
    seven = {**gate, "variants": {**gate["variants"], "onnxruntime-int8": {
        **gate["variants"]["onnxruntime-int8"], "weight_bits": 7}}}
    assert cpu_refusal(seven, "onnxruntime-int8", saturates=True) is None
    if seven["variants"]["onnxruntime-int8"]["passed"]:
        served = dataclasses.replace(model, gate=seven)
        assert select_variant(served, "onnxruntime", "int8", saturates=True)[1] == "int8"


def test_the_cpu_probe_reads_the_flags_line(tmp_path):
    import platform

    from service.runtime import int8_products_saturate

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the probe answers False off x86")
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    vnni = tmp_path / "vnni"
    vnni.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert int8_products_saturate(avx2) and not int8_products_saturate(vnni)
    assert not int8_products_saturate(tmp_path / "missing")


# --- every attribute head of every variant -------------------------------------------------

def _head_negated(fp32_path, target, output="attr_colour"):
    """A variant whose one attribute head is made to fail: the fp32 graph with that head's
    logits negated (its top-1 becomes the least likely value), every other output untouched."""
    import onnx
    from onnx import helper

    model = onnx.load(fp32_path)
    for node in model.graph.node:
        node.output[:] = [f"raw_{output}" if out == output else out for out in node.output]
    model.graph.node.append(helper.make_node("Neg", [f"raw_{output}"], [output]))
    onnx.save(model, target)
    return target


@pytest.fixture(scope="module")
def head_references(attribute_export):
    """The multi-head run's validation photos, main torch logits and head references, as
    `trainer export` computes them for its gate."""
    from trainer.attributes import head_references, load_multihead
    from trainer.data import EvalImages, Skipped
    from trainer.export import run_samples
    from trainer.onnx_graph import torch_logits
    from trainer.runs import RunDir, load_trained

    run = RunDir(attribute_export.parents[1])
    model, contract, checkpoint = load_trained(run.root)
    val = EvalImages(run_samples(run, "val"), contract, Skipped())
    images, labels = val.tensor.numpy(), val.labels.numpy()
    multi = load_multihead(checkpoint, model)
    return (images, labels, torch_logits(model, images),
            head_references(multi, images, val.samples, run))


def test_every_head_of_every_variant_is_gated_and_recorded(attribute_export, head_references):
    """The export's gate in model.onnx judges the colour head of every variant it ran: the
    head's accuracy over the validation photos whose colour is known, within the budget of
    ONNX Runtime fp32's (equal to torch's, which the parity check demands)."""
    import json

    gate = read_gate(attribute_export)
    export_report = json.loads((attribute_export.parent / "export.json").read_text())
    head = gate["heads"]["colour"]
    _, _, _, references = head_references
    assert head["val_known"] == int(references["colour"].known.sum()) > 0
    assert head["reference_val_acc"] == head["torch_val_acc"] == \
        export_report["attributes"]["colour"]["val_acc_torch"]
    ran = {name: entry for name, entry in gate["variants"].items() if "error" not in entry}
    assert "onnxruntime-fp32" in ran
    for name, entry in ran.items():
        colour = entry["heads"]["colour"]
        assert colour["val_known"] == head["val_known"], name
        assert 0 <= colour["val_acc"] <= 1 and 0 <= colour["top1_agreement"] <= 1, name
        assert colour["passed"] == (head["reference_val_acc"] - colour["val_acc"]
                                    <= gate["budget"] + 1e-9), name
        main_passed = gate["reference_val_acc"] - entry["val_acc"] <= gate["budget"] + 1e-9
        assert entry["passed"] == (main_passed and colour["passed"]), name
    assert ran["onnxruntime-fp32"]["heads"]["colour"]["top1_agreement"] == 1.0


def test_a_variant_whose_head_fails_is_refused_though_its_label_passes(
        attribute_export, head_references, tmp_path):
    import dataclasses
    import os
    import shutil
    import subprocess
    import sys

    from loadtests.servers import free_port
    from service.contract import ContractError
    from service.model_store import resolve_model, select_variant, serve_choice
    from tests.conftest import REPO
    from trainer.variants import gate_variants

    images, labels, torch_logits, references = head_references
    folder = tmp_path / "export"
    folder.mkdir()
    fp32 = shutil.copy(attribute_export, folder / "model.onnx")
    # Served as "int8": the fp32 graph, so its main label is exactly fp32's, but its colour
    # head answers the least likely value.
    int8 = _head_negated(attribute_export, folder / "model.int8.onnx")
    gate = gate_variants(fp32, int8, images, labels, torch_logits, heads=references)
    broken = gate["variants"]["onnxruntime-int8"]
    assert gate["heads"]["colour"]["reference_val_acc"] > gate["budget"]  # it can lose
    assert broken["val_acc_change"] == 0 and broken["top1_agreement"] == 1.0  # label intact
    assert not broken["heads"]["colour"]["passed"] and broken["failed_heads"] == ["colour"]
    assert broken["heads"]["colour"]["val_acc_change"] < -gate["budget"]
    assert not broken["passed"] and gate["default"] not in ("onnxruntime-int8", "openvino-int8")
    assert gate["variants"]["onnxruntime-fp32"]["passed"]

    model = resolve_model(str(fp32))
    with pytest.raises(ContractError, match="attribute head 'colour' loses .* points"):
        select_variant(model, "onnxruntime", "int8")
    assert select_variant(model, "onnxruntime", "auto")[1] == "fp32"  # auto skips it
    started = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "service.service:ProductClassifier",
         "--host", "127.0.0.1", "--port", str(free_port())], cwd=REPO,
        env={**os.environ, "MODEL_TAG": str(fp32), "CLASSIFIER_RUNTIME": "onnxruntime",
             "CLASSIFIER_PRECISION": "int8"}, capture_output=True, text=True, timeout=120,
        check=False)
    assert started.returncode != 0
    assert "attribute head 'colour' loses" in started.stderr + started.stdout

    # A gate from before heads were gated (no per-head figures): only the fp32 reference,
    # whose heads the parity check held equal to torch's, may serve a multi-head model.
    old = {**gate, "variants": {name: {k: v for k, v in entry.items()
                                       if k not in ("heads", "failed_heads")}
                                for name, entry in gate["variants"].items()}}
    old.pop("heads")
    old_model = dataclasses.replace(model, gate=old)
    assert select_variant(old_model, "onnxruntime", "fp32")[1] == "fp32"
    assert select_variant(old_model, "onnxruntime", "auto")[1] == "fp32"
    with pytest.raises(ContractError, match=r"heads \['colour'\] were not checked"):
        select_variant(old_model, "onnxruntime", "int8")
    # CLASSIFIER_RUNTIME=auto picked OpenVINO, which this old gate never checked the head on:
    # auto serves ONNX Runtime fp32 instead of refusing; OpenVINO asked for by name refuses.
    assert serve_choice(old_model, "openvino", "auto", runtime_was_auto=True)[::2] == (
        "onnxruntime", "fp32")
    with pytest.raises(ContractError, match=r"heads \['colour'\] were not checked"):
        serve_choice(old_model, "openvino", "auto", runtime_was_auto=False)
