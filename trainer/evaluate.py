"""A run's best model, judged honestly: metrics, plots and MODEL_CARD.md in RUN_DIR/report.

Photos go through `service.contract.load_and_preprocess`, so these are the numbers the
service will show. Plots are PNGs because people would rather look than read.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from service.contract import decode_image
from trainer.calibration import (
    ece_of_a_calibrated_model,
    expected_calibration_error,
    fit_temperature,
    probabilities,
)
from trainer.data import DataError, EvalImages, Sample, Skipped, discover
from trainer.runs import RunDir, atomic_write_bytes, atomic_write_json, load_trained


def eval_samples(run: RunDir, labels: list[str], data: Path | None) -> tuple[list[Sample], str]:
    """The run's own validation files, or another folder's test/ (else val/, else all)."""
    if data is None:
        info = json.loads(run.dataset.read_text())
        return [Sample(Path(p), label) for p, label in info["val_samples"]], info["val_source"]
    splits = discover(data, min_images_per_class=1, val_fraction=0.15)
    if splits.labels != labels and not set(splits.labels) <= set(labels):
        raise DataError(f"{data} has labels {splits.labels}; the model knows {labels}")
    remap = {i: labels.index(name) for i, name in enumerate(splits.labels)}
    if splits.test:
        chosen, source = splits.test, f"{data}/test"
    elif (Path(data) / "train").is_dir():
        chosen, source = splits.val, f"{data} validation split"
    else:
        chosen, source = splits.train + splits.val, f"every image in {data}"
    return [Sample(s.path, remap[s.label]) for s in chosen], source


def evaluate(run_dir: Path, data: Path | None = None, console: Console | None = None) -> dict:
    console = console or Console()
    run = RunDir(Path(run_dir))
    model, contract, checkpoint = load_trained(run.root)
    labels = contract.labels
    selection = checkpoint.get("selection") or {}
    skipped = Skipped()
    if data is None and selection.get("mode") == "cv":
        # Validation photos are in the refit's training set: judge the choice by what it was
        # chosen on, predictions of models that never saw each photo.
        chosen = selection["summary"]["chosen"]
        oof = selection["oof"]
        samples = [Sample(Path(p), label) for p, label in zip(oof["paths"], oof["labels"])]
        logits, truth = np.asarray(oof["logits"][chosen]), np.asarray(oof["labels"])
        source = (f"out-of-fold predictions ({len(selection['folds'])}-fold cross-validation "
                  "on train+val; each photo predicted by a model that never saw it)")
    else:
        samples, source = eval_samples(run, labels, data)
        images = EvalImages(samples, contract, skipped, description="evaluation photos")
        samples, truth = images.samples, images.labels.numpy()
        with torch.no_grad():
            logits = torch.cat([model(images.tensor[i:i + 64])
                                for i in range(0, len(images), 64)]).numpy()
    # Scores as the service will give them: softmax(logits / contract.temperature).
    fitted = checkpoint.get("calibration", {})
    probs = probabilities(logits, contract.temperature)
    predicted = probs.argmax(1)
    classes = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=classes, zero_division=0)
    matrix = confusion_matrix(truth, predicted, labels=classes)
    metrics = {
        "evaluated_on": source, "images": len(truth), "skipped": len(skipped),
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, labels=classes, average="macro",
                                   zero_division=0)),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(labels)},
        "best_epoch": checkpoint.get("metrics", {}),
        "calibration": {
            "temperature": contract.temperature,
            "ece_uncalibrated": expected_calibration_error(probabilities(logits), truth),
            "ece_calibrated": expected_calibration_error(probs, truth),
            "ece_of_a_calibrated_model": ece_of_a_calibrated_model(probs),
            "fitted": fitted},
        "selection": {k: v for k, v in selection.items() if k != "oof"},
    }
    # How far the contract's T is from the one these photos alone would choose, and what that
    # T would leave: ECE above the floor that no temperature removes.
    here = fit_temperature(logits, truth)
    metrics["calibration"] |= {"temperature_fitted_here": here,
                               "ece_at_temperature_fitted_here": expected_calibration_error(
                                   probabilities(logits, here), truth)}
    if "temperature_out_of_fold" in fitted:  # what the carry to the refit changed, here
        metrics["calibration"]["ece_at_temperature_out_of_fold"] = expected_calibration_error(
            probabilities(logits, fitted["temperature_out_of_fold"]), truth)
    heads = checkpoint.get("attributes") or {}
    if heads:  # per-attribute metrics (trainer.attributes, on the run's validation photos)
        metrics["attributes"] = {"evaluated_on": heads["evaluated_on"], **heads["metrics"]}
    # Another data set gets its own folder, so the run's own report is never overwritten.
    out = run.report if data is None else run.root / f"report-{Path(data).resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    metrics["predictions_csv"] = str(out / "predictions.csv")
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "confusion_matrix.json", {"labels": labels, "rows_true_cols_predicted":
                                                      matrix.tolist()})
    write_predictions(Path(metrics["predictions_csv"]), samples, truth, probs, labels)
    plot_confusion(matrix, labels, out / "confusion_matrix.png")
    for name, head in heads.get("metrics", {}).items():
        if head["confusion_matrix"]:
            plot_confusion(np.asarray(head["confusion_matrix"]), head["values"],
                           out / f"confusion_matrix_attr_{name}.png")
    history = json.loads(run.history.read_text()) if run.history.is_file() else []
    plot_curves(history, out / "curves.png")
    mistakes = worst_mistakes(samples, probs, truth, labels)
    plot_mistakes(mistakes, out / "worst_mistakes.png")
    write_model_card(run, out, contract, metrics, history, mistakes)
    print_table(console, metrics, labels)
    console.print(f"report: {out}/ (metrics.json, predictions.csv, confusion_matrix.png, "
                  "curves.png, worst_mistakes.png, MODEL_CARD.md)")
    return metrics


def write_predictions(path: Path, samples: list[Sample], truth: np.ndarray, probs: np.ndarray,
                      labels: list[str]) -> None:
    """One row per photo (path, true label, predicted label, calibrated score): what two runs
    are compared on photo by photo."""
    text = io.StringIO()
    rows = csv.writer(text)
    rows.writerow(["path", "true", "predicted", "score"])
    for sample, true, row in zip(samples, truth, probs):
        rows.writerow([sample.path, labels[true], labels[row.argmax()], f"{row.max():.4f}"])
    data = text.getvalue().encode()
    atomic_write_bytes(path, lambda handle: handle.write(data))


def print_table(console: Console, metrics: dict, labels: list[str]) -> None:
    table = Table(title=f"{metrics['evaluated_on']}: accuracy {metrics['accuracy']:.4f}, "
                        f"macro-F1 {metrics['macro_f1']:.4f} ({metrics['images']} images)")
    for column in ("label", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="left" if column == "label" else "right")
    for name in labels:
        row = metrics["per_class"][name]
        table.add_row(name, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                      str(row["support"]))
    console.print(table)


def plot_confusion(matrix: np.ndarray, labels: list[str], path: Path) -> None:
    size = max(5, 0.55 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = matrix.max() or 1
    for i in range(len(labels)):
        for j in range(len(labels)):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if matrix[i, j] > peak / 2 else "black")
    ax.set_title("confusion matrix (rows: true label)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(history: list[dict], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    val_rows = [row for row in history if "val_loss" in row]  # a refit has no validation
    epochs = [row["epoch"] for row in val_rows]
    train_rows = [row for row in history if row.get("train_loss") is not None]
    if val_rows:
        left.plot(epochs, [row["val_loss"] for row in val_rows], "o-", label="validation loss")
    left.plot([r["epoch"] for r in train_rows], [r["train_loss"] for r in train_rows], "o-",
              label="train loss (augmented, smoothed labels)")
    left.set_xlabel("epoch (0 = head-only phase)")
    left.legend()
    right.plot(epochs, [row["val_acc"] for row in val_rows], "o-", label="validation accuracy")
    right.plot(epochs, [row["val_macro_f1"] for row in val_rows], "o-",
               label="validation macro-F1")
    right.set_xlabel("epoch (0 = head-only phase)")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def worst_mistakes(samples: list[Sample], probs: np.ndarray, truth: np.ndarray,
                   labels: list[str], limit: int = 16) -> list[dict]:
    """Wrong predictions, most confident first: the ones a user should look at."""
    wrong = np.flatnonzero(probs.argmax(1) != truth)
    wrong = wrong[np.argsort(-probs[wrong].max(1))][:limit]
    return [{"path": str(samples[i].path), "true": labels[truth[i]],
             "predicted": labels[int(probs[i].argmax())], "confidence": float(probs[i].max())}
            for i in wrong]


def plot_mistakes(mistakes: list[dict], path: Path) -> None:
    columns = 4
    rows = max(1, -(-len(mistakes) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, mistake in zip(axes.flat, mistakes):
        image = decode_image(Path(mistake["path"]).read_bytes(), draft_size=256)
        image.thumbnail((256, 256))
        ax.imshow(image)
        ax.set_title(f"true {mistake['true']}\npredicted {mistake['predicted']} "
                     f"({mistake['confidence']:.0%})", fontsize=9)
    if not mistakes:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center")
    fig.suptitle("most confident mistakes")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def selection_lines(selection: dict, best: dict) -> list[str]:
    """How the exported model was chosen, and why."""
    if selection.get("mode") != "cv":
        return ["## Model selection", "",
                (f"{selection.get('reason', 'best evaluation on validation')}: epoch "
                f"{best.get('epoch')} ({best.get('phase')}) by validation macro-F1.")]
    summary = selection["summary"]
    wise = all("wise_acc" in f for f in selection["folds"])
    return ["## Model selection", "", f"{selection['reason']}.", "",
            f"**Chosen: {summary['chosen']}.** {summary['why']}.", "",
            "| fold | held-out photos | probe acc | fine-tuned acc | "
            + ("WiSE-FT acc | " if wise else "") + "steps | wall s |",
            "|---:|---:|---:|---:|" + ("---:|" if wise else "") + "---:|---:|",
            *[f"| {f['fold']} | {f['images']} | {f['probe_acc']:.4f} | {f['finetune_acc']:.4f} "
              + (f"| {f['wise_acc']:.4f} " if wise else "") + f"| {f['steps']} | {f['wall_s']} |"
              for f in selection["folds"]], "",
            ("The exported model is the chosen candidate refit on train+val with the same "
            "fixed schedule"
            + (f" (WiSE-FT: {1 - selection['wise_alpha']:g} x the head phase's weights + "
               f"{selection['wise_alpha']:g} x the fine-tuned ones)."
               if selection.get("wise_alpha") else "."))]


def calibration_lines(calibration: dict, evaluated_on: str) -> list[str]:
    fitted = calibration.get("fitted") or {}
    lines = ["## Calibration", "",
             (f"Scores are softmax(logits / T) with T = **{calibration['temperature']:.3f}** "
             f"(in the model contract), fitted on {fitted.get('fitted_on', '?')}."), "",
             (f"- expected calibration error on {evaluated_on}: "
             f"**{calibration['ece_uncalibrated']:.4f}** before, "
             f"**{calibration['ece_calibrated']:.4f}** after temperature scaling"
             + (f" (a perfectly calibrated model with these scores would show about "
                f"{calibration['ece_of_a_calibrated_model']:.4f} on this many photos, by "
                "chance alone)" if "ece_of_a_calibrated_model" in calibration else ""))]
    if "temperature_fitted_here" in calibration:
        lines.append(f"- the T these photos alone would fit: "
                     f"{calibration['temperature_fitted_here']:.3f} (ECE "
                     f"{calibration['ece_at_temperature_fitted_here']:.4f} at it)")
    if "ece_before" in fitted:
        lines.append(f"- on the photos T was fitted on ({fitted['images']}): ECE "
                     f"{fitted['ece_before']:.4f} -> {fitted['ece_after']:.4f}, NLL "
                     f"{fitted['nll_before']:.4f} -> {fitted['nll_after']:.4f}")
    if "refit_logit_scale" in fitted:
        lines.append(f"- carried to the probe refit on train+val: T "
                     f"{fitted['temperature_out_of_fold']:.3f} out of fold x "
                     f"{fitted['refit_logit_scale']:.3f}, how much wider the refit's logits "
                     "spread than the fold probes' on the same photos")
    return lines


def head_calibration_cell(calibration: dict | None) -> str:
    """How a head's served scores are calibrated: its temperature and ECE before -> after."""
    if not calibration:
        return "uncalibrated (a model from before calibrated heads)"
    if "ece_before" not in calibration:
        return calibration["fitted_on"]
    return (f"T {calibration['temperature']:.3f}, ECE {calibration['ece_before']:.4f} -> "
            f"{calibration['ece_after']:.4f}")


def attribute_lines(attributes: dict | None) -> list[str]:
    """One row per attribute head, then its confusion matrix (values known only)."""
    if not attributes:
        return []
    heads = {k: v for k, v in attributes.items() if k != "evaluated_on"}
    fmt = lambda x: "" if x is None else f"{x:.4f}"
    return ["## Attributes", "",
            (f"One linear head per attribute on the shared backbone, trained on the title-derived "
             f"values (unknown ones masked out of the loss); judged on "
             f"{attributes['evaluated_on']}, over the photos whose value is known."), "",
            ("| attribute | values | val photos known | unknown | accuracy | macro-F1 | "
             "majority baseline | scores |"), "|---|---|---:|---:|---:|---:|---:|---|",
            *[f"| {name} | {', '.join(h['values'])} | {h['images']} | {h['unknown']} | "
              f"{fmt(h['accuracy'])} | {fmt(h['macro_f1'])} | {fmt(h['majority_baseline'])} | "
              f"{head_calibration_cell(h.get('calibration'))} |"
              for name, h in heads.items()], "",
            *[f"![{name} confusion matrix](confusion_matrix_attr_{name}.png)\n"
              for name, h in heads.items() if h["confusion_matrix"]], ""]


def write_model_card(run: RunDir, out: Path, contract, metrics: dict, history: list[dict],
                     mistakes: list[dict]) -> Path:
    info = json.loads(run.dataset.read_text())
    config = json.loads(run.config.read_text())
    best = metrics["best_epoch"]
    lines = [
        f"# Model card: {contract.name} {contract.version}", "",
        (f"Fine-tuned **{contract.architecture}** classifier for {len(contract.labels)} product "
        f"labels, input {contract.input_size} px (centre crop {contract.crop_pct}), "
        f"mean {list(contract.mean)}, std {list(contract.std)}."), "",
        "## Results", "",
        (f"Evaluated on {metrics['evaluated_on']} ({metrics['images']} images, "
        f"{metrics['skipped']} unreadable skipped) through the service's own preprocessing:"), "",
        f"- accuracy **{metrics['accuracy']:.4f}**",
        f"- macro-F1 **{metrics['macro_f1']:.4f}**",
        f"- training wall time {history[-1]['wall_s'] if history else '?'} s", "",
        *selection_lines(metrics["selection"], best), "",
        *calibration_lines(metrics["calibration"], metrics["evaluated_on"]), "",
        *attribute_lines(metrics.get("attributes")),
        "| label | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|",
        *[f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
          for name, m in metrics["per_class"].items()], "",
        "![confusion matrix](confusion_matrix.png)", "", "![training curves](curves.png)", "",
        "![most confident mistakes](worst_mistakes.png)", "",
        "## Data", "",
        f"Validation: {info['val_source']}. Skipped as unreadable: {len(info['skipped'])}.", "",
        "| label | train | val |", "|---|---:|---:|",
        *[f"| {name} | {info['used']['train'].get(name, 0)} | {info['used']['val'].get(name, 0)} |"
          for name in contract.labels], "",
        "## Training history", "",
        "| epoch | phase | train loss | val loss | val acc | val macro-F1 | wall s |",
        "|---:|---|---:|---:|---:|---:|---:|",
        *[f"| {r['epoch']} | {r['phase']} | {r['train_loss'] if r['train_loss'] is not None else ''}"
          + (f" | {r['val_loss']:.3f} | {r['val_acc']:.4f} | {r['val_macro_f1']:.4f}"
             if "val_acc" in r else " | | | ") + f" | {r['wall_s']} |"
          for r in history], "",
        "## Known weak spots", "",
        *([f"- `{Path(m['path']).name}`: {m['true']} predicted as {m['predicted']} "
           f"({m['confidence']:.0%})" for m in mistakes[:5]] or ["- no mistakes on this set"]), "",
        "## Config", "", "```json", json.dumps(config, indent=2), "```", "",
    ]
    path = out / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path
