"""Attribute heads (colour, pattern, ...) from the labels in the dataset's manifest.csv.

`collector export` writes one `attr_NAME` column per attribute rule ("unknown" where the
title named no value, or several). After the main training, `fit_attributes` trains one
linear head per attribute on the run's own backbone (the exported model's, shared by every
head): features of the training photos are computed once through the contract's evaluation
preprocessing, as in the head phase, and all heads train together on the sum of their
masked cross-entropies (unknown values add nothing), with per-value weights by the run's
`balance` rule and its optimizer, learning rate, weight decay, label smoothing and
head_epochs. The backbone is fine-tuned by the main label only: the attribute heads cannot
make the category worse. Each head is judged on the validation photos (accuracy, macro-F1,
confusion matrix over the photos whose value is known) and gets its own temperature, fitted
on those photos as the main label's is (`trainer.calibration`; ECE before and after), which
the contract carries so that served attribute scores are calibrated. Everything lands in
best.pt, where `trainer evaluate` and `trainer export` find it; a dataset without `attr_`
columns leaves best.pt exactly as the training wrote it. `head_references` and `check_heads`
are the export's view of the heads: torch's logits and the truth on the validation photos,
and the ONNX outputs' parity with them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from sklearn.metrics import confusion_matrix, f1_score

from service.contract import ONNX_INPUT, ModelContract
from trainer.calibration import calibration_report
from trainer.config import TrainConfig
from trainer.data import EvalImages, Sample, Skipped
from trainer.heads import (
    UNKNOWN_TARGET,
    MultiHead,
    in_features,
    masked_cross_entropy,
    new_head,
    value_weights,
)
from trainer.models import Classifier, build_model
from trainer.runs import RunDir, atomic_torch_save, atomic_write_json, load_checkpoint

MANIFEST_CSV = "manifest.csv"
UNKNOWN = "unknown"
MIN_PER_VALUE = 2        # a value with fewer known training photos is not learnt (-> unknown)
MIN_CALIBRATION_PHOTOS = 10  # a head's temperature needs this many validation photos known


@dataclass
class AttributeTable:
    """file (resolved path) -> {attribute: value} from an export's manifest.csv."""
    names: list[str]
    by_file: dict[str, dict[str, str]]

    def values_of(self, path: Path) -> dict[str, str]:
        return self.by_file.get(str(Path(path).resolve()), {})


def read_attributes(data: Path) -> AttributeTable | None:
    """The attr_NAME columns of DATA/manifest.csv; None when there is no such file or column."""
    path = Path(data) / MANIFEST_CSV
    if not path.is_file():
        return None
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        names = [c.removeprefix("attr_") for c in reader.fieldnames or [] if c.startswith("attr_")]
        if not names:
            return None
        by_file = {str((Path(data) / row["file"]).resolve()):
                   {n: (row[f"attr_{n}"] or UNKNOWN) for n in names} for row in reader}
    return AttributeTable(names, by_file)


def vocabulary(table: AttributeTable, samples: list[Sample]) -> dict[str, list[str]]:
    """attribute -> values learnt (sorted), from the training photos; attributes with fewer
    than two learnable values are left out."""
    out = {}
    for name in table.names:
        counts: dict[str, int] = {}
        for sample in samples:
            value = table.values_of(sample.path).get(name, UNKNOWN)
            if value != UNKNOWN:
                counts[value] = counts.get(value, 0) + 1
        values = sorted(v for v, n in counts.items() if n >= MIN_PER_VALUE)
        if len(values) >= 2:
            out[name] = values
    return out


def targets(table: AttributeTable, samples: list[Sample], name: str,
            values: list[str]) -> np.ndarray:
    """Value index per photo; UNKNOWN_TARGET where unknown or not a learnt value."""
    index = {v: i for i, v in enumerate(values)}
    return np.array([index.get(table.values_of(s.path).get(name, UNKNOWN), UNKNOWN_TARGET)
                     for s in samples], dtype=np.int64)


@torch.no_grad()
def features(model: Classifier, tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model.features(tensor[i:i + batch_size])
                      for i in range(0, len(tensor), batch_size)]) if len(tensor) else \
        torch.empty(0, in_features(model))


def train_heads(feats: torch.Tensor, all_targets: dict[str, np.ndarray],
                vocab: dict[str, list[str]], config: TrainConfig) -> dict[str, torch.nn.Module]:
    """All attribute heads at once on fixed features: the sum of masked, value-weighted
    cross-entropies, the head phase's optimizer and cosine schedule."""
    torch.manual_seed(config.seed)
    heads = {name: new_head(feats.shape[1], len(values), config.dropout)
             for name, values in vocab.items()}
    weights = {name: value_weights(all_targets[name], len(vocab[name]), config.balance)
               for name in vocab}
    params = [p for head in heads.values() for p in head.parameters()]
    optimizer = (torch.optim.Adam(params, lr=config.lr) if config.optimizer == "adam" else
                 torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay))
    epochs = max(1, config.head_epochs)
    total = epochs * math.ceil(len(feats) / config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    generator = torch.Generator().manual_seed(config.seed)
    labels = {name: torch.as_tensor(t) for name, t in all_targets.items()}
    for head in heads.values():
        head.train()
    for _ in range(epochs):
        order = torch.randperm(len(feats), generator=generator)
        for start in range(0, len(order), config.batch_size):
            idx = order[start:start + config.batch_size]
            loss = sum(masked_cross_entropy(heads[name](feats[idx]), labels[name][idx],
                                            weights[name], config.label_smoothing)
                       for name in heads)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return {name: head.eval() for name, head in heads.items()}


def head_metrics(logits: np.ndarray, truth: np.ndarray, values: list[str]) -> dict:
    """Accuracy, macro-F1 and confusion matrix over the photos whose value is known."""
    known = truth >= 0
    predicted = logits.argmax(1)
    classes = list(range(len(values)))
    t, p = truth[known], predicted[known]
    return {"images": int(known.sum()), "unknown": int((~known).sum()),
            "accuracy": float((t == p).mean()) if len(t) else None,
            "macro_f1": float(f1_score(t, p, labels=classes, average="macro", zero_division=0))
            if len(t) else None,
            "majority_baseline": float(np.bincount(t, minlength=len(values)).max() / len(t))
            if len(t) else None,
            "confusion_matrix": confusion_matrix(t, p, labels=classes).tolist() if len(t)
            else []}


def head_calibration(logits: np.ndarray, truth: np.ndarray, calibrate: bool = True) -> dict:
    """One temperature for a head, fitted as the main label's is (trainer.calibration) on the
    validation photos whose value is known, with ECE and NLL before and after on them;
    T = 1 with the reason when there are too few such photos or --no-calibrate."""
    known = truth >= 0
    if not calibrate:
        return {"temperature": 1.0, "fitted_on": "not calibrated (--no-calibrate)"}
    if known.sum() < MIN_CALIBRATION_PHOTOS:
        return {"temperature": 1.0, "images": int(known.sum()),
                "fitted_on": f"not calibrated: {int(known.sum())} validation photos with a "
                             f"known value, fewer than {MIN_CALIBRATION_PHOTOS}"}
    return calibration_report(logits[known], truth[known],
                              f"head logits of the {int(known.sum())} validation photos whose "
                              "value is known")


def calibration_line(calibration: dict) -> str:
    if "ece_before" not in calibration:
        return calibration["fitted_on"]
    return (f"temperature {calibration['temperature']:.3f}: ECE {calibration['ece_before']:.4f}"
            f" -> {calibration['ece_after']:.4f} on the {calibration['images']} photos it was "
            "fitted on")


def _digest(state: dict) -> str:
    sha = hashlib.sha256()
    for key, tensor in state.items():
        sha.update(key.encode())
        sha.update(tensor.detach().cpu().numpy().tobytes())
    return sha.hexdigest()[:16]


def _samples(run: RunDir, split: str) -> list[Sample]:
    info = json.loads(run.dataset.read_text())
    return [Sample(Path(p), label) for p, label in info[f"{split}_samples"]]


def fit_attributes(run_dir: Path, console: Console | None = None) -> dict | None:
    """Train and judge the attribute heads of a finished run; None when its data has no
    attributes. Done again only when best.pt's model changed (a --resume that trained on)."""
    console = console or Console()
    run = RunDir(Path(run_dir))
    config = TrainConfig.model_validate_json(run.config.read_text())
    table = read_attributes(config.data)
    if table is None:
        return None
    checkpoint = load_checkpoint(run.best)
    digest = _digest(checkpoint["model"])
    done = checkpoint.get("attributes")
    if done and done.get("backbone") == digest:
        console.print("attribute heads already trained on this model")
        return done
    contract = ModelContract.model_validate(checkpoint["contract"])
    train_samples, val_samples = _samples(run, "train"), _samples(run, "val")
    vocab = vocabulary(table, train_samples)
    if not vocab:
        console.print(f"attributes {table.names}: fewer than two values with "
                      f"{MIN_PER_VALUE}+ training photos each; no attribute head")
        return None
    t0 = time.perf_counter()
    model = build_model(contract.architecture, len(contract.labels), weights="none")
    model.load_state_dict(checkpoint["model"])
    skipped = Skipped()
    train = EvalImages(train_samples, contract, skipped, description="attribute heads: train")
    val = EvalImages(val_samples, contract, skipped, description="attribute heads: val")
    train_feats = features(model, train.tensor, config.eval_batch_size)
    val_feats = features(model, val.tensor, config.eval_batch_size)
    train_targets = {n: targets(table, train.samples, n, v) for n, v in vocab.items()}
    heads = train_heads(train_feats, train_targets, vocab, config)
    report, temperatures = {}, {}
    with torch.no_grad():
        for name, values in vocab.items():
            truth = targets(table, val.samples, name, values)
            logits = heads[name](val_feats).numpy()
            report[name] = {"values": values,
                            "train_known": int((train_targets[name] >= 0).sum()),
                            "train_per_value": np.bincount(
                                train_targets[name][train_targets[name] >= 0],
                                minlength=len(values)).tolist(),
                            **head_metrics(logits, truth, values),
                            "calibration": head_calibration(logits, truth, config.calibrate)}
            m = report[name]
            temperatures[name] = m["calibration"]["temperature"]
            console.print(f"attribute {name}: {len(values)} values, val accuracy "
                          f"{m['accuracy'] if m['accuracy'] is None else round(m['accuracy'], 4)}"
                          f" on {m['images']} photos with a known value ({m['unknown']} unknown; "
                          f"majority baseline {m['majority_baseline']}); "
                          + calibration_line(m["calibration"]))
    result = {"backbone": digest, "values": vocab,
              "heads": {name: head.state_dict() for name, head in heads.items()},
              "metrics": report, "evaluated_on": "validation photos (the run's own)",
              "wall_s": round(time.perf_counter() - t0, 1)}
    checkpoint["attributes"] = result
    checkpoint["contract"] = contract.model_copy(update={
        "attributes": vocab, "attribute_temperatures": temperatures}).model_dump()
    atomic_torch_save(checkpoint, run.best)
    atomic_write_json(run.root / "attributes.json",
                      {k: v for k, v in result.items() if k != "heads"})
    return result


def load_multihead(checkpoint: dict, model: Classifier) -> MultiHead | None:
    """best.pt's attribute heads around its trained model; None for a single-head run."""
    done = checkpoint.get("attributes")
    if not done:
        return None
    heads = {}
    for name, values in done["values"].items():
        head = new_head(in_features(model), len(values), 0.0)
        head.load_state_dict(done["heads"][name])
        heads[name] = head
    multi = MultiHead(model, heads).eval()
    multi.values = done["values"]
    return multi


@dataclass
class HeadReference:
    """One attribute head on the validation photos: what torch computes and the truth."""
    output: str                 # the ONNX output, attr_NAME
    truth: np.ndarray           # value index per photo, UNKNOWN_TARGET where unknown
    torch_logits: np.ndarray    # [photos, values]

    @property
    def known(self) -> np.ndarray:
        return self.truth >= 0

    def accuracy(self, logits: np.ndarray) -> float | None:
        """Accuracy over the photos whose value is known (None: there are none)."""
        known = self.known
        return float((logits[known].argmax(1) == self.truth[known]).mean()) if known.any() \
            else None


def head_references(multi: MultiHead, images: np.ndarray, samples: list[Sample],
                    run: RunDir) -> dict[str, HeadReference]:
    """Every attribute head's torch logits and truth on the validation photos, what the export's
    parity check (`check_heads`) and accuracy gate (`trainer.variants`) judge the ONNX outputs
    against."""
    config = TrainConfig.model_validate_json(run.config.read_text())
    table = read_attributes(config.data)
    with torch.no_grad():
        theirs = [torch.cat(parts).numpy() for parts in zip(*(
            multi(torch.from_numpy(images[i:i + 32]))[1:] for i in range(0, len(images), 32)))]
    return {name: HeadReference(
                output, (np.full(len(samples), UNKNOWN_TARGET) if table is None  # data moved
                         else targets(table, samples, name, multi.values[name])), reference)
            for name, output, reference in zip(multi.names, multi.output_names[1:], theirs)}


def check_heads(references: dict[str, HeadReference], sess, images: np.ndarray,
                tolerance: float, parity_images: int, console: Console) -> dict:
    """Every attribute output of the ONNX session against torch on the validation photos:
    max |logit diff| and identical top-1 on the parity photos, equal accuracy over the photos
    whose value is known. Raises the export's ParityError on any difference."""
    from trainer.onnx_graph import ParityError

    names = [head.output for head in references.values()]
    ours = [np.concatenate(parts) for parts in zip(*(
        sess.run(names, {ONNX_INPUT: images[i:i + 32]}) for i in range(0, len(images), 32)))]
    report = {}
    for (name, ref), mine in zip(references.items(), ours):
        reference = ref.torch_logits
        head = {"output": ref.output,
                "max_abs_logit_diff": float(np.abs(mine[:parity_images]
                                                   - reference[:parity_images]).max()),
                "top1_identical": bool((mine[:parity_images].argmax(1)
                                        == reference[:parity_images].argmax(1)).all()),
                "val_known": int(ref.known.sum()),
                "val_acc_torch": ref.accuracy(reference),
                "val_acc_onnx": ref.accuracy(mine)}
        report[name] = head
        console.print(f"parity of {ref.output}: max |logit diff| "
                      f"{head['max_abs_logit_diff']:.2e}, top-1 identical: "
                      f"{head['top1_identical']}; val accuracy torch {head['val_acc_torch']} "
                      f"onnx {head['val_acc_onnx']} ({head['val_known']} photos with a known "
                      "value)")
        if (head["max_abs_logit_diff"] > tolerance or not head["top1_identical"]
                or head["val_acc_onnx"] != head["val_acc_torch"]):
            raise ParityError(f"ONNX output {ref.output} disagrees with torch: {head}")
    return report
