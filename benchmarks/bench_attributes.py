"""`make bench-attributes`: what an attribute head on the shared backbone is worth, and what the
extra heads cost to serve, measured side by side in one run.

Quality, on the demo catalogue (`demo_data/catalog`, 10 labels x 30 photos, split by
`bench_train.make_demo`: 20 train / 4 val / 6 test per label; each photo's colour is the one
its demo-shop title names, `demo_data/colours.json`, written as manifest.csv's `attr_colour`
the way `collector export` writes it), three trainings with one fixed config (`--steps`
fine-tuning steps, `--selection val`, the default recipe otherwise; scored by default on the
weights after the whole step budget, `--checkpoint last`, so that every backbone is fine-tuned
for its own label: on 40 validation photos the selection may keep the head phase, i.e. the
ImageNet backbone):
  shared         the category fine-tuned, then the colour head on its backbone (`trainer
                 train` + `trainer.attributes.fit_attributes`): what `make demo` ships;
  colour-only    colour as the main label on the same photos whose colour is known, so its
                 backbone is fine-tuned for colour;
  category-only  the same category training on the same photos without the attr_colour column.
Scored on the same test photos: colour accuracy and macro-F1 (photos whose colour is known),
shared vs colour-only, and category accuracy and macro-F1, shared vs category-only.

Serving cost: the shared model exported with its heads (`trainer export`: outputs logits and
attr_colour) and without them (`trainer.onnx_graph.export_onnx` of the same trained model, a
contract without attributes), both served by `bentoml serve` (`loadtests.servers.start_bentoml`,
fp32 on the same runtime) at once and measured alternately, round by round, with
`bench_service`'s load loop: `--requests` requests at `--users` concurrent clients, plus a lone
client; medians over rounds and the with/without ratio.

    python -m benchmarks.bench_attributes            (make bench-attributes)
    python -m benchmarks.bench_attributes --help
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import shutil
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
from pydantic import BaseModel, Field
from pydantic_settings import CliApp
from rich.console import Console
from rich.table import Table
from sklearn.metrics import f1_score

from benchmarks.bench_service import Figures, TopologyBench, _measure
from benchmarks.bench_train import DEMO_CATALOG, make_demo
from benchmarks.results import git_commit
from collector.demo_shop import load_colours
from loadtests.servers import start_bentoml
from service.contract import load_and_preprocess

REPO = Path(__file__).resolve().parents[1]
ATTRIBUTE = "colour"
SPLITS = ("train", "val", "test")
UNKNOWN = "unknown"
MODELS = ("shared", "colour-only", "category-only")
SERVED = ("with-heads", "without-heads")


class BenchAttributes(BaseModel):
    """The shared model (category fine-tuned + colour head) against a colour-only and a
    category-only model on the same demo photos, then the serving cost of its extra head."""

    out: Path = Field(Path("bench_out/attributes"), description=(
        "photo folders, runs, exports, server logs, bench.json and attributes.md"))
    parts: list[Literal["quality", "serving"]] = Field(["quality", "serving"], description=(
        "quality: the three trainings scored on the test photos; serving: the shared model "
        "served with and without its heads (trains the shared model first if it is missing)"))
    steps: int = Field(64, ge=1, description=(
        "fine-tuning optimizer steps per training (fixed, so each training takes a few "
        "minutes on 2 CPU cores: 64 steps of 32 = 10 passes over the 200 training photos); "
        "with --selection val"))
    checkpoint: Literal["last", "best"] = Field("last", description=(
        "the weights scored for quality: last = after the whole step budget (no early "
        "stopping), so every backbone is fine-tuned for its own label, the colour head fitted "
        "on the shared model's final backbone; best = what `trainer train` keeps (best "
        "validation macro-F1, which on 40 photos may be the head phase: an ImageNet backbone)"))
    selection: Literal["val", "auto", "cv"] = Field("val", description=(
        "model selection of every training (val: one training each, the affordable one)"))
    image_size: int | None = Field(None, ge=32, description="training and serving size "
                                                            "(default: the backbone's, 224)")
    seed: int = Field(0, description="the split and every training's seed")
    threads: int | None = Field(None, ge=1, description="torch threads (default: all cores)")
    category_only: bool = Field(True, description=(
        "also train the category-only model (the shared model's backbone is fine-tuned by "
        "the category alone, so this measures training noise; --no-category-only saves a "
        "training)"))
    overrides: dict[str, Any] = Field({}, description=(
        "other TrainConfig knobs for every training, as JSON (quick trials: "
        "'{\"head_epochs\": 2}')"))
    runtime: Literal["auto", "onnxruntime", "openvino"] = Field("auto", description=(
        "CLASSIFIER_RUNTIME of both servers (precision fp32 on both)"))
    ort_threads: int = Field(2, ge=1, description="CLASSIFIER_ORT_THREADS of both servers")
    users: int = Field(8, ge=2, description="concurrent clients in the loaded step")
    requests: int = Field(400, ge=16, description="requests per loaded step (bounded count)")
    lone_requests: int = Field(30, ge=5, description="sequential requests per lone step")
    rounds: int = Field(6, ge=1, description=(
        "rounds; each measures both servers, in alternating order (medians reported)"))

    def cli_cmd(self) -> None:
        run_bench(self)


# --- photo folders ------------------------------------------------------------------------

def write_manifest(dataset: Path, colours: dict[str, str]) -> Path:
    """manifest.csv beside a split ImageFolder, as `collector export` writes it: one row per
    photo with its split, label, relative file and attr_colour ('unknown' without one)."""
    rows = [{"split": split, "label": photo.parent.name,
             "file": photo.relative_to(dataset).as_posix(),
             f"attr_{ATTRIBUTE}": colours.get(f"{photo.parent.name}/{photo.name}", UNKNOWN)}
            for split in SPLITS for photo in sorted((dataset / split).glob("*/*"))]
    path = dataset / "manifest.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def colour_folder(dataset: Path, colours: dict[str, str], target: Path) -> Path:
    """The same split with colour as the label: split/<colour>/photo for every photo whose
    colour is known (symlinks to the same files)."""
    shutil.rmtree(target, ignore_errors=True)
    for split in SPLITS:
        for photo in sorted((dataset / split).glob("*/*")):
            colour = colours.get(f"{photo.parent.name}/{photo.name}")
            if colour:
                folder = target / split / colour
                folder.mkdir(parents=True, exist_ok=True)
                (folder / photo.name).symlink_to(photo.resolve())
    return target


def make_datasets(root: Path, seed: int = 0) -> dict[str, Path]:
    """model name -> its photo folder: the same photos in the same splits for all three."""
    colours = load_colours(DEMO_CATALOG)
    shared = make_demo(root / "shared", seed)
    write_manifest(shared, colours)
    return {"shared": shared,
            "colour-only": colour_folder(shared, colours, root / "colour-only"),
            "category-only": make_demo(root / "category-only", seed)}


# --- quality ------------------------------------------------------------------------------

def train_config(data: Path, out: Path, bench: BenchAttributes):
    from trainer.config import TrainConfig

    knobs = {"steps": bench.steps, "selection": bench.selection, "seed": bench.seed,
             "threads": bench.threads, "image_size": bench.image_size, **bench.overrides}
    if bench.checkpoint == "last":  # the whole budget: no early stopping
        knobs["patience"] = 10_000
    return TrainConfig(data=data, out=out, **knobs)


def train_model(name: str, data: Path, out: Path, bench: BenchAttributes,
                console: Console) -> dict:
    """One training (+ the attribute heads for the shared model); wall and CPU time."""
    from trainer.attributes import fit_attributes
    from trainer.train import train

    shutil.rmtree(out, ignore_errors=True)
    console.rule(f"bench-attributes: training {name}")
    start, cpu_start = time.perf_counter(), time.process_time()
    train(train_config(data, out, bench), console=console)
    if name == "shared":
        fit_attributes(out, console=console)
    return {"wall_s": round(time.perf_counter() - start, 1),
            "cpu_s": round(time.process_time() - cpu_start, 1)}


def heads_on(run_dir: Path, model, contract) -> dict[str, tuple[Any, list[str]]]:
    """The run's attribute heads fitted on `model`'s features, as `fit_attributes` fits them
    (its own functions, the run's config and training photos): name -> (head, values)."""
    from trainer.attributes import features, read_attributes, targets, train_heads, vocabulary
    from trainer.config import TrainConfig
    from trainer.data import EvalImages, Skipped
    from trainer.export import run_samples
    from trainer.runs import RunDir

    run = RunDir(run_dir)
    config = TrainConfig.model_validate_json(run.config.read_text())
    table = read_attributes(config.data)
    if table is None:
        return {}
    train = EvalImages(run_samples(run, "train"), contract, Skipped(),
                       description="attribute heads: train")
    vocab = vocabulary(table, train.samples)
    feats = features(model, train.tensor, config.eval_batch_size)
    heads = train_heads(feats, {n: targets(table, train.samples, n, v) for n, v in vocab.items()},
                        vocab, config)
    return {name: (head, vocab[name]) for name, head in heads.items()}


def predict(run_dir: Path, photos: list[Path],
            which: str = "last") -> tuple[list[str], dict[str, list[str]]]:
    """The run's predicted main label and attribute values for each photo, through the
    service's own preprocessing (`load_and_preprocess`): `which` checkpoint, with its
    attribute heads fitted on that checkpoint's backbone (best: the ones in best.pt)."""
    import torch

    from trainer.attributes import load_multihead
    from trainer.heads import MultiHead
    from trainer.runs import load_trained

    model, contract, checkpoint = load_trained(run_dir, which)
    if which == "best":
        multi = load_multihead(checkpoint, model)
    else:
        fitted = heads_on(run_dir, model, contract)
        multi = MultiHead(model, {n: h for n, (h, _) in fitted.items()}).eval() if fitted \
            else None
        if multi is not None:
            multi.values = {n: v for n, (_, v) in fitted.items()}
    net = multi or model
    tensor = torch.from_numpy(np.stack([load_and_preprocess(p.read_bytes(), contract)
                                        for p in photos]))
    with torch.no_grad():
        outputs = [net(tensor[i:i + 32]) for i in range(0, len(tensor), 32)]
    if multi is None:
        main, heads = torch.cat(outputs).numpy(), {}
    else:
        main = torch.cat([o[0] for o in outputs]).numpy()
        heads = {name: torch.cat([o[1 + k] for o in outputs]).numpy()
                 for k, name in enumerate(multi.names)}
    values = (multi.values if multi is not None else {})
    return ([contract.labels[i] for i in main.argmax(1)],
            {name: [values[name][i] for i in logits.argmax(1)] for name, logits in heads.items()})


def score(predicted: list[str], truth: list[str], values: list[str]) -> dict:
    """Accuracy and macro-F1 (over `values`) of predicted names against true names."""
    right = [p == t for p, t in zip(predicted, truth)]
    return {"images": len(truth), "accuracy": float(np.mean(right)) if right else None,
            "macro_f1": float(f1_score(truth, predicted, labels=values, average="macro",
                                       zero_division=0)) if right else None,
            "correct": right}


def paired(a: dict, b: dict) -> dict:
    """On the same photos: how many only `a` got right, how many only `b`."""
    return {"only_first": sum(x and not y for x, y in zip(a["correct"], b["correct"])),
            "only_second": sum(y and not x for x, y in zip(a["correct"], b["correct"]))}


def scored_photos(dataset: Path, colours: dict[str, str]) -> list[tuple[Path, str, str]]:
    """(photo, category, colour or 'unknown') for every test photo of the shared folder."""
    return [(photo, photo.parent.name, colours.get(f"{photo.parent.name}/{photo.name}", UNKNOWN))
            for photo in sorted((dataset / "test").glob("*/*"))]


def quality(bench: BenchAttributes, datasets: dict[str, Path], console: Console) -> dict:
    runs = {name: bench.out / "runs" / name for name in MODELS}
    names = [n for n in MODELS if bench.category_only or n != "category-only"]
    timing = {name: train_model(name, datasets[name], runs[name], bench, console)
              for name in names}
    photos = scored_photos(datasets["shared"], load_colours(DEMO_CATALOG))
    files = [p for p, _, _ in photos]
    categories = [c for _, c, _ in photos]
    known = [i for i, (_, _, colour) in enumerate(photos) if colour != UNKNOWN]
    colour_truth = [photos[i][2] for i in known]

    which = bench.checkpoint
    shared_labels, shared_heads = predict(runs["shared"], files, which)
    colour_only, _ = predict(runs["colour-only"], [files[i] for i in known], which)
    shared_colour = [shared_heads[ATTRIBUTE][i] for i in known]
    values = sorted(set(colour_truth) | set(shared_colour) | set(colour_only))
    labels = sorted(set(categories))
    rows = {"shared": {"colour": score(shared_colour, colour_truth, values),
                       "category": score(shared_labels, categories, labels)},
            "colour-only": {"colour": score(colour_only, colour_truth, values)}}
    if "category-only" in names:
        category_only, _ = predict(runs["category-only"], files, which)
        rows["category-only"] = {"category": score(category_only, categories, labels)}
    for name, row in rows.items():
        row["training"] = timing[name]
        row["selected_by_trainer"] = selected(runs[name])
    comparison = {"colour": paired(rows["shared"]["colour"], rows["colour-only"]["colour"])}
    if "category-only" in rows:
        comparison["category"] = paired(rows["shared"]["category"],
                                        rows["category-only"]["category"])
    return {"test_photos": len(files), "colour_known": len(known), "colour_values": values,
            "models": rows, "paired": comparison, "checkpoint": which,
            "config": train_config(datasets["shared"], runs["shared"], bench).model_dump(
                mode="json", include={"steps", "selection", "seed", "image_size", "arch",
                                      "head_epochs", "batch_size", "threads", "patience"})}


def selected(run_dir: Path) -> str:
    """Which evaluation best.pt holds: the head phase or a fine-tuning epoch."""
    history = json.loads((run_dir / "history.json").read_text())
    best = max((r for r in history if "val_acc" in r),
               key=lambda r: (r["val_macro_f1"], r["val_acc"]), default=None)
    if best is None:
        return "?"
    where = "head phase" if best["phase"] == "head" else f"epoch {best['epoch']}"
    return f"{where} (val acc {best['val_acc']:.4f}) of {len(history)} evaluations"


# --- serving ------------------------------------------------------------------------------

def export_pair(run_dir: Path, out: Path,
                console: Console) -> tuple[dict[str, Path], dict[str, str]]:
    """The same trained model as two ONNX files: with its attribute heads (`trainer export`,
    gated) and without them (the trainer's own ONNX writer, a contract without attributes);
    and the exporter each was written with."""
    from trainer.export import export
    from trainer.onnx_graph import export_onnx
    from trainer.runs import load_trained

    result = export(run_dir, save=False, console=console)
    model, contract, _ = load_trained(run_dir)
    without = out / "without-heads" / "model.onnx"
    used = export_onnx(model, contract.model_copy(update={"attributes": None,
                                                          "attribute_temperatures": None}),
                       without)
    return ({"with-heads": result.onnx_path, "without-heads": without},
            {"with-heads": result.report["exporter"], "without-heads": used})


def serving(bench: BenchAttributes, models: dict[str, Path], photos: list[bytes],
            console: Console) -> dict:
    """Both files served at once, measured alternately round by round; medians."""
    settings = {"CLASSIFIER_RUNTIME": bench.runtime, "CLASSIFIER_PRECISION": "fp32",
                "CLASSIFIER_ORT_THREADS": str(bench.ort_threads)}
    load = TopologyBench.model_construct(users=bench.users, loaded_requests=bench.requests,
                                         lone_requests=bench.lone_requests)
    samples: dict[str, list[Figures]] = {name: [] for name in models}
    cards = {}
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(start_bentoml(
            str(path), settings=settings, log_dir=bench.out / "serve", name=name,
            timeout_s=240)) for name, path in models.items()}
        for name, server in servers.items():
            card = httpx.get(f"{server.url}/model", timeout=30).json()
            answer = httpx.post(f"{server.url}/classify", files={"image": ("p.jpg", photos[0])},
                                timeout=60).json()
            cards[name] = {"runtime": card["runtime"], "precision": card["precision"],
                           "attributes": sorted(card.get("attributes") or {}),
                           "answers_attributes": sorted(answer.get("attributes") or {}),
                           "cold_start_s": round(server.cold_start_s, 1)}
        for round_index in range(bench.rounds):
            order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
            for name in order:
                console.print(f"round {round_index + 1}/{bench.rounds}: {name}")
                samples[name].append(_measure(servers[name].url, "image", photos, load))
    medians = {name: Figures(**{key: statistics.median(getattr(s, key) for s in runs)
                                for key in Figures.model_fields})
               for name, runs in samples.items()}
    with_, without = medians["with-heads"], medians["without-heads"]
    return {"served": cards, "users": bench.users, "requests": bench.requests,
            "lone_requests": bench.lone_requests, "rounds": bench.rounds,
            "median": {name: f.model_dump() for name, f in medians.items()},
            "rounds_raw": {name: [f.model_dump() for f in runs] for name, runs in samples.items()},
            "ratio_with_over_without": {
                "req_per_s": with_.loaded_images_per_s / without.loaded_images_per_s,
                "p50": with_.loaded_p50_ms / without.loaded_p50_ms,
                "p95": with_.loaded_p95_ms / without.loaded_p95_ms,
                "lone_p50": with_.lone_p50_ms / without.lone_p50_ms}}


# --- the run ------------------------------------------------------------------------------


def run_bench(bench: BenchAttributes) -> dict:
    console = Console(width=150)
    bench.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "settings": bench.model_dump(mode="json")}
    console.print(f"bench-attributes {report['date']}, commit {report['commit']}, "
                  f"{report['machine']}, load average at start {report['load_average_start']}")
    datasets = make_datasets(bench.out / "data", bench.seed)
    if "quality" in bench.parts:
        report["quality"] = quality(bench, datasets, console)
    if "serving" in bench.parts:
        shared = bench.out / "runs" / "shared"
        if not (shared / "attributes.json").is_file():
            train_model("shared", datasets["shared"], shared, bench, console)
        models, exporters = export_pair(shared, bench.out / "exports", console)
        photos = [p.read_bytes() for p in sorted((datasets["shared"] / "test").glob("*/*"))]
        report["serving"] = {**serving(bench, models, photos, console), "exporters": exporters,
                             "files": {name: str(path) for name, path in models.items()}}
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    (bench.out / "bench.json").write_text(json.dumps(report, indent=2, default=str))
    markdown = render(report)
    (bench.out / "attributes.md").write_text(markdown)
    print_tables(report, console)
    console.print(f"load average at end {report['load_average_end']}; "
                  f"{bench.out / 'bench.json'}, {bench.out / 'attributes.md'}")
    return report


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def quality_rows(quality: dict) -> list[list[str]]:
    """model, backbone fine-tuned for, colour acc / macro-F1, category acc / macro-F1, time."""
    tuned = {"shared": "category (colour: a linear head on it)",
             "colour-only": "colour", "category-only": "category"}
    if quality.get("checkpoint") == "best":
        tuned = {name: f"{what}; best.pt: {quality['models'][name]['selected_by_trainer']}"
                 for name, what in tuned.items() if name in quality["models"]}
    rows = []
    for name, row in quality["models"].items():
        colour, category = row.get("colour", {}), row.get("category", {})
        rows.append([name, tuned[name], _fmt(colour.get("accuracy")),
                     _fmt(colour.get("macro_f1")), _fmt(category.get("accuracy")),
                     _fmt(category.get("macro_f1")), f"{row['training']['wall_s'] / 60:.1f}"])
    return rows


def serving_rows(serving: dict) -> list[list[str]]:
    return [[name, f"{f['loaded_images_per_s']:.1f}", f"{f['loaded_p50_ms']:.0f}",
             f"{f['loaded_p95_ms']:.0f}", f"{f['lone_p50_ms']:.1f}", f"{f['lone_p95_ms']:.1f}",
             f"{f['loaded_shed']:.0f}"]
            for name, f in serving["median"].items()]


QUALITY_COLUMNS = ["model", "backbone fine-tuned for", "colour acc", "colour macro-F1",
                   "category acc", "category macro-F1", "training min"]
SERVING_COLUMNS = ["served", "req/s", "p50 ms", "p95 ms", "lone p50 ms", "lone p95 ms", "shed"]


def _sentences(report: dict) -> list[str]:
    lines = []
    if "quality" in report:
        q = report["quality"]
        lines.append(f"Scored: the {q['checkpoint']} weights of each training. What `trainer "
                     "train` kept as best.pt (best validation macro-F1): " + "; ".join(
                         f"{name} {row['selected_by_trainer']}"
                         for name, row in q["models"].items()) + ".")
        c = q["paired"]["colour"]
        lines.append(f"Colour on the {q['colour_known']} test photos whose colour is known (of "
                     f"{q['test_photos']}; values {', '.join(q['colour_values'])}): only the "
                     f"shared model right on {c['only_first']}, only the colour-only model on "
                     f"{c['only_second']}.")
        if "category" in q["paired"]:
            c = q["paired"]["category"]
            lines.append(f"Category on all {q['test_photos']} test photos: only the shared "
                         f"model right on {c['only_first']}, only the category-only model on "
                         f"{c['only_second']}.")
    if "serving" in report:
        s = report["serving"]
        r = s["ratio_with_over_without"]
        served = s["served"]["with-heads"]
        lines.append(f"Serving, {s['users']} concurrent clients, {s['requests']} requests per "
                     f"step, medians of {s['rounds']} alternating rounds, both on "
                     f"{served['runtime']}-{served['precision']}: with/without heads "
                     f"req/s {r['req_per_s']:.3f}x, p50 {r['p50']:.3f}x, p95 {r['p95']:.3f}x, "
                     f"lone p50 {r['lone_p50']:.3f}x (precision forced to fp32 on both: "
                     "the file without heads carries no accuracy gate; exporter "
                     f"{', '.join(sorted(set(s.get('exporters', {}).values()))) or '?'}).")
    return lines


def print_tables(report: dict, console: Console) -> None:
    if "quality" in report:
        q = report["quality"]
        table = Table(title=f"bench-attributes: the same {q['test_photos']} test photos "
                            f"(colour: the {q['colour_known']} known); {q['config']}")
        for column in QUALITY_COLUMNS:
            table.add_column(column, justify="left" if column in QUALITY_COLUMNS[:2] else "right")
        for row in quality_rows(q):
            table.add_row(*row)
        console.print(table)
    if "serving" in report:
        table = Table(title="bench-attributes: the shared model served with and without its "
                            "heads (medians over rounds)")
        for column in SERVING_COLUMNS:
            table.add_column(column, justify="left" if column == "served" else "right")
        for row in serving_rows(report["serving"]):
            table.add_row(*row)
        console.print(table)
    for line in _sentences(report):
        console.print(line)


def _markdown_table(columns: list[str], rows: list[list[str]], text: int = 1) -> list[str]:
    """A markdown table whose first `text` columns are left-aligned, the figures right."""
    return ["| " + " | ".join(columns) + " |",
            "|" + "|".join("---" if i < text else "---:" for i in range(len(columns))) + "|",
            *["| " + " | ".join(row) + " |" for row in rows]]


def render(report: dict) -> str:
    """The figures as a markdown section in the style of BENCHMARKS.md."""
    settings = report["settings"]
    lines = ["## Attribute heads: shared backbone vs one model per attribute; serving cost", "",
             (f"`python -m benchmarks.bench_attributes` (steps {settings['steps']}, selection "
             f"{settings['selection']}, checkpoint {settings['checkpoint']}, seed "
             f"{settings['seed']}, users {settings['users']}, "
             f"requests {settings['requests']}, rounds {settings['rounds']}), "
             f"{report['date']}, commit {report['commit']}, {report['machine']}, load average "
             f"{report['load_average_start']} at start, {report.get('load_average_end')} at "
             "end."), ""]
    if "quality" in report:
        lines += _markdown_table(QUALITY_COLUMNS, quality_rows(report["quality"]), 2) + [""]
    if "serving" in report:
        lines += _markdown_table(SERVING_COLUMNS, serving_rows(report["serving"])) + [""]
    lines += [f"- {line}" for line in _sentences(report)] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    CliApp.run(BenchAttributes)
