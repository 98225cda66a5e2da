"""The export's accuracy gate: every servable runtime + precision measured against torch on the
validation photos, written into model.onnx's metadata, the fastest passing one the default."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from service.model_store import read_gate
from trainer.export import export


@pytest.fixture(scope="module")
def gated(tiny_run):
    pytest.importorskip("openvino")
    output = io.StringIO()
    result = export(tiny_run, int8=True, save=False, console=Console(file=output, width=200))
    return result, output.getvalue()


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
