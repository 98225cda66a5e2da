"""`make bench-train`: the default recipe against the plain recipe a user writes first, in one
run, on the same data and machine. Prints validation accuracy, macro-F1 and wall time.

plain  = frozen backbone, linear head, Adam, no augmentation, no label smoothing/weighting
recipe = TrainConfig() defaults (head phase, then fine-tuning with the full recipe)
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from pydantic_settings import CliApp
from rich.console import Console
from rich.table import Table

from trainer.config import TrainConfig
from trainer.train import train

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared/datasets/clothing-small"


class BenchTrain(BaseModel):
    """Train the plain and the default recipe side by side and print what each reached."""

    data: Path = Field(DEFAULT_DATA, description="ImageFolder with train/ and validation/")
    out: Path = Field(Path("bench_out/train"), description="run folders and bench.json")
    recipes: list[str] = Field(["plain", "recipe"], description="which to run, in order")
    image_size: int = Field(224)
    compare_exporters: Path | None = Field(None, description=(
        "instead of training: export this run folder with both torch.onnx exporters and "
        "time the two graphs in ONNX Runtime, interleaved"))

    def cli_cmd(self) -> None:
        if self.compare_exporters:
            compare_exporters(self.compare_exporters)
        else:
            run_bench(self)


def compare_exporters(run_dir: Path, rounds: int = 7) -> dict:
    """Both exporters on the same trained model; ONNX Runtime images/s at batch 1 and 16,
    measured alternately so machine load hits both alike; medians."""
    import statistics

    import numpy as np
    import onnx

    from trainer.export import export_onnx, images_per_second, session
    from trainer.runs import load_trained

    console = Console()
    model, contract, _ = load_trained(run_dir)
    out = Path(run_dir) / "exporters"
    sessions, report = {}, {}
    for exporter in ("dynamo", "torchscript"):
        path = out / f"{exporter}.onnx"
        start = time.perf_counter()
        export_onnx(model, contract, path, exporter)
        report[exporter] = {"export_s": round(time.perf_counter() - start, 1),
                            "nodes": len(onnx.load(str(path)).graph.node)}
        sessions[exporter] = session(path, threads=2)
    size = contract.input_size
    images = np.random.default_rng(0).normal(size=(16, 3, size, size)).astype(np.float32)
    for batch in (1, 16):
        rates = {name: [] for name in sessions}
        for _ in range(rounds):
            for name, sess in sessions.items():
                rates[name].append(images_per_second(sess, images, batch, repeats=3))
        for name in sessions:
            report[name][f"images_per_s_batch{batch}"] = round(statistics.median(rates[name]), 1)
    table = Table(title=f"ONNX exporters, {contract.architecture} {size} px, ORT 2 threads")
    for column in ("exporter", "export s", "graph nodes", "img/s batch 1", "img/s batch 16"):
        table.add_column(column)
    for name, r in report.items():
        table.add_row(name, str(r["export_s"]), str(r["nodes"]), str(r["images_per_s_batch1"]),
                      str(r["images_per_s_batch16"]))
    console.print(table)
    (out / "exporters.json").write_text(json.dumps(report, indent=2))
    return report


def plain_config(data: Path, out: Path, image_size: int) -> TrainConfig:
    return TrainConfig(data=data, out=out, image_size=image_size, epochs=0, head_epochs=10,
                       optimizer="adam", lr=1e-3, weight_decay=0.0, augment="none",
                       label_smoothing=0.0, balance="none")


def run_bench(bench: BenchTrain) -> dict:
    console = Console()
    results = {}
    for name in bench.recipes:
        out = bench.out / name
        shutil.rmtree(out, ignore_errors=True)
        config = (plain_config(bench.data, out, bench.image_size) if name == "plain" else
                  TrainConfig(data=bench.data, out=out, image_size=bench.image_size))
        start, cpu_start = time.perf_counter(), time.process_time()
        result = train(config, console=console)
        results[name] = {"val_acc": result.best["val_acc"],
                         "val_macro_f1": result.best["val_macro_f1"],
                         "best_epoch": result.best["epoch"],
                         "epochs_run": sum(r["phase"] == "finetune" for r in result.history),
                         "wall_s": round(time.perf_counter() - start, 1),
                         # CPU seconds this process got: wall_s * cores >> cpu_s = shared machine
                         "cpu_s": round(time.process_time() - cpu_start, 1)}
    table = Table(title=f"bench-train: {bench.data.name}, {bench.image_size} px, "
                        f"{torch.get_num_threads()} threads")
    for column in ("recipe", "val accuracy", "val macro-F1", "wall time", "CPU time",
                   "fine-tune epochs"):
        table.add_column(column, justify="left" if column == "recipe" else "right")
    for name, r in results.items():
        table.add_row(name, f"{r['val_acc']:.4f}", f"{r['val_macro_f1']:.4f}",
                      f"{r['wall_s'] / 60:.1f} min", f"{r['cpu_s'] / 60:.1f} min",
                      str(r["epochs_run"]))
    console.print(table)
    if {"plain", "recipe"} <= set(results):
        gain = results["recipe"]["val_acc"] - results["plain"]["val_acc"]
        recipe = results["recipe"]
        met = recipe["val_acc"] >= 0.91 and recipe["wall_s"] <= 900
        console.print(f"recipe vs plain: {gain:+.4f} validation accuracy; target (>= 0.91 in "
                      f"<= 15 min wall): {'MET' if met else 'NOT MET'}")
    load = os.getloadavg()
    report = {"results": results, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load_average_at_end": [round(x, 1) for x in load]}
    bench.out.mkdir(parents=True, exist_ok=True)
    (bench.out / "bench.json").write_text(json.dumps(report, indent=2))
    console.print(f"load average at the end {load[0]:.1f} (1 min) on {os.cpu_count()} cores; "
                  f"written {bench.out / 'bench.json'}")
    return report


if __name__ == "__main__":
    CliApp.run(BenchTrain)
