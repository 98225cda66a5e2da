"""The training recipe's guards: early stopping ends a run that stops improving, class
imbalance weights the loss (and the weights reach the model), and `trainer evaluate --data`
judges a run on another folder with the labels mapped by name."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from trainer.config import TrainConfig
from trainer.data import EvalImages, Sample, Skipped, discover
from trainer.export import run_samples
from trainer.runs import RunDir, load_checkpoint, load_trained
from trainer.train import class_weights, train

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="68719476736")

# Three labels, one of them rare: after the trainer's 15% hold-out, train has 20 / 20 / 5.
IMBALANCED = {"hat": 24, "pants": 24, "shoes": 6}
RARE = "shoes"


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=200)


def said(console: Console) -> str:
    return console.file.getvalue()


def copy_photos(catalog: Path, target: Path, counts: dict[str, int], skip: int = 0) -> Path:
    """target/<label>/ with counts[label] catalog photos of each label, after the first `skip`."""
    for label, count in counts.items():
        (target / label).mkdir(parents=True)
        for photo in sorted((catalog / label).iterdir())[skip:skip + count]:
            shutil.copyfile(photo, target / label / photo.name)
    return target


def trainer_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300, check=False)


# --- early stopping -------------------------------------------------------------------------

def test_early_stopping_ends_the_run_before_its_budget_and_says_so(tiny_folder, tiny_train,
                                                                   tmp_path):
    # With a learning rate of 1e-12 fine-tuning cannot move the weights, so no evaluation can
    # beat the head phase's: with patience 2 the run must stop after epoch 2 of its 6.
    knobs = dict(tiny_train, epochs=6, max_steps_per_epoch=1, lr=1e-12)
    out = tmp_path / "stopped"
    console = quiet_console()
    result = train(TrainConfig(data=tiny_folder, out=out, patience=2, **knobs), console=console)
    output = said(console)
    assert "6 fine-tuning steps = 6 epochs" in output  # the budget it was given
    stop = "after epoch 2 of 6: no better validation macro-F1 for 2 evaluations (patience)"
    assert f"early stop {stop}" in output
    assert json.loads(RunDir(out).selection.read_text())["summary"]["early_stop"] == stop
    history = json.loads(RunDir(out).history.read_text())
    assert [(row["epoch"], row["phase"]) for row in history] == [
        (0, "head"), (1, "finetune"), (2, "finetune")]
    head = history[0]
    for row in history[1:]:
        assert (row["val_macro_f1"], row["val_acc"]) <= (head["val_macro_f1"], head["val_acc"])
    assert result.best == head and load_checkpoint(RunDir(out).best)["metrics"] == head
    assert load_checkpoint(RunDir(out).last)["state"]["epoch"] == 2

    # The count survives a resume (it is read from history): nothing more is trained.
    again = quiet_console()
    train(TrainConfig(out=out, resume=True), console=again)
    assert "2 of 6 fine-tuning epochs done" in said(again)
    assert f"early stop {stop}" in said(again)
    assert json.loads(RunDir(out).history.read_text()) == history

    # The control: the same run with patience for the whole budget trains all 6 epochs.
    control = quiet_console()
    full = train(TrainConfig(data=tiny_folder, out=tmp_path / "full", patience=6, **knobs),
                 console=control)
    assert "early stop after" not in said(control)
    assert "early_stop" not in json.loads(RunDir(tmp_path / "full").selection.read_text())[
        "summary"]
    assert [row["epoch"] for row in full.history] == [0, 1, 2, 3, 4, 5, 6]


# --- class imbalance --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def imbalanced(demo_catalog, tmp_path_factory) -> Path:
    return copy_photos(demo_catalog, tmp_path_factory.mktemp("imbalanced") / "photos",
                       IMBALANCED)


def test_loss_weights_are_inverse_sqrt_frequency_with_mean_one(imbalanced, tiny_folder,
                                                               tmp_path):
    splits = discover(imbalanced)
    labels = [s.label for s in splits.train]
    counts = np.bincount(labels)
    assert counts.max() / counts.min() == 4  # 20 / 20 / 5 after the hold-out

    def weights(balance: str, data: Path = imbalanced, train_labels=labels):
        config = TrainConfig(data=data, out=tmp_path / "run", balance=balance)
        return class_weights(config, train_labels, len(np.unique(train_labels)))

    loss = weights("loss")
    assert loss.dtype == torch.float32 and loss.mean().item() == pytest.approx(1.0)
    expected = counts ** -0.5 / (counts ** -0.5).mean()
    assert np.allclose(loss.numpy(), expected)
    rare = splits.labels.index(RARE)
    # A photo of the label with 4x fewer photos weighs sqrt(4) = 2x as much in the loss.
    assert loss[rare].item() == pytest.approx(2 * loss[0].item())
    assert torch.equal(weights("auto"), loss)  # 4x > 1.5x: auto weights the loss
    assert weights("none") is None and weights("sampler") is None

    tiny = discover(tiny_folder)
    balanced = [s.label for s in tiny.train]
    assert weights("auto", tiny_folder, balanced) is None  # balanced: auto leaves the loss
    assert torch.allclose(weights("loss", tiny_folder, balanced), torch.ones(len(tiny.labels)))


def test_weighted_loss_reaches_the_model(imbalanced, tmp_path):
    """Three head-only runs on the imbalanced set, the same seed: 'loss' and 'auto' train the
    same weighted head, which gives the rare label more probability than the unweighted one."""
    knobs = {"image_size": 64, "epochs": 0, "head_epochs": 30, "batch_size": 8,
             "eval_batch_size": 32, "threads": 2}
    heads, outputs = {}, {}
    for balance in ("loss", "auto", "none"):
        console = quiet_console()
        out = tmp_path / balance
        train(TrainConfig(data=imbalanced, out=out, balance=balance, **knobs), console=console)
        heads[balance] = load_trained(out)
        outputs[balance] = said(console)
    assert "class-weighted loss (1/sqrt(frequency)): imbalance 4.0x" in outputs["loss"]
    assert "class-weighted loss" in outputs["auto"]
    assert "class-weighted loss" not in outputs["none"]

    state = {name: dict(model.head.state_dict()) for name, (model, _, _) in heads.items()}
    for key, value in state["loss"].items():
        assert torch.allclose(value, state["auto"][key], atol=1e-6), key
    assert not all(torch.allclose(value, state["none"][key], atol=1e-4)
                   for key, value in state["loss"].items())

    # Every photo of the set through the service preprocessing: the weighted head puts more
    # probability on the rare label than the unweighted one.
    _, contract, _ = heads["loss"]
    run = RunDir(tmp_path / "loss")
    samples = run_samples(run, "train") + run_samples(run, "val")
    images = EvalImages(samples, contract, Skipped()).tensor
    rare = contract.labels.index(RARE)
    with torch.no_grad():
        rare_prob = {name: torch.softmax(m(images), 1)[:, rare].mean().item()
                     for name, (m, _, _) in heads.items()}
    assert rare_prob["loss"] > rare_prob["none"], rare_prob


# --- trainer evaluate --data --------------------------------------------------------------------

def unseen(tiny_folder: Path) -> int:
    """Catalog photos after this many of each label are not in the tiny run's folder."""
    return max(len(list(folder.iterdir())) for folder in tiny_folder.iterdir())


def test_evaluate_on_another_folder_maps_labels_by_name(tiny_run, tiny_folder, demo_catalog,
                                                        tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export*"))
    own_report = (run / "report" / "metrics.json").read_bytes()
    # Photos the run never saw, of two of its four labels (so indices must be mapped by name:
    # 'shoes' is label 1 of this folder but label 2 of the model).
    other = copy_photos(demo_catalog, tmp_path / "other", {"hat": 2, "shoes": 3},
                        skip=unseen(tiny_folder))
    result = trainer_cli("evaluate", str(run), "--data", str(other))
    assert result.returncode == 0, result.stderr[-3000:]

    report = run / "report-other"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["evaluated_on"] == f"every image in {other}"
    assert metrics["images"] == 5 and metrics["skipped"] == 0
    support = {name: row["support"] for name, row in metrics["per_class"].items()}
    assert support == {"hat": 2, "pants": 0, "shoes": 3, "t-shirt": 0}

    # The same photos through the model here: the report's matrix and accuracy are theirs.
    model, contract, _ = load_trained(run)
    samples = [Sample(p, contract.labels.index(label)) for label in ("hat", "shoes")
               for p in sorted((other / label).iterdir())]
    images = EvalImages(samples, contract, Skipped())
    with torch.no_grad():
        predicted = model(images.tensor).argmax(1).numpy()
    truth = images.labels.numpy()
    expected = np.zeros((4, 4), dtype=int)
    np.add.at(expected, (truth, predicted), 1)
    matrix = json.loads((report / "confusion_matrix.json").read_text())
    assert matrix["labels"] == contract.labels == ["hat", "pants", "shoes", "t-shirt"]
    assert matrix["rows_true_cols_predicted"] == expected.tolist()
    assert metrics["accuracy"] == pytest.approx(float((predicted == truth).mean()))
    shown = " ".join(result.stdout.split())  # the table's title, as rich wrapped it
    assert f"accuracy {metrics['accuracy']:.4f}" in shown and "(5 images)" in shown
    # The run's own report is left as it was.
    assert (run / "report" / "metrics.json").read_bytes() == own_report


def test_evaluate_refuses_a_folder_with_a_label_the_model_does_not_know(tiny_run, tiny_folder,
                                                                        demo_catalog, tmp_path):
    other = copy_photos(demo_catalog, tmp_path / "other", {"hat": 2, "dress": 2},
                        skip=unseen(tiny_folder))
    result = trainer_cli("evaluate", str(tiny_run), "--data", str(other))
    assert result.returncode != 0, result.stdout[-3000:]
    message = " ".join(result.stderr.split())
    assert (f"{other} has labels ['dress', 'hat']; the model knows "
            f"{sorted(p.name for p in tiny_folder.iterdir())}") in message
    assert not (tiny_run / "report-other").exists()
