"""`make bench-train`: the default `trainer train` against the linear probe (`--epochs 0`: the
head phase alone on frozen Lite0 features), on the same splits, across dataset sizes.

Suites (each photo folder is built from symlinks under OUT/data, so every run is reproducible):
- full:    clothing-small as shipped (train/ 3,068, validation/ 341): validation accuracy, wall
           time, ECE after temperature scaling; goal >= 0.94 in <= 15 min on 2 cores.
- subsets: 3 labels x 80 train photos and 10 labels x 30, several seeds (labels and photos
           drawn per seed), a validation split of 10 photos per label (small: the default
           cross-validates), scored on the rest of clothing-small's validation photos of those
           labels (test/: 28-109 photos per 3 x 80 seed) and on every photo of those labels
           neither recipe saw (held-out: that test/ plus the unused train/ photos, 264-1,103
           per 3 x 80 seed, about 3,000 for 10 x 30: one photo weighs 0.09-0.4 points there,
           0.9-3.6 on test/); mean and spread over seeds; goal: recipe - probe >= 2 points on
           average.
- demo:    demo_data/catalog (10 labels x 30), 20 train / 4 val / 6 test photos per label,
           split anew by each seed; also scored on every clothing-small photo outside the
           catalogue when clothing-small is here (held-out: 3,109 photos; the catalogue was
           drawn from it).
Printed side by side: accuracy, macro-F1, wall time, for the recipe and the probe.
`--before EARLIER_OUT` compares two finished runs (before and after a change) photo by photo.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic_settings import CliApp
from rich.console import Console
from rich.table import Table

from benchmarks.datasets import CLOTHING_SMALL, require
from trainer.config import TrainConfig
from trainer.evaluate import evaluate
from trainer.train import train

REPO = Path(__file__).resolve().parents[1]
DEMO_CATALOG = REPO / "demo_data" / "catalog"
SUBSETS = {"3x80": (3, 80), "10x30": (10, 30)}   # labels x train photos per label
SUBSET_VAL_PER_LABEL = 10
RECIPES = ("probe", "recipe")


class BenchTrain(BaseModel):
    """Default recipe vs the linear probe on the same splits: full clothing-small, small
    subsets over several seeds, the demo catalogue."""

    data: Path = Field(CLOTHING_SMALL, description="clothing-small: train/ and validation/")
    out: Path = Field(Path("bench_out/train"), description="photo folders, runs, bench.json")
    suites: list[str] = Field(["subsets", "demo", "full"], description=(
        "which to run, in order: full | subsets | demo"))
    subsets: list[str] = Field(list(SUBSETS), description="subset kinds: 3x80 | 10x30")
    seeds: int = Field(3, ge=1, description=(
        "seeds per subset kind (labels and photos drawn) and of the demo split"))
    first_seed: int = Field(0, ge=0, description=(
        "subsets and demo use seeds first_seed .. first_seed + seeds - 1 (add seeds to a "
        "finished run)"))
    recipes: list[Literal["probe", "recipe"]] = Field(list(RECIPES), description=(
        "probe | recipe: which to train (the probe does not depend on fine-tuning overrides)"))
    threads: int | None = Field(None, ge=1, description="torch threads (default: all cores)")
    overrides: dict[str, Any] = Field({}, description=(
        "TrainConfig knobs for both recipes, as JSON (quick trials: "
        "'{\"image_size\": 64, \"steps\": 4}'); empty = the defaults being benchmarked"))
    compare_exporters: Path | None = Field(None, description=(
        "instead of training: export this run folder with both torch.onnx exporters and "
        "time the two graphs in ONNX Runtime, interleaved"))
    before: Path | None = Field(None, description=(
        "instead of training: compare the finished run in --out with this earlier one (an "
        "--out folder), photo by photo on every split both ran: on its held-out photos, or "
        "for the full suite on the validation photos it was scored on"))

    def cli_cmd(self) -> None:
        if self.compare_exporters:
            compare_exporters(self.compare_exporters)
        elif self.before:
            compare_runs(self.before, self.out)
        else:
            run_bench(self)


# --- photo folders ---------------------------------------------------------------------------

def link_split(target: Path, split: str, label: str, files: list[Path]) -> None:
    folder = target / split / label
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f.name).symlink_to(f.resolve())


def heldout_folder(subset: Path) -> Path:
    return subset.with_name(f"{subset.name}-heldout")


def make_subset(source: Path, target: Path, labels: int, per_label: int, seed: int) -> Path:
    """`labels` labels drawn with `seed`; per label: `per_label` train photos from train/, 10
    validation photos from validation/, and the rest of validation/ as test/. Beside it,
    `heldout_folder(target)`/<label>/ holds every photo of those labels outside train/ and val/
    (test/ and the unused train/ photos): a test set 10x larger, from the same two sources."""
    rng = random.Random(seed)
    heldout = heldout_folder(target)
    for folder in (target, heldout):
        shutil.rmtree(folder, ignore_errors=True)
    names = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    for label in sorted(rng.sample(names, labels)):
        train_files = sorted((source / "train" / label).iterdir())
        val_files = sorted((source / "validation" / label).iterdir())
        rng.shuffle(train_files)
        rng.shuffle(val_files)
        link_split(target, "train", label, train_files[:per_label])
        link_split(target, "val", label, val_files[:SUBSET_VAL_PER_LABEL])
        link_split(target, "test", label, val_files[SUBSET_VAL_PER_LABEL:])
        link_split(heldout, ".", label,
                   val_files[SUBSET_VAL_PER_LABEL:] + train_files[per_label:])
    return target


def make_demo(target: Path, seed: int = 0, source: Path | None = None) -> Path:
    """The catalogue split 20 / 4 / 6 per label. Its photos are drawn from clothing-small: when
    `source` (clothing-small) is here, `heldout_folder(target)` gets every photo of it that the
    catalogue lacks (3,109; one photo weighs 0.03 points there, 1.7 on the 60 of test/)."""
    rng = random.Random(seed)
    heldout = heldout_folder(target)
    for folder in (target, heldout):
        shutil.rmtree(folder, ignore_errors=True)
    for folder in sorted(p for p in DEMO_CATALOG.iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())
        rng.shuffle(files)
        link_split(target, "train", folder.name, files[:20])
        link_split(target, "val", folder.name, files[20:24])
        link_split(target, "test", folder.name, files[24:])
        if source is not None:
            in_catalogue = {f.name for f in files}
            link_split(heldout, ".", folder.name,
                       [f for split in ("train", "validation")
                        for f in sorted((source / split / folder.name).iterdir())
                        if f.name not in in_catalogue])
    return target


# --- one comparison -------------------------------------------------------------------------

def config_for(recipe: str, data: Path, out: Path, bench: BenchTrain) -> TrainConfig:
    knobs = {"threads": bench.threads, **bench.overrides}
    if recipe == "probe":
        knobs["epochs"] = 0
    return TrainConfig(data=data, out=out, **knobs)


def run_one(recipe: str, data: Path, out: Path, bench: BenchTrain, console: Console,
            heldout: Path | None = None) -> dict:
    """Train, then score on data's test/ (else its validation split), and on `heldout`."""
    shutil.rmtree(out, ignore_errors=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = train(config_for(recipe, data, out, bench), console=console)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    metrics = evaluate(out, data=data, console=console)
    summary = result.selection.get("summary", {})
    wide = {}
    if heldout is not None:
        scores = evaluate(out, data=heldout, console=console)
        calibration = scores["calibration"]
        wide = {"heldout_acc": scores["accuracy"], "heldout_macro_f1": scores["macro_f1"],
                "heldout_images": scores["images"],
                "heldout_ece_before": calibration["ece_uncalibrated"],
                "heldout_ece_after": calibration["ece_calibrated"],
                "heldout_ece_floor": calibration["ece_of_a_calibrated_model"],
                "heldout_temperature_fitted_here": calibration["temperature_fitted_here"],
                "heldout_ece_at_t_fitted_here": calibration["ece_at_temperature_fitted_here"],
                "heldout_predictions": scores["predictions_csv"]}
        if "ece_at_temperature_out_of_fold" in calibration:  # a probe refit after cross-validation
            wide["heldout_ece_out_of_fold_t"] = calibration["ece_at_temperature_out_of_fold"]
    return {"recipe": recipe, "acc": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "images": metrics["images"], "evaluated_on": metrics["evaluated_on"],
            "predictions": metrics["predictions_csv"], **wide,
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "selection": result.selection.get("mode"), "chosen": summary.get("chosen"),
            "temperature": metrics["calibration"]["temperature"],
            "ece_before": metrics["calibration"]["ece_uncalibrated"],
            "ece_after": metrics["calibration"]["ece_calibrated"],
            "ece_floor": metrics["calibration"]["ece_of_a_calibrated_model"],
            "fine_tune_rows": sum(r["phase"] == "finetune" for r in result.history)}


def mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def run_bench(bench: BenchTrain) -> dict:
    console = Console()
    rows: list[dict] = []
    datasets: list[tuple[str, str, int, Path]] = []  # (suite, name, seed, folder)
    for suite in bench.suites:
        if suite == "subsets":
            source = require(bench.data)
            for kind in bench.subsets:
                labels, per_label = SUBSETS[kind]
                for seed in range(bench.first_seed, bench.first_seed + bench.seeds):
                    folder = make_subset(source, bench.out / "data" / f"{kind}-seed{seed}",
                                         labels, per_label, seed)
                    datasets.append((suite, kind, seed, folder))
        elif suite == "demo":
            source = bench.data if bench.data.is_dir() else None
            for seed in range(bench.first_seed, bench.first_seed + bench.seeds):
                datasets.append((suite, "demo", seed, make_demo(
                    bench.out / "data" / f"demo-seed{seed}", seed, source=source)))
        elif suite == "full":
            datasets.append((suite, "clothing-small", 0, require(bench.data)))
        else:
            raise SystemExit(f"unknown suite {suite}: full | subsets | demo")
    for suite, name, seed, folder in datasets:
        for recipe in bench.recipes:
            out = bench.out / "runs" / f"{name}-seed{seed}" / recipe
            console.rule(f"bench-train: {name} seed {seed}: {recipe}")
            heldout = heldout_folder(folder)
            heldout = heldout if suite != "full" and heldout.is_dir() else None
            row = run_one(recipe, folder, out, bench, console, heldout)
            rows.append({"suite": suite, "dataset": name, "seed": seed, **row})
            both = {r["recipe"]: r for r in rows if (r["dataset"], r["seed"]) == (name, seed)}
            if heldout is not None and set(both) == set(RECIPES):
                both["recipe"]["heldout_paired"] = paired(both["probe"]["heldout_predictions"],
                                                          both["recipe"]["heldout_predictions"])
            write_report(bench, rows)
    print_tables(console, rows)
    return write_report(bench, rows)


def paired(first_csv: str, second_csv: str, names: tuple[str, str] = RECIPES) -> dict:
    """The held-out photos only one of the two models gets right, and McNemar's exact p for
    "they are equally good": the gain's noise, photo for photo. Photos are matched by their
    path below the held-out folder (<label>/<file>), so two runs under different --out folders
    that drew the same split compare too."""
    right = []
    for path in (first_csv, second_csv):
        with open(path, newline="") as handle:
            right.append({Path(r["path"]).parent.name + "/" + Path(r["path"]).name:
                          r["true"] == r["predicted"] for r in csv.DictReader(handle)})
    if right[0].keys() != right[1].keys():
        raise SystemExit(f"{first_csv} and {second_csv} score different photos")
    only = [sum(right[i][p] and not right[1 - i][p] for p in right[0]) for i in (0, 1)]
    return {f"only_{names[0]}_right": only[0], f"only_{names[1]}_right": only[1],
            "mcnemar_p": mcnemar_p(*only)}


def mcnemar_p(only_first: int, only_second: int) -> float:
    from scipy.stats import binomtest

    total = only_first + only_second
    return float(f"{binomtest(only_first, total).pvalue:.3g}") if total else 1.0


def compare_runs(before: Path, after: Path, console: Console | None = None) -> dict:
    """Two finished benchmark runs (say, before and after a change to the recipe), photo by
    photo: per split and recipe both ran, the photos only one of them gets right, and the
    same summed over splits. A split is compared on its held-out photos; one without them
    (the full suite) on the photos it was scored on (test/, else validation)."""
    console = console or Console()
    rows = {}
    for which, folder in (("before", before), ("after", after)):
        report = json.loads((Path(folder) / "bench.json").read_text())
        rows[which] = {(r["dataset"], r["seed"], r["recipe"]): r for r in report["rows"]}
    table = Table(title=f"{before} (before) vs {after} (after), photo by photo")
    for column in ("split", "recipe", "photos", "before", "after", "only before right",
                   "only after right", "McNemar p"):
        table.add_column(column, justify="left" if column in ("split", "recipe") else "right")
    splits, totals = [], {}
    for key in sorted(rows["before"].keys() & rows["after"].keys()):
        old, new = rows["before"][key], rows["after"][key]
        scored = next((prefix for prefix in ("heldout_", "") if f"{prefix}predictions" in old
                       and f"{prefix}predictions" in new), None)
        if scored is None:  # a run from before predictions were recorded
            continue
        pair = paired(old[f"{scored}predictions"], new[f"{scored}predictions"],
                      names=("before", "after"))
        images, acc = new[f"{scored}images"], (old[f"{scored}acc"], new[f"{scored}acc"])
        splits.append({"dataset": key[0], "seed": key[1], "recipe": key[2],
                       "photos": "held-out" if scored else new["evaluated_on"],
                       "images": images, "before_acc": acc[0], "after_acc": acc[1], **pair})
        total = totals.setdefault(key[2], [0, 0])
        total[0] += pair["only_before_right"]
        total[1] += pair["only_after_right"]
        table.add_row(f"{key[0]} seed {key[1]}", key[2],
                      f"{images:,} {'held-out' if scored else 'scored'}",
                      f"{acc[0]:.4f}", f"{acc[1]:.4f}",
                      str(pair["only_before_right"]), str(pair["only_after_right"]),
                      f"{pair['mcnemar_p']:.2g}")
    if not splits:
        raise SystemExit(f"{before} and {after} share no split with predictions on record")
    console.print(table)
    summed = {recipe: {"only_before_right": b, "only_after_right": a, "mcnemar_p": mcnemar_p(b, a)}
              for recipe, (b, a) in totals.items()}
    for recipe, s in summed.items():
        console.print(f"{recipe}, summed over the splits: only before right on "
                      f"{s['only_before_right']} photos, only after on {s['only_after_right']} "
                      f"(McNemar p = {s['mcnemar_p']:.2g})")
    return {"splits": splits, "summed": summed}


def comparisons(rows: list[dict]) -> dict:
    """Per dataset name: recipe and probe figures over seeds, the recipe's gain, and the share
    of the probe's errors the recipe removes (where the probe is near 1.0, a gain in points is
    capped by how few errors are left to remove)."""
    out = {}
    for name in dict.fromkeys(r["dataset"] for r in rows):
        by = {recipe: [r for r in rows if r["dataset"] == name and r["recipe"] == recipe]
              for recipe in RECIPES}
        seeds = sorted({r["seed"] for r in by["recipe"]} & {r["seed"] for r in by["probe"]})
        if not seeds:
            continue
        pick = {recipe: {r["seed"]: r for r in by[recipe]} for recipe in RECIPES}
        accuracies = ["acc"]
        if all("heldout_acc" in pick[recipe][s] for recipe in RECIPES for s in seeds):
            accuracies.append("heldout_acc")
        measures = accuracies + [m.replace("acc", "macro_f1") for m in accuracies] + ["wall_s"]
        out[name] = {"seeds": seeds, **{f"{recipe}_{m}": [pick[recipe][s][m] for s in seeds]
                                        for recipe in RECIPES for m in measures}}
        for acc in accuracies:
            pairs = list(zip(out[name][f"recipe_{acc}"], out[name][f"probe_{acc}"]))
            gains = [r - p for r, p in pairs]
            removed = [(r - p) / (1 - p) if p < 1 else None for r, p in pairs]
            out[name] |= {f"gain_{acc}": gains, f"mean_gain_{acc}": statistics.mean(gains),
                          f"errors_removed_{acc}": removed}
    return out


def print_tables(console: Console, rows: list[dict]) -> None:
    table = Table(title="bench-train: default recipe vs linear probe (same splits; mean ± sd "
                        "over seeds)")
    for column in ("dataset", "seeds", "recipe acc", "probe acc", "recipe macro-F1",
                   "probe macro-F1", "recipe wall", "probe wall", "gain (acc)"):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for name, c in comparisons(rows).items():
        table.add_row(name, str(len(c["seeds"])), mean_spread(c["recipe_acc"]),
                      mean_spread(c["probe_acc"]), mean_spread(c["recipe_macro_f1"]),
                      mean_spread(c["probe_macro_f1"]),
                      f"{statistics.mean(c['recipe_wall_s']) / 60:.1f} min",
                      f"{statistics.mean(c['probe_wall_s']) / 60:.1f} min",
                      f"{c['mean_gain_acc']:+.4f}")
    console.print(table)
    for name, c in comparisons(rows).items():
        if "mean_gain_heldout_acc" in c:
            console.print(f"{name}, held-out photos: recipe {mean_spread(c['recipe_heldout_acc'])}"
                          f" (macro-F1 {mean_spread(c['recipe_heldout_macro_f1'])}), probe "
                          f"{mean_spread(c['probe_heldout_acc'])} (macro-F1 "
                          f"{mean_spread(c['probe_heldout_macro_f1'])}); gain per seed "
                          + ", ".join(f"{g:+.4f}" for g in c["gain_heldout_acc"]))
            removed = [r for r in c["errors_removed_heldout_acc"] if r is not None]
            if removed:
                console.print(f"{name}, held-out photos: share of the probe's errors the recipe "
                              "removes per seed " + ", ".join(f"{r:.0%}" for r in removed)
                              + f" (median {statistics.median(removed):.0%})")
        if name in SUBSETS:
            for acc, photos in (("acc", "test/"), ("heldout_acc", "held-out")):
                if f"mean_gain_{acc}" in c:
                    met = c[f"mean_gain_{acc}"] >= 0.02
                    console.print(f"{name}: recipe - probe {c[f'mean_gain_{acc}']:+.4f} on "
                                  f"{photos} photos, on average over {len(c['seeds'])} seeds; "
                                  f"goal >= +0.02: {'met' if met else 'missed'}")
    for r in rows:
        if "heldout_ece_after" in r and r["recipe"] == "recipe":
            console.print(f"{r['dataset']} seed {r['seed']}: ECE on {r['heldout_images']} "
                          f"held-out photos {r['heldout_ece_before']:.4f} -> "
                          f"{r['heldout_ece_after']:.4f} (a perfectly calibrated model: "
                          f"{r['heldout_ece_floor']:.4f}; goal <= 0.03)"
                          + (f"; {r['heldout_ece_out_of_fold_t']:.4f} with the out-of-fold T "
                             "not carried to the probe refit" if "heldout_ece_out_of_fold_t" in r
                             else "")
                          + f"; T {r['temperature']:.3f}, the held-out photos alone would fit "
                            f"{r['heldout_temperature_fitted_here']:.3f} (ECE "
                            f"{r['heldout_ece_at_t_fitted_here']:.4f} at it)")
            if "heldout_paired" in r:
                pair = r["heldout_paired"]
                console.print(f"{r['dataset']} seed {r['seed']}: of the held-out photos only the "
                              f"probe gets {pair['only_probe_right']} right, only the recipe "
                              f"{pair['only_recipe_right']} (McNemar p = "
                              f"{pair['mcnemar_p']:.2g})")
    for r in rows:
        if r["dataset"] == "clothing-small" and r["recipe"] == "recipe":
            met = r["acc"] >= 0.94 and r["wall_s"] <= 900
            console.print(f"clothing-small: {r['acc']:.4f} in {r['wall_s'] / 60:.1f} min; "
                          f"goal >= 0.94 within 15 min: {'met' if met else 'missed'}; "
                          f"ECE {r['ece_before']:.4f} -> {r['ece_after']:.4f} (T = "
                          f"{r['temperature']:.3f}; goal <= 0.03: "
                          f"{'met' if r['ece_after'] <= 0.03 else 'missed'}; a perfectly "
                          f"calibrated model would show {r['ece_floor']:.4f} on these "
                          f"{r['images']} photos)")


def write_report(bench: BenchTrain, rows: list[dict]) -> dict:
    load = os.getloadavg()
    report = {"rows": rows, "comparisons": comparisons(rows),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load_average_at_end": [round(x, 1) for x in load]}
    bench.out.mkdir(parents=True, exist_ok=True)
    (bench.out / "bench.json").write_text(json.dumps(report, indent=2))
    return report


# --- exporters --------------------------------------------------------------------------------

def compare_exporters(run_dir: Path, rounds: int = 7) -> dict:
    """Both exporters on the same trained model; ONNX Runtime images/s at batch 1 and 16,
    measured alternately so machine load hits both alike; medians."""
    import numpy as np
    import onnx

    from trainer.onnx_graph import export_onnx, images_per_second, session
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


if __name__ == "__main__":
    CliApp.run(BenchTrain)
