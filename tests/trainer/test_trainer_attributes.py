"""Attribute heads: labels from manifest.csv (unknown masked), one head per attribute on the
shared backbone, per-attribute metrics in the report, one temperature per head fitted on the
validation photos whose value is known, one ONNX output per head with parity, and a
single-label dataset that trains and exports exactly as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from service.contract import CONTRACT_KEY, ModelContract, load_and_preprocess
from trainer.attributes import fit_attributes, read_attributes
from trainer.calibration import fit_temperature
from trainer.evaluate import evaluate
from trainer.heads import masked_cross_entropy, value_weights


def test_masked_loss_ignores_unknown_values_and_weights_rare_ones():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]], requires_grad=True)
    loss = masked_cross_entropy(logits, torch.tensor([0, 1, -1]))
    expected = torch.nn.functional.cross_entropy(logits[:2], torch.tensor([0, 1]))
    assert torch.isclose(loss, expected)
    nothing = masked_cross_entropy(logits, torch.tensor([-1, -1, -1]))
    nothing.backward()   # a batch of unknowns is no error, and no signal
    assert float(nothing.detach()) == 0.0 and float(logits.grad.abs().sum()) == 0.0
    weights = value_weights(np.array([0, 0, 0, 0, 1, -1, -1]), 2, "auto")
    assert weights[1] > weights[0] and abs(float(weights.mean()) - 1) < 1e-6
    assert value_weights(np.array([0, 1, -1]), 2, "auto") is None      # balanced: none


def test_multi_head_run_reports_and_exports_one_output_per_attribute(attribute_export):
    run = attribute_export.parents[1]
    contract = ModelContract.from_metadata(
        {p.key: p.value for p in onnx.load(attribute_export).metadata_props})
    values = contract.attributes["colour"]
    assert values == sorted(values) and len(values) >= 3 and "unknown" not in values
    session = ort.InferenceSession(str(attribute_export))
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert outputs == {"logits": ["batch", len(contract.labels)],
                       "attr_colour": ["batch", len(values)]}
    export = json.loads((run / "export" / "export.json").read_text())
    head = export["attributes"]["colour"]
    assert head["top1_identical"] and head["max_abs_logit_diff"] < 1e-3
    assert head["val_acc_onnx"] == head["val_acc_torch"] and head["val_known"] > 0

    # The run report: metrics + confusion matrix per attribute, in metrics.json and the card.
    metrics = evaluate(run)
    colour = metrics["attributes"]["colour"]
    table = read_attributes(json.loads((run / "config.json").read_text())["data"])
    val_files = [p for p, _ in json.loads((run / "dataset.json").read_text())["val_samples"]]
    known = sum(table.values_of(p)["colour"] in values for p in val_files)
    assert colour["images"] == known and colour["unknown"] == len(val_files) - known
    assert np.asarray(colour["confusion_matrix"]).sum() == known
    # The head's temperature with its ECE before/after (trainer.attributes) in the report.
    assert colour["calibration"]["temperature"] == contract.attribute_temperatures["colour"]
    assert {"ece_before", "ece_after"} <= set(colour["calibration"])
    card = (run / "report" / "MODEL_CARD.md").read_text()
    assert "## Attributes" in card and "confusion_matrix_attr_colour.png" in card
    calibration = colour["calibration"]
    assert (f"T {calibration['temperature']:.3f}, ECE {calibration['ece_before']:.4f} -> "
            f"{calibration['ece_after']:.4f}") in card
    assert (run / "report" / "confusion_matrix_attr_colour.png").is_file()
    # Done once per trained model: a second call finds the heads in best.pt.
    assert fit_attributes(run)["backbone"] == json.loads(
        (run / "attributes.json").read_text())["backbone"]


def test_each_head_gets_a_temperature_fitted_on_its_known_validation_photos(attribute_export):
    """The colour head's temperature is the one that minimises the NLL of its scores on the
    validation photos whose colour is known (refitted here from the exported ONNX file's own
    attr_colour outputs), it is in the contract the service reads, and ECE/NLL before and
    after are in attributes.json and the run report."""
    run = attribute_export.parents[1]
    contract = ModelContract.from_metadata(
        {p.key: p.value for p in onnx.load(attribute_export).metadata_props})
    fitted = json.loads((run / "attributes.json").read_text())["metrics"]["colour"]["calibration"]
    assert contract.attribute_temperatures == {"colour": fitted["temperature"]}

    values = contract.attributes["colour"]
    table = read_attributes(json.loads((run / "config.json").read_text())["data"])
    val_files = [p for p, _ in json.loads((run / "dataset.json").read_text())["val_samples"]]
    known = [(p, values.index(table.values_of(p)["colour"])) for p in val_files
             if table.values_of(p)["colour"] in values]
    session = ort.InferenceSession(str(attribute_export))
    tensor = np.stack([load_and_preprocess(Path(p).read_bytes(), contract) for p, _ in known])
    logits = session.run(["attr_colour"], {"input": tensor})[0]
    truth = np.array([value for _, value in known])
    assert fitted["images"] == len(known)
    assert fitted["temperature"] == pytest.approx(fit_temperature(logits, truth), rel=2e-3)
    assert fitted["nll_after"] <= fitted["nll_before"] + 1e-4  # T = 1 was a candidate
    assert 0 <= fitted["ece_after"] <= 1 and 0 <= fitted["ece_before"] <= 1


@pytest.fixture(scope="module")
def exported_onnx_single(tiny_folder, tmp_path_factory):
    from trainer.config import TrainConfig
    from trainer.export import export
    from trainer.train import train

    run = tmp_path_factory.mktemp("single") / "run"
    train(TrainConfig(data=tiny_folder, out=run, epochs=0, head_epochs=4, image_size=128))
    return export(run, save=False).onnx_path


def test_single_label_run_exports_exactly_as_before(exported_onnx_single):
    """No manifest.csv (a plain ImageFolder): no attribute stage, one `logits` output, and a
    contract without the attributes key (what older services read)."""
    model = onnx.load(exported_onnx_single)
    assert [o.name for o in model.graph.output] == ["logits"]
    raw = json.loads({p.key: p.value for p in model.metadata_props}[CONTRACT_KEY])
    assert "attributes" not in raw
    assert set(raw) == {"name", "version", "labels", "input_size", "crop_pct", "mean", "std",
                        "architecture", "temperature"}
    assert fit_attributes(exported_onnx_single.parents[1]) is None
