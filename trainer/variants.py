"""The export's accuracy gate: every runtime + precision the service may serve, checked on the
validation photos against torch, written into model.onnx's metadata.

Each variant (ONNX Runtime fp32 and int8, OpenVINO fp32, at its default precision and int8) runs
through the service's own `service.runtime.open_runtime`, so what is measured is what is served.
A variant passes when its validation accuracy is at most `ACCURACY_BUDGET` below ONNX Runtime
fp32's and, for a model with attribute heads, when every head's accuracy (over the validation
photos whose value is known) is within the same budget of ONNX Runtime fp32's for that head
(which the export's parity check makes equal to torch's); each head's figures are recorded in
the variant's entry. The default serving variant is the fastest one that passes.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

from service.contract import ONNX_OUTPUT
from service.model_store import ACCURACY_BUDGET, GATE_KEY, file_sha256
from service.runtime import (
    ONNXRUNTIME,
    OPENVINO,
    int8_products_saturate,
    open_runtime,
    openvino_installed,
    variant_name,
)

if TYPE_CHECKING:
    from trainer.attributes import HeadReference

REFERENCE = variant_name(ONNXRUNTIME, "fp32")
SPEED_BATCH = 8      # about the service's mean batch under load
GATE_THREADS = 2     # the service's default threads per model worker


def openvino_default_precision() -> str | None:
    """OpenVINO's own inference precision on this CPU (bf16 with AMX / AVX512-BF16), when it is
    one the service can serve besides fp32."""
    import openvino as ov

    hint = str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")).lower()
    return "bf16" if "bf16" in hint or "bfloat16" in hint else None


def candidates(int8_path: Path | None) -> list[tuple[str, str]]:
    """(runtime, precision) pairs the service may be asked to serve on this machine."""
    pairs = [(ONNXRUNTIME, "fp32")]
    if openvino_installed():
        pairs.append((OPENVINO, "fp32"))
        default = openvino_default_precision()
        if default:
            pairs.append((OPENVINO, default))
    if int8_path is not None:
        pairs.append((ONNXRUNTIME, "int8"))
        if openvino_installed():
            pairs.append((OPENVINO, "int8"))
    return pairs


def _outputs(runtime, images: np.ndarray, outputs: list[str], widths: list[int],
             batch_size: int = 32) -> list[np.ndarray]:
    """Every output of the model on `images` (logits, then attr_NAME per head), as the service
    runs them: one run per batch, all outputs side by side, split by width."""
    if len(outputs) == 1:
        return [np.concatenate([runtime.run(images[i:i + batch_size])
                                for i in range(0, len(images), batch_size)])]
    joined = np.concatenate([runtime.run_outputs(images[i:i + batch_size], outputs)
                             for i in range(0, len(images), batch_size)])
    return np.split(joined, np.cumsum(widths)[:-1], axis=1)


def _head_entry(logits: np.ndarray, reference: HeadReference) -> dict:
    return {"val_known": int(reference.known.sum()), "val_acc": reference.accuracy(logits),
            "top1_agreement": float((logits.argmax(1)
                                     == reference.torch_logits.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(logits - reference.torch_logits).max())}


def _rate(runtime, batch: np.ndarray, seconds: float = 0.3) -> float:
    runtime.run(batch)  # warm-up
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or runs < 2:
        runtime.run(batch)
        runs += 1
    return runs * len(batch) / elapsed


def gate_variants(fp32_path: Path, int8_path: Path | None, images: np.ndarray,
                  labels: np.ndarray, torch_logits: np.ndarray, *,
                  heads: dict[str, HeadReference] | None = None,
                  budget: float = ACCURACY_BUDGET, threads: int = GATE_THREADS,
                  int8_weight_bits: int = 8, console: Console | None = None) -> dict:
    """Check every variant on `images` (the validation photos through the contract), write the
    result into fp32_path's metadata (`GATE_KEY`) and return it.

    `heads` (`trainer.attributes.head_references`): the attribute heads' torch logits and
    truth on the same photos; every head of every variant is judged with the same budget.
    The gate also records whether int8 arithmetic saturates on this CPU and the int8 file's
    weight bits (`service.model_store.cpu_refusal` reads them on the serving machine)."""
    console = console or Console()
    heads = heads or {}
    outputs = [ONNX_OUTPUT, *(head.output for head in heads.values())]
    widths = [torch_logits.shape[1], *(head.torch_logits.shape[1] for head in heads.values())]
    torch_top1 = torch_logits.argmax(1)
    runtimes, entries = {}, {}
    for runtime_name, precision in candidates(int8_path):
        name = variant_name(runtime_name, precision)
        path = int8_path if precision == "int8" else fp32_path
        entry = {"runtime": runtime_name, "precision": precision, "file": path.name}
        try:
            runtime = open_runtime(path, runtime=runtime_name, precision=precision,
                                   threads=threads, device="cpu")
            logits, *head_logits = _outputs(runtime, images, outputs, widths)
        except Exception as exc:  # noqa: BLE001 - a variant that cannot run is recorded, not fatal
            entries[name] = {**entry, "error": f"{type(exc).__name__}: {exc}"[:300],
                             "passed": False}
            continue
        runtimes[name] = runtime
        entry.update(val_acc=float((logits.argmax(1) == labels).mean()),
                     top1_agreement=float((logits.argmax(1) == torch_top1).mean()),
                     max_abs_logit_diff=float(np.abs(logits - torch_logits).max()))
        if heads:
            entry["heads"] = {head_name: _head_entry(mine, reference) for (head_name, reference),
                              mine in zip(heads.items(), head_logits)}
        if precision == "int8":
            entry["sha256"] = file_sha256(path)  # the gate holds for this very file only
            entry["weight_bits"] = int8_weight_bits
        entries[name] = entry
    reference = entries[REFERENCE]["val_acc"]
    head_reference = {name: entries[REFERENCE]["heads"][name]["val_acc"] for name in heads}
    # Speeds interleaved round by round: the machine's load drifts from second to second.
    batch = np.ascontiguousarray(np.resize(images, (SPEED_BATCH, *images.shape[1:])))
    rates = {name: [] for name in runtimes}
    for _ in range(3):
        for name, runtime in runtimes.items():
            rates[name].append(_rate(runtime, batch))
    for name, entry in entries.items():
        if "error" in entry:
            continue
        entry["val_acc_change"] = entry["val_acc"] - reference
        entry["images_per_s"] = round(statistics.median(rates[name]), 1)
        entry["passed"] = reference - entry["val_acc"] <= budget + 1e-9
        for head_name, head in entry.get("heads", {}).items():
            ref = head_reference[head_name]
            judged = head["val_acc"] is not None and ref is not None
            head["val_acc_change"] = head["val_acc"] - ref if judged else None
            # No validation photo with a known value: nothing to lose, nothing to judge.
            head["passed"] = not judged or ref - head["val_acc"] <= budget + 1e-9
        failed = [head_name for head_name, head in entry.get("heads", {}).items()
                  if not head["passed"]]
        if failed:
            entry["failed_heads"] = failed
        entry["passed"] = entry["passed"] and not failed
    passed = [name for name, entry in entries.items() if entry["passed"]]
    default = max(passed, key=lambda name: entries[name]["images_per_s"])
    gate = {"budget": budget, "reference": REFERENCE, "reference_val_acc": reference,
            "val_images": len(labels), "torch_val_acc": float((torch_top1 == labels).mean()),
            "speed": f"images/s at batch {SPEED_BATCH}, {threads} threads, on the export machine",
            "int8_products_saturate": int8_products_saturate(),
            "default": default, "variants": entries}
    if heads:
        gate["heads"] = {name: {"output": ref.output, "val_known": int(ref.known.sum()),
                                "reference_val_acc": head_reference[name],
                                "torch_val_acc": ref.accuracy(ref.torch_logits)}
                         for name, ref in heads.items()}
    write_gate(fp32_path, gate)
    _print(gate, console)
    return gate


def write_gate(fp32_path: Path, gate: dict) -> None:
    """The gate into model.onnx's metadata_props, beside the contract (replacing an old one)."""
    proto = onnx.load(str(fp32_path))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != GATE_KEY]
    del proto.metadata_props[:]
    for key, value in [*kept, (GATE_KEY, json.dumps(gate, sort_keys=True))]:
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(fp32_path))


def _print(gate: dict, console: Console) -> None:
    table = Table(title=f"accuracy gate: {gate['val_images']} validation photos, budget "
                        f"{100 * gate['budget']:.1f} points below {gate['reference']}")
    heads = list(gate.get("heads", {}))
    for column in ("variant", "val acc", "change", "top-1 = torch",
                   *(f"{name} acc (change)" for name in heads), "images/s", "served"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, entry in gate["variants"].items():
        if "error" in entry:
            table.add_row(name, "", "", "", *[""] * len(heads), "",
                          f"no: {entry['error'][:60]}")
            continue
        table.add_row(name, f"{entry['val_acc']:.4f}", f"{100 * entry['val_acc_change']:+.2f}",
                      f"{100 * entry['top1_agreement']:.1f}%",
                      *(_head_cell(entry["heads"][head]) for head in heads),
                      f"{entry['images_per_s']:.0f}",
                      "yes" if entry["passed"] else
                      "REFUSED" + (f" ({', '.join(entry['failed_heads'])})"
                                   if entry.get("failed_heads") else ""))
    console.print(table)
    console.print(f"default serving variant: [bold]{gate['default']}[/] (the fastest within the "
                  "budget; CLASSIFIER_PRECISION=auto serves the fastest passing one of its "
                  "runtime)")


def _head_cell(head: dict) -> str:
    if head["val_acc"] is None:
        return "no known value"
    change = "" if head["val_acc_change"] is None else f" ({100 * head['val_acc_change']:+.2f})"
    return f"{head['val_acc']:.4f}{change}"
