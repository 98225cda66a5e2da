"""Export under faults: a kill -9 mid-export leaves no half-written model (in the run folder or
the BentoML store) and the next export works; an ONNX file that computes something else than
the trained model is refused; the TorchScript exporter takes over when the dynamo one fails."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from service.contract import ModelContract
from service.model_store import read_contract, read_gate
from trainer.data import EvalImages, Skipped
from trainer.export import export, run_samples
from trainer.onnx_graph import (
    ParityError,
    compare_logits,
    export_onnx,
    onnx_logits,
    parity_refusal,
    session,
    torch_logits,
)
from trainer.runs import RunDir, load_trained

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="68719476736",
           BENTOML_DO_NOT_TRACK="True")
EXPORT_TIMEOUT_S = 400  # one `trainer export` of the tiny run; below pytest's 600 s


def copy_run(run: Path, target: Path) -> Path:
    """A private copy of a trained run folder, without anything an export wrote."""
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("export*"))
    return target


def val_images(run: Path, contract: ModelContract) -> tuple[np.ndarray, np.ndarray]:
    val = EvalImages(run_samples(RunDir(run), "val"), contract, Skipped())
    return val.tensor.numpy(), val.labels.numpy()


def store_tags(env: dict, name: str) -> list[str]:
    """`bentoml models list` of the store in env's BENTOML_HOME: the tags named `name`."""
    listed = subprocess.run([sys.executable, "-m", "bentoml", "models", "list", "-o", "json"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert listed.returncode == 0, listed.stderr[-2000:]
    return [entry["tag"] for entry in json.loads(listed.stdout or "[]")
            if entry["tag"].split(":")[0] == name]


# --- kill -9 mid-export -------------------------------------------------------------------------

def test_export_killed_midway_leaves_no_half_written_model(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    env = dict(ENV, BENTOML_HOME=str(tmp_path / "bentoml"))
    name = "killed-export"
    command = [sys.executable, "-m", "trainer", "export", str(run), "--name", name]
    with open(tmp_path / "victim.log", "wb") as log:
        victim = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    # Kill it the moment a model.onnx exists anywhere under the run: the export has written
    # its graph, and has the parity check, the accuracy gate, the store and export.json ahead.
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    written: list[Path] = []
    while time.monotonic() < deadline and victim.poll() is None and not written:
        try:
            written = list(run.rglob("model.onnx"))
        except FileNotFoundError:  # a temporary folder of the export vanished mid-walk
            pass
        time.sleep(0.01)
    still_running = victim.poll() is None
    victim.kill()
    victim.wait(timeout=60)
    log_text = (tmp_path / "victim.log").read_text(errors="replace")[-3000:]
    assert written, "no model.onnx appeared before the export ended or timed out:\n" + log_text
    assert still_running and victim.returncode == -signal.SIGKILL, \
        "the export finished by itself before it could be killed:\n" + log_text

    # Nothing a service (or a user) would pick up: no export/ at all, no store entry; what
    # was written lies only in the dead process's staging folder.
    assert not (run / "export").exists(), sorted(p.name for p in (run / "export").iterdir())
    leftovers = [p.relative_to(run) for p in run.rglob("*.onnx")]
    assert leftovers and all(p.parts[0].startswith("export.partial-") for p in leftovers)
    assert store_tags(env, name) == []

    # The next export of the same run works, and cleans up after the killed one.
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=EXPORT_TIMEOUT_S, check=False)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    model_file = run / "export" / "model.onnx"
    _, contract, _ = load_trained(run)
    assert read_contract(model_file) == contract
    assert read_gate(model_file)["variants"]["onnxruntime-fp32"]["passed"]
    report = json.loads((run / "export" / "export.json").read_text())
    assert report["onnx_file"] == str(model_file)
    assert store_tags(env, name) == [report["bentoml_tag"]]
    version = report["bentoml_tag"].split(":")[1]
    stored = tmp_path / "bentoml" / "models" / name / version / "model.onnx"
    assert stored.read_bytes() == model_file.read_bytes()
    images, labels = val_images(run, contract)
    assert float((onnx_logits(session(stored), images).argmax(1) == labels).mean()) \
        == report["val_acc_onnx"]
    assert not [p.name for p in run.iterdir() if p.name.startswith("export.")]


# --- the parity check -------------------------------------------------------------------------

def head_weight(proto: onnx.ModelProto, classes: int, features: int) -> onnx.TensorProto:
    """The classifier's weight matrix in the graph ([classes, features] or transposed)."""
    found = [init for init in proto.graph.initializer
             if sorted(init.dims) == sorted((classes, features))]
    assert len(found) == 1, [(i.name, list(i.dims)) for i in proto.graph.initializer
                             if classes in i.dims]
    return found[0]


def test_parity_check_refuses_an_onnx_file_whose_weights_differ(tiny_run, tmp_path):
    model, contract, _ = load_trained(tiny_run)
    images, labels = val_images(tiny_run, contract)
    path = tmp_path / "model.onnx"
    export_onnx(model, contract, path)
    theirs = torch_logits(model, images)
    parity, acc_onnx, acc_torch = compare_logits(onnx_logits(session(path), images), theirs,
                                                 labels, 32, 1e-3)
    assert parity_refusal(parity, acc_onnx, acc_torch) is None  # the faithful file passes

    # One class's weights nudged by 0.05 in the saved file: same graph, same contract.
    proto = onnx.load(str(path))
    weight = head_weight(proto, len(contract.labels), model.head[-1].in_features)
    array = numpy_helper.to_array(weight).copy()
    if array.shape[0] == len(contract.labels):
        array[1] += 0.05
    else:
        array[:, 1] += 0.05
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    altered = tmp_path / "altered.onnx"
    onnx.save(proto, str(altered))
    assert read_contract(altered) == contract  # the metadata alone cannot tell

    ours = onnx_logits(session(altered), images)
    parity, acc_onnx, acc_torch = compare_logits(ours, theirs, labels, 32, 1e-3)
    assert parity["max_abs_logit_diff"] == pytest.approx(float(np.abs(ours - theirs).max()))
    assert parity["max_abs_logit_diff"] > 0.01
    refusal = parity_refusal(parity, acc_onnx, acc_torch)
    assert refusal is not None and refusal.startswith("ONNX export disagrees with torch")
    assert f"on {len(images)} real photos is above the tolerance 0.001" in refusal

    # NaN logits are a disagreement too (NaN > tolerance is False; the check must not pass).
    nan_parity = dict(parity, max_abs_logit_diff=float("nan"), top1_identical=True)
    assert "above the tolerance" in parity_refusal(nan_parity, acc_torch, acc_torch)


@pytest.fixture(scope="module")
def torchscript_export(tiny_run, tmp_path_factory):
    """A private copy of the tiny run, exported with the TorchScript exporter."""
    run = copy_run(tiny_run, tmp_path_factory.mktemp("faults") / "run")
    return run, export(run, exporter="torchscript", save=False)


def test_export_refuses_a_disagreement_and_keeps_the_last_good_export(torchscript_export):
    run, good = torchscript_export
    before = {p.name: p.read_bytes() for p in (run / "export").iterdir()}
    # Demanding bit-identical logits: ONNX Runtime's kernels add up in another order than
    # torch's, so the real (tiny) difference is now beyond the tolerance.
    with pytest.raises(ParityError, match=r"above the tolerance 0\b") as refused:
        export(run, save=True, name="refused-export", tolerance=0.0)
    assert f"{run / 'export'} is unchanged" in str(refused.value)
    assert {p.name: p.read_bytes() for p in (run / "export").iterdir()} == before
    report = json.loads((run / "export-refused" / "export.json").read_text())
    assert report["parity"]["tolerance"] == 0 and report["parity"]["max_abs_logit_diff"] > 0
    assert report["onnx_file"] == str(run / "export-refused" / "model.onnx")
    assert "bentoml_tag" not in report and "accuracy_gate" not in report
    import bentoml
    from bentoml.exceptions import NotFound

    with pytest.raises(NotFound):
        bentoml.models.get("refused-export:latest")
    assert good.report["parity"]["max_abs_logit_diff"] <= 1e-3  # the kept one passed


# --- the exporter fallback ----------------------------------------------------------------------

def test_torchscript_export_is_recorded_and_matches_torch(torchscript_export, tiny_run):
    run, result = torchscript_export
    assert result.report["exporter"] == "torchscript"
    assert json.loads((run / "export" / "export.json").read_text())["exporter"] == "torchscript"
    model, contract, _ = load_trained(run)
    images, _ = val_images(run, contract)
    ours = onnx_logits(session(result.onnx_path), images)
    assert np.abs(ours - torch_logits(model, images)).max() < 1e-3
    assert read_contract(result.onnx_path) == contract


class NumpyIdentity(torch.autograd.Function):
    """Identity computed through numpy, with an ONNX symbolic: torch.export (the dynamo
    exporter) cannot trace a tensor into numpy, the TorchScript exporter uses the symbolic."""

    @staticmethod
    def forward(ctx, x):
        return torch.from_numpy(x.detach().cpu().numpy().copy())

    @staticmethod
    def symbolic(g, x):
        return g.op("Identity", x)


class ThroughNumpy(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return NumpyIdentity.apply(self.model(x))


def test_dynamo_failure_falls_back_to_torchscript(tiny_run, tmp_path):
    model, contract, _ = load_trained(tiny_run)
    wrapped = ThroughNumpy(model).eval()
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("trainer")
    logger.addHandler(handler)
    try:
        used = export_onnx(wrapped, contract, tmp_path / "model.onnx", exporter="dynamo")
    finally:
        logger.removeHandler(handler)
    assert used == "torchscript"
    assert any(m.startswith("dynamo exporter failed") and "falling back to TorchScript" in m
               for m in messages), messages
    # The fallback's file is complete: the contract in its metadata, torch's logits out.
    assert read_contract(tmp_path / "model.onnx") == contract
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary left
    images, labels = val_images(tiny_run, contract)
    ours = onnx_logits(session(tmp_path / "model.onnx"), images)
    parity, acc_onnx, acc_torch = compare_logits(ours, torch_logits(wrapped, images), labels,
                                                 32, 1e-3)
    assert parity_refusal(parity, acc_onnx, acc_torch) is None, parity
