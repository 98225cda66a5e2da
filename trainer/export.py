"""Trained run -> verified ONNX file (contract in its metadata) -> BentoML model store.

Verification, in order: the ONNX model's logits match torch's on real validation photos
(max abs difference, identical top-1), and its validation accuracy equals torch's. With
--int8 a static QDQ per-channel copy is calibrated on training photos and reported with its
speed and accuracy change (with --int8-reduce-range its weights have 7 bits: see
`service.runtime.int8_products_saturate`). The graph work itself is `trainer/onnx_graph.py`.

Every file is written into a staging folder beside RUN/export and the folder renamed into place
only when the export is complete (gate, store entry and export.json included): a kill -9 at any
moment leaves the previous export/ as it was, or none, never a half-written model.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from trainer.data import EvalImages, Sample, Skipped
from trainer.onnx_graph import (
    ParityError,
    compare_logits,
    export_onnx,
    images_per_second,
    onnx_logits,
    parity_refusal,
    quantize_int8,
    session,
    torch_logits,
)
from trainer.runs import RunDir, atomic_write_json, load_trained, publish_dir, staging_dir

log = logging.getLogger("trainer")

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
FLIP_FILE = "model.flip.onnx"  # --flip-tta: measured beside model.onnx, not served by default


@dataclass
class ExportResult:
    onnx_path: Path
    int8_path: Path | None
    tag: str | None
    report: dict


def run_samples(run: RunDir, split: str) -> list[Sample]:
    """The exact files a run validated (or trained) on, from dataset.json."""
    import json

    info = json.loads(run.dataset.read_text())
    return [Sample(Path(p), label) for p, label in info[f"{split}_samples"]]


def calibration_photos(run: RunDir, contract, count: int, skipped: Skipped) -> np.ndarray:
    """`count` training photos (a fixed draw) through the contract: int8's calibration set."""
    train_samples = run_samples(run, "train")
    pick = np.random.default_rng(0).choice(len(train_samples), min(count, len(train_samples)),
                                           replace=False)
    return EvalImages([train_samples[i] for i in sorted(pick)], contract, skipped,
                      description="calibration photos").tensor.numpy()


def export(run_dir: Path, *, int8: bool = False, name: str = "product-classifier",
           save: bool = True, exporter: str = "dynamo", parity_images: int = 32,
           calibration_images: int = 200, tolerance: float = 1e-3, flip_tta: bool = False,
           int8_reduce_range: bool = False, console: Console | None = None) -> ExportResult:
    console = console or Console()
    run = RunDir(Path(run_dir))
    model, contract, checkpoint = load_trained(run.root)
    from trainer.attributes import check_heads, head_references, load_multihead

    multi = load_multihead(checkpoint, model)  # attribute heads beside the main one, if any
    final = run.export
    out = staging_dir(final)  # everything is written here, then renamed to `final`
    fp32_path = out / FP32_FILE
    t0 = time.perf_counter()
    used = export_onnx(multi or model, contract, fp32_path, exporter)
    console.print(f"exported {fp32_path} ({used} exporter, {time.perf_counter() - t0:.0f}s, "
                  f"{fp32_path.stat().st_size / 1e6:.1f} MB)")

    # The validation photos through the service's own preprocessing.
    skipped = Skipped()
    val = EvalImages(run_samples(run, "val"), contract, skipped)
    images, labels = val.tensor.numpy(), val.labels.numpy()
    sess = session(fp32_path)
    ours, theirs = onnx_logits(sess, images), torch_logits(model, images)
    parity, acc_onnx, acc_torch = compare_logits(ours, theirs, labels, parity_images, tolerance)
    max_diff, top1_same = parity["max_abs_logit_diff"], parity["top1_identical"]
    report = {"exporter": used, "onnx_file": str(final / FP32_FILE),
              "contract": contract.model_dump(), "parity": parity,
              "val_images": len(labels), "val_acc_torch": acc_torch, "val_acc_onnx": acc_onnx,
              "train_metrics": checkpoint.get("metrics", {}),
              "selection": (checkpoint.get("selection") or {}).get("mode", "val"),
              # after a cross-validated refit these photos were trained on: a parity check only
              "val_in_training": (checkpoint.get("selection") or {}).get("mode") == "cv"}
    console.print(f"parity on {parity['images']} real photos: max |logit diff| {max_diff:.2e}, "
                  f"top-1 identical: {top1_same}; val accuracy torch {acc_torch:.4f} "
                  f"onnx {acc_onnx:.4f} ({len(labels)} photos)")
    if refusal := parity_refusal(parity, acc_onnx, acc_torch):
        refused = run.root / "export-refused"  # kept to look at; export/ stays as it was
        report["onnx_file"] = str(refused / FP32_FILE)
        atomic_write_json(out / "export.json", report)
        publish_dir(out, refused)
        raise ParityError(f"{refusal}. Refused: {final} is unchanged; the refused model and "
                          f"its report are in {refused}")

    heads = None if multi is None else head_references(multi, images, val.samples, run)
    if heads:  # the same parity and accuracy checks, head by head
        report["attributes"] = check_heads(heads, sess, images, tolerance, parity_images,
                                           console)
        atomic_write_json(out / "export.json", report)

    batch = min(16, len(images))
    report["fp32_images_per_s_batch16"] = round(images_per_second(sess, images, batch), 1)
    int8_path, weight_bits = None, 7 if int8_reduce_range else 8
    if int8:
        int8_path = out / INT8_FILE
        calib = calibration_photos(run, contract, calibration_images, skipped)
        t0 = time.perf_counter()
        quantize_int8(fp32_path, int8_path, calib, reduce_range=int8_reduce_range)
        sess8 = session(int8_path)
        acc_int8 = float((onnx_logits(sess8, images).argmax(1) == labels).mean())
        # Side by side, interleaved: the machine's load changes from minute to minute.
        fp32_rates, int8_rates = [], []
        for _ in range(3):
            fp32_rates.append(images_per_second(sess, images, batch, repeats=3))
            int8_rates.append(images_per_second(sess8, images, batch, repeats=3))
        fp32_rate, int8_rate = statistics.median(fp32_rates), statistics.median(int8_rates)
        report["int8"] = {"file": str(final / INT8_FILE), "calibration_images": len(calib),
                          "weight_bits": weight_bits,
                          "val_acc": acc_int8, "val_acc_change": acc_int8 - acc_onnx,
                          "images_per_s_batch16": round(int8_rate, 1),
                          "fp32_images_per_s_batch16": round(fp32_rate, 1),
                          "speedup": round(int8_rate / fp32_rate, 2),
                          "quantize_s": round(time.perf_counter() - t0, 1)}
        console.print(f"int8: val accuracy {acc_int8:.4f} ({acc_int8 - acc_onnx:+.4f}), "
                      f"{int8_rate:.0f} vs {fp32_rate:.0f} images/s fp32 at batch {batch} "
                      f"({int8_rate / fp32_rate:.2f}x)")

    if flip_tta:
        from trainer.tta import measure_flip_tta

        tta = measure_flip_tta(model, contract, out / FLIP_FILE, images, labels, sess, used,
                               batch)
        report["flip_tta"] = {**tta, "file": str(final / FLIP_FILE)}
        console.print(f"flip TTA ({final / FLIP_FILE}): val accuracy {tta['val_acc']:.4f} "
                      f"({tta['val_acc_gain']:+.4f}) for {tta['cost']:.2f}x the inference "
                      f"time ({tta['images_per_s']:.0f} vs {tta['images_per_s_plain']:.0f} "
                      f"images/s at batch {batch}); model.onnx stays without it")

    from trainer.variants import gate_variants  # every servable runtime + precision vs torch

    report["accuracy_gate"] = gate_variants(fp32_path, int8_path, images, labels, theirs,
                                            heads=heads, console=console,
                                            int8_weight_bits=weight_bits)
    tag = None
    if save:
        from service.model_store import save_to_store

        extras = [p for p in (int8_path, run.report / "MODEL_CARD.md") if p and p.is_file()]
        metrics = {"val_acc": acc_onnx, "val_macro_f1": checkpoint["metrics"].get("val_macro_f1"),
                   "val_images": len(labels), "max_abs_logit_diff": max_diff}
        if int8:
            metrics["int8_val_acc"] = report["int8"]["val_acc"]
        tag = save_to_store(fp32_path, name=name, metrics=metrics, extra_files=extras)
        report["bentoml_tag"] = tag
        console.print(f"saved to the BentoML model store as [bold]{tag}[/]")
    atomic_write_json(out / "export.json", report)
    publish_dir(out, final)  # the one moment export/ changes: old complete -> new complete
    console.print(f"export: {final}/")
    return ExportResult(final / FP32_FILE, int8_path and final / INT8_FILE, tag, report)
