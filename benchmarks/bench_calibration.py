"""`make bench-calibration`: does the linear probe's temperature, fitted on out-of-fold logits,
hold for the probe refit on all of train+val, which is what gets exported when the
cross-validation picks the probe? Held-out ECE with T as fitted, and with T carried to the
refit (`trainer.calibration.carry_to_refit`: scaled by how much wider the refit's logits spread
than the fold probes' on the same photos), side by side.

Only the probe is trained, on frozen Lite0 features computed once per set (seconds), so many
sets fit in a few minutes: the small subsets and the demo catalogue of `make bench-train`, with
its photo folders and held-out photos. `make bench-train` measures the whole default recipe
(`heldout_ece_out_of_fold_t` beside `heldout_ece_after` where the probe was chosen; a
fine-tuned refit keeps T as fitted).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field
from pydantic_settings import CliApp
from rich.console import Console
from rich.table import Table
from sklearn.model_selection import StratifiedKFold

from benchmarks.bench_train import SUBSETS, heldout_folder, make_demo, make_subset
from benchmarks.datasets import CLOTHING_SMALL, require
from trainer.calibration import (
    carry_to_refit,
    ece_of_a_calibrated_model,
    expected_calibration_error,
    fit_temperature,
    logit_spread,
    probabilities,
)
from trainer.config import TrainConfig
from trainer.data import EvalImages, Sample, Skipped, discover
from trainer.train import extract_features, make_contract, new_model, progress_bar, train_head


class BenchCalibration(BaseModel):
    """The probe's out-of-fold temperature on its refit: held-out ECE as fitted vs carried."""

    data: Path = Field(CLOTHING_SMALL, description="clothing-small: train/ and validation/")
    out: Path = Field(Path("bench_out/calibration"), description="photo folders, bench.json")
    sets: list[str] = Field(["demo", "3x80", "10x30"], description=(
        "demo (the catalogue, held out: the rest of clothing-small) | 3x80 | 10x30"))
    seeds: int = Field(3, ge=1, description="seeds per set: 0 .. seeds - 1")
    overrides: dict = Field({}, description="TrainConfig knobs, as JSON (default: the defaults)")

    def cli_cmd(self) -> None:
        run_bench(self)


def photos(samples: list[Sample], config: TrainConfig, labels: list[str],
           console: Console) -> tuple[torch.Tensor, np.ndarray]:
    """Frozen backbone features of the photos, and their labels."""
    images = EvalImages(samples, make_contract(config, labels), Skipped())
    model = new_model(config, len(labels), torch.device("cpu"))
    with progress_bar(console) as progress:
        feats = extract_features(model, images.tensor.split(config.eval_batch_size),
                                 len(images), torch.device("cpu"), config.channels_last,
                                 progress, "backbone features")
    return feats, images.labels.numpy()


def probe(config: TrainConfig, feats: torch.Tensor, labels: np.ndarray, num_classes: int):
    """A linear probe trained as the trainer trains it; returns its logits function."""
    model = new_model(config, num_classes, torch.device("cpu"))
    train_head(model, feats, torch.as_tensor(labels), config, None, torch.device("cpu"))
    return lambda x: model.head(x).detach().numpy()


def one_set(folder: Path, bench: BenchCalibration, console: Console) -> dict:
    config = TrainConfig(data=folder, out=bench.out / "unused", **bench.overrides)
    splits = discover(folder, seed=config.seed)
    labels = splits.labels
    heldout = [Sample(p, labels.index(p.parent.name))
               for p in sorted(heldout_folder(folder).glob("*/*.jpg"))]
    pool_feats, pool_labels = photos(list(splits.train) + list(splits.val), config, labels,
                                     console)
    held_feats, held_labels = photos(heldout, config, labels, console)
    # The folds of trainer.train.cross_validate: same splitter, same seed.
    splitter = StratifiedKFold(min(config.cv_folds, int(np.bincount(pool_labels).min())),
                               shuffle=True, random_state=config.seed)
    oof, fold_spreads = np.zeros((len(pool_labels), len(labels))), []
    for fit_idx, held_idx in splitter.split(np.zeros(len(pool_labels)), pool_labels):
        logits = probe(config, pool_feats[fit_idx], pool_labels[fit_idx], len(labels))
        oof[held_idx] = logits(pool_feats[held_idx])
        fold_spreads.append(logit_spread(logits(pool_feats)))
    refit = probe(config, pool_feats, pool_labels, len(labels))
    fitted = {"temperature": fit_temperature(oof, pool_labels)}
    carried = carry_to_refit(fitted, statistics.mean(fold_spreads),
                             logit_spread(refit(pool_feats)))
    held = refit(held_feats)

    def ece(temperature: float) -> float:
        return round(expected_calibration_error(probabilities(held, temperature), held_labels),
                     4)
    return {"train_val_photos": len(pool_labels), "heldout_photos": len(held_labels),
            "heldout_acc": round(float((held.argmax(1) == held_labels).mean()), 4),
            "temperature_out_of_fold": round(fitted["temperature"], 4),
            "refit_logit_scale": carried["refit_logit_scale"],
            "heldout_ece_uncalibrated": ece(1.0),
            "heldout_ece_out_of_fold_t": ece(fitted["temperature"]),
            "heldout_ece_carried_t": ece(carried["temperature"]),
            "heldout_ece_floor": round(ece_of_a_calibrated_model(
                probabilities(held, carried["temperature"])), 4),
            "heldout_best_t": round(fit_temperature(held, held_labels), 4)}


def run_bench(bench: BenchCalibration) -> dict:
    console = Console()
    source = require(bench.data)
    rows = []
    for name in bench.sets:
        for seed in range(bench.seeds):
            folder = bench.out / "data" / f"{name}-seed{seed}"
            if name == "demo":
                make_demo(folder, seed, source=source)
            else:
                make_subset(source, folder, *SUBSETS[name], seed)
            console.rule(f"bench-calibration: {name} seed {seed}")
            rows.append({"set": name, "seed": seed, **one_set(folder, bench, console)})
            bench.out.mkdir(parents=True, exist_ok=True)
            (bench.out / "bench.json").write_text(json.dumps({"rows": rows}, indent=2))
    table = Table(title="the probe refit on train+val: held-out ECE with the out-of-fold T, "
                        "as fitted and carried")
    for column in ("set", "seed", "held-out photos", "acc", "T out of fold", "x refit scale",
                   "best T (held-out)", "ECE: T = 1", "as fitted", "carried", "floor"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["set"], str(r["seed"]), str(r["heldout_photos"]), f"{r['heldout_acc']:.4f}",
                      f"{r['temperature_out_of_fold']:.3f}", f"{r['refit_logit_scale']:.3f}",
                      f"{r['heldout_best_t']:.3f}", f"{r['heldout_ece_uncalibrated']:.4f}",
                      f"{r['heldout_ece_out_of_fold_t']:.4f}",
                      f"{r['heldout_ece_carried_t']:.4f}", f"{r['heldout_ece_floor']:.4f}")
    console.print(table)
    for key, what in (("heldout_ece_out_of_fold_t", "as fitted"),
                      ("heldout_ece_carried_t", "carried")):
        values = [r[key] for r in rows]
        console.print(f"T {what}: held-out ECE mean {statistics.mean(values):.4f}, worst "
                      f"{max(values):.4f}, above 0.03 on {sum(v > 0.03 for v in values)} of "
                      f"{len(values)} sets")
    return {"rows": rows}


if __name__ == "__main__":
    CliApp.run(BenchCalibration)
