"""`make bench-int8`: int8 with 8-bit weights (`trainer export --int8`) and with 7-bit weights
(`--int8-reduce-range`) against fp32, for one trained run, on a folder of photos it never saw.

Printed side by side: accuracy, top-1 agreement with fp32, the largest logit difference, and
ONNX Runtime images/s at batch 16 (measured round by round, interleaved; medians). The CPU
matters: with VNNI, int8 sums are exact 32-bit and 7 bits only cost resolution; without it
(x86 AVX2) ONNX Runtime adds pairs of products in int16, which 8-bit weights can overflow.
To tell the two errors apart, each int8 file is also run exactly: the same QDQ graph with ONNX
Runtime's graph optimizations off, so every quantized op is dequantized and computed in float
(no int8 kernel, nothing to overflow). Quantization error = exact vs fp32; what the int8
kernels add on this CPU = int8 kernels vs exact.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, Field
from pydantic_settings import CliApp, CliPositionalArg
from rich.console import Console
from rich.table import Table

from service.runtime import int8_products_saturate
from trainer.data import EvalImages, Skipped
from trainer.evaluate import eval_samples
from trainer.export import calibration_photos
from trainer.onnx_graph import export_onnx, images_per_second, onnx_logits, quantize_int8, session
from trainer.runs import RunDir, load_trained


class BenchInt8(BaseModel):
    """8-bit vs 7-bit int8 weights against fp32 on one run: accuracy, agreement, speed."""

    run_dir: CliPositionalArg[Path] = Field(description="run folder made by `trainer train`")
    data: Path = Field(description=(
        "photos to score: its test/, else its validation split, else every label folder "
        "(as `trainer evaluate --data`)"))
    out: Path = Field(Path("bench_out/int8"), description="the three ONNX files and int8.json")
    calibration_images: int = Field(200, ge=1, description="as `trainer export`'s")
    threads: int = Field(2, ge=1, description="ONNX Runtime threads")
    rounds: int = Field(5, ge=1, description="speed rounds (each times every file)")

    def cli_cmd(self) -> None:
        run_bench(self)


def run_bench(bench: BenchInt8) -> dict:
    console = Console()
    run = RunDir(bench.run_dir)
    model, contract, _ = load_trained(run.root)
    skipped = Skipped()
    files = {"fp32": bench.out / "model.onnx", "int8 8-bit": bench.out / "model.int8.onnx",
             "int8 7-bit": bench.out / "model.int8-7bit.onnx"}
    export_onnx(model, contract, files["fp32"])
    calibration = calibration_photos(run, contract, bench.calibration_images, skipped)
    quantize_int8(files["fp32"], files["int8 8-bit"], calibration)
    quantize_int8(files["fp32"], files["int8 7-bit"], calibration, reduce_range=True)
    samples, source = eval_samples(run, contract.labels, bench.data)
    photos = EvalImages(samples, contract, skipped, description="photos to score")
    images, truth = photos.tensor.numpy(), photos.labels.numpy()
    sessions = {name: session(path, threads=bench.threads) for name, path in files.items()}
    logits = {name: onnx_logits(sess, images) for name, sess in sessions.items()}
    rates = {name: [] for name in sessions}
    for _ in range(bench.rounds):
        for name, sess in sessions.items():
            rates[name].append(images_per_second(sess, images, 16, repeats=3))
    exact = {name: onnx_logits(exact_session(path, bench.threads), images)
             for name, path in files.items() if name != "fp32"}
    reference = logits["fp32"]
    report = {"run": str(run.root), "photos": source, "images": len(truth),
              "int8_products_saturate": int8_products_saturate(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "files": {}}
    for name, out in logits.items():
        report["files"][name] = {
            "accuracy": float((out.argmax(1) == truth).mean()),
            "top1_agreement_with_fp32": float((out.argmax(1) == reference.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(out - reference).max()),
            "images_per_s_batch16": round(statistics.median(rates[name]), 1)}
        if name in exact:
            report["files"][name].update(
                exact_top1_agreement_with_fp32=float(
                    (exact[name].argmax(1) == reference.argmax(1)).mean()),
                top1_agreement_with_exact=float((out.argmax(1) == exact[name].argmax(1)).mean()),
                max_abs_logit_diff_vs_exact=float(np.abs(out - exact[name]).max()))
    print_table(console, report)
    bench.out.mkdir(parents=True, exist_ok=True)
    (bench.out / "int8.json").write_text(json.dumps(report, indent=2))
    return report


def exact_session(path: Path, threads: int) -> ort.InferenceSession:
    """`path` with no graph optimization: QDQ pairs are not fused into int8 kernels, so each
    quantized op runs as DequantizeLinear -> float op -> QuantizeLinear, exactly."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def print_table(console: Console, report: dict) -> None:
    cpu = ("x86 without VNNI: int8 products can saturate" if report["int8_products_saturate"]
           else "VNNI or not x86: int8 sums are exact")
    table = Table(title=f"int8 weights on {report['images']} photos ({report['photos']}); "
                        f"this CPU: {cpu}")
    for column in ("model", "accuracy", "vs fp32 (points)", "top-1 = fp32", "max |logit diff|",
                   "exact: top-1 = fp32", "top-1 = exact", "max |diff| vs exact",
                   "images/s batch 16", "vs fp32 speed"):
        table.add_column(column, justify="left" if column == "model" else "right")
    fp32 = report["files"]["fp32"]
    for name, r in report["files"].items():
        exact_cells = ([f"{100 * r['exact_top1_agreement_with_fp32']:.2f}%",
                        f"{100 * r['top1_agreement_with_exact']:.2f}%",
                        f"{r['max_abs_logit_diff_vs_exact']:.3f}"]
                       if "top1_agreement_with_exact" in r else ["", "", ""])
        table.add_row(name, f"{r['accuracy']:.4f}",
                      f"{100 * (r['accuracy'] - fp32['accuracy']):+.2f}",
                      f"{100 * r['top1_agreement_with_fp32']:.2f}%",
                      f"{r['max_abs_logit_diff']:.3f}", *exact_cells,
                      f"{r['images_per_s_batch16']:.0f}",
                      f"{r['images_per_s_batch16'] / fp32['images_per_s_batch16']:.2f}x")
    console.print(table)


if __name__ == "__main__":
    CliApp.run(BenchInt8)
