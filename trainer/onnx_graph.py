"""The ONNX graph of a trained model: written from torch (contract in its metadata), run,
compared with torch, timed, and quantized to int8. `trainer export` strings these together;
flip TTA and the attribute heads use them too.

Exporter: torch.onnx's dynamo exporter by default; measured here its Lite0 graph ran 1.5-1.9x
faster in ONNX Runtime than the TorchScript exporter's (which keeps timm's dynamic 'same'
padding as ~500 shape ops); TorchScript is the fallback.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from service.contract import ONNX_INPUT, ONNX_OUTPUT, ModelContract
from service.runtime import create_session
from trainer.config import TrainerError
from trainer.runs import atomic_write_bytes

log = logging.getLogger("trainer")


class ParityError(TrainerError, RuntimeError):
    """The exported model does not compute what the trained model computes."""


def export_onnx(model: torch.nn.Module, contract: ModelContract, path: Path,
                exporter: str = "dynamo") -> str:
    """Write model to path with a dynamic batch axis and the contract in metadata_props.
    Returns the exporter actually used."""
    model = model.eval().to("cpu", memory_format=torch.contiguous_format)
    # A MultiHead (trainer.heads) has one output per head: logits, attr_NAME, ...
    outputs = getattr(model, "output_names", [ONNX_OUTPUT])
    example = torch.zeros(2, 3, contract.input_size, contract.input_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    # torch writes its file (and any external .data) under a temporary name; `path` only ever
    # appears complete, contract included (a kill -9 mid-export leaves no model without it).
    raw = path.with_name(f".{path.stem}.{os.getpid()}.raw.onnx")
    used = exporter
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                try:
                    torch.onnx.export(model, (example,), str(raw), input_names=[ONNX_INPUT],
                                      output_names=outputs, dynamo=True, optimize=True,
                                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                                      verbose=False)
                except Exception as exc:  # noqa: BLE001 - any op dynamo cannot trace yet
                    log.warning("dynamo exporter failed (%s); falling back to TorchScript",
                                exc)
                    used = "torchscript"
            if used == "torchscript":
                torch.onnx.export(model, (example,), str(raw), input_names=[ONNX_INPUT],
                                  output_names=outputs, dynamo=False, opset_version=17,
                                  dynamic_axes={ONNX_INPUT: {0: "batch"},
                                                **{name: {0: "batch"} for name in outputs}})
        proto = onnx.load(str(raw))  # one file: weights inlined, metadata added
    finally:
        for leftover in (raw, *raw.parent.glob(raw.name + ".data")):
            leftover.unlink(missing_ok=True)
    proto.ir_version = min(proto.ir_version, 10)  # onnxruntime 1.31 reads IR <= 13
    del proto.metadata_props[:]
    for key, value in contract.to_metadata().items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    save_model(proto, path)
    return used


def save_model(proto: onnx.ModelProto, path: Path) -> None:
    """One self-contained .onnx file, written atomically (temporary sibling, fsync, rename)."""
    atomic_write_bytes(path, lambda handle: handle.write(proto.SerializeToString()))


def parity_refusal(parity: dict, acc_onnx: float, acc_torch: float) -> str | None:
    """Why an ONNX file must not replace the torch model it came from, or None: its logits
    differ by more than the tolerance (NaN counts as more), its top-1 differs on a parity photo,
    or its validation accuracy differs."""
    why = []
    if not parity["max_abs_logit_diff"] <= parity["tolerance"]:
        why.append(f"max |logit diff| {parity['max_abs_logit_diff']:.3g} on {parity['images']} "
                   f"real photos is above the tolerance {parity['tolerance']:g}")
    if not parity["top1_identical"]:
        why.append(f"top-1 label differs on some of the {parity['images']} photos")
    if acc_onnx != acc_torch:
        why.append(f"validation accuracy {acc_onnx:.4f} (ONNX) vs {acc_torch:.4f} (torch)")
    return ("ONNX export disagrees with torch: " + "; ".join(why)) if why else None


def compare_logits(ours: np.ndarray, theirs: np.ndarray, labels: np.ndarray,
                   parity_images: int, tolerance: float) -> tuple[dict, float, float]:
    """(parity on the first `parity_images` photos, ONNX val accuracy, torch val accuracy)."""
    n = min(parity_images, len(ours))
    parity = {"images": n, "max_abs_logit_diff": float(np.abs(ours[:n] - theirs[:n]).max()),
              "top1_identical": bool((ours[:n].argmax(1) == theirs[:n].argmax(1)).all()),
              "tolerance": tolerance}
    return (parity, float((ours.argmax(1) == labels).mean()),
            float((theirs.argmax(1) == labels).mean()))


def session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session through the project's one factory, as the service opens the file."""
    return create_session(path, threads=threads, device="cpu")


def onnx_logits(sess: ort.InferenceSession, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    out = [sess.run([ONNX_OUTPUT], {ONNX_INPUT: images[i:i + batch_size]})[0]
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


@torch.no_grad()
def torch_logits(model: torch.nn.Module, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    model.eval()
    return torch.cat([model(torch.from_numpy(images[i:i + batch_size]))
                      for i in range(0, len(images), batch_size)]).numpy()


def images_per_second(sess: ort.InferenceSession, images: np.ndarray, batch_size: int,
                      repeats: int = 5) -> float:
    """Median throughput over repeats (timings on a shared machine are noisy)."""
    batch = images[:batch_size]
    sess.run(None, {ONNX_INPUT: batch})  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, {ONNX_INPUT: batch})
        rates.append(len(batch) / (time.perf_counter() - start))
    return statistics.median(rates)


class _Calibration:
    """onnxruntime.quantization.CalibrationDataReader over preprocessed training photos."""

    def __init__(self, images: np.ndarray, batch_size: int = 16):
        self.batches = iter([images[i:i + batch_size] for i in range(0, len(images), batch_size)])

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {ONNX_INPUT: batch}


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray,
                  reduce_range: bool = False) -> None:
    """Static QDQ, per-channel int8 weights, uint8 activations calibrated on real photos.
    (Dynamic quantization was measured 4-14x slower than fp32 for this CNN.) `reduce_range`:
    7-bit weights (-64..64), which ONNX Runtime's int16 pair sums on x86 CPUs without VNNI
    cannot overflow (`service.runtime.int8_products_saturate`)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Intermediate files under temporary names; int8_path appears complete or not at all.
    prepared = int8_path.with_name(f".{int8_path.stem}.{os.getpid()}.prep.onnx")
    quantized = int8_path.with_name(f".{int8_path.stem}.{os.getpid()}.raw.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantized), _Calibration(calibration),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, reduce_range=reduce_range)
        proto = onnx.load(str(quantized))  # quantize_static keeps metadata_props; make sure
    finally:
        prepared.unlink(missing_ok=True)
        quantized.unlink(missing_ok=True)
    if not any(p.key == "version" for p in proto.metadata_props):
        for key, value in ModelContract.from_metadata(
                {p.key: p.value for p in onnx.load(str(fp32_path)).metadata_props}
        ).to_metadata().items():
            proto.metadata_props.add(key=key, value=value)
    save_model(proto, int8_path)
