"""The training loop: a head-only phase on cached features, then fine-tuning, with
validation every epoch, best/last checkpoints and --resume.

Read top to bottom: setup -> data -> model -> head phase -> fine-tuning epochs -> done.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from sklearn.metrics import f1_score
from torch.utils.data import DataLoader, WeightedRandomSampler

from service.contract import ModelContract
from trainer.config import TrainConfig, TrainerError, load_config, save_config
from trainer.data import (
    DatasetSplits,
    EvalImages,
    EvalView,
    Skipped,
    TrainImages,
    class_counts,
    collate_skipping,
    discover,
    imbalance_ratio,
    train_transform,
)
from trainer.models import BACKBONES, Classifier, build_model, set_batchnorm_eval
from trainer.runs import RunDir, atomic_torch_save, atomic_write_json, load_checkpoint

log = logging.getLogger("trainer")


@dataclass
class TrainResult:
    run_dir: Path
    best: dict            # the best epoch's history row
    history: list[dict]
    wall_s: float


def setup_logging(console: Console) -> None:
    if not any(isinstance(h, RichHandler) for h in log.handlers):
        log.addHandler(RichHandler(console=console, show_path=False, show_time=False))
        log.setLevel(logging.INFO)
        log.propagate = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_contract(config: TrainConfig, labels: list[str]) -> ModelContract:
    spec = BACKBONES[config.arch]
    return ModelContract(version=config.out.name, labels=labels, input_size=config.image_size,
                         crop_pct=config.crop_pct or spec.crop_pct, mean=spec.mean, std=spec.std,
                         architecture=config.arch)


def class_weights(config: TrainConfig, labels: list[int], num_classes: int) -> torch.Tensor | None:
    """Loss weights ~ 1/sqrt(frequency), mean 1: rare labels count more without flipping the
    prior so far that accuracy on common labels suffers."""
    counts = class_counts(labels, num_classes).astype(np.float64)
    if config.balance == "none" or config.balance == "sampler":
        return None
    if config.balance == "auto" and imbalance_ratio(counts) <= 1.5:
        return None
    weights = 1.0 / np.sqrt(np.maximum(counts, 1))
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=True)


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor, batch_size: int,
            device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Logits for preprocessed images [N,3,S,S], in eval mode, on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            out.append(model(batch).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.num_classes)


def autocast(device: torch.device):
    # Mixed precision only where it pays: on a GPU. On CPU bf16 is slower on most chips.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda")


def scores(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    predicted = logits.argmax(1)
    return {"val_loss": float(F.cross_entropy(logits, labels)),
            "val_acc": float((predicted == labels).float().mean()),
            "val_macro_f1": float(f1_score(labels.numpy(), predicted.numpy(), average="macro",
                                           labels=list(range(logits.shape[1])),
                                           zero_division=0))}


# --- the head phase: backbone frozen, features computed once -------------------------------

@torch.no_grad()
def extract_features(model: Classifier, batches, total: int, device, channels_last: bool,
                     progress: Progress, description: str) -> torch.Tensor:
    """Pooled backbone features for an iterable of preprocessed batches."""
    model.eval()
    task = progress.add_task(description, total=total, info="")
    feats = []
    for batch in batches:
        batch = batch.to(device)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            feats.append(model.features(batch).float().cpu())
        progress.advance(task, len(batch))
    progress.remove_task(task)
    return torch.cat(feats)


def train_head(model: Classifier, train_feats: torch.Tensor, train_labels: torch.Tensor,
               config: TrainConfig, loss_weights: torch.Tensor | None, device) -> None:
    """Linear head on fixed features: hundreds of tiny steps that take seconds."""
    head = model.head.to(device).train()
    params = [p for p in head.parameters()]
    optimizer = (torch.optim.Adam(params, lr=config.lr) if config.optimizer == "adam" else
                 torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay))
    steps_per_epoch = math.ceil(len(train_feats) / config.batch_size)
    total = max(1, config.head_epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    generator = torch.Generator().manual_seed(config.seed)
    weights = loss_weights.to(device) if loss_weights is not None else None
    for _ in range(config.head_epochs):
        order = torch.randperm(len(train_feats), generator=generator)
        for start in range(0, len(order), config.batch_size):
            idx = order[start:start + config.batch_size]
            logits = head(train_feats[idx].to(device))
            loss = F.cross_entropy(logits, train_labels[idx].to(device), weight=weights,
                                   label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    head.eval()


# --- fine-tuning --------------------------------------------------------------------------

def make_optimizer(model: Classifier, config: TrainConfig) -> torch.optim.Optimizer:
    """Two groups: the backbone at lr * backbone_lr_ratio, the head at lr. Every parameter is
    in a group (frozen ones simply get no gradient), so the state dict shape never changes."""
    head_ids = {id(p) for p in model.head.parameters()}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    groups = [{"params": backbone, "lr": config.lr * config.backbone_lr_ratio},
              {"params": list(model.head.parameters()), "lr": config.lr}]
    if config.optimizer == "adam":
        return torch.optim.Adam(groups)
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def make_schedule(optimizer, config: TrainConfig, steps_per_epoch: int):
    """Linear warm-up then cosine decay to zero over all fine-tuning steps."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup)
                                   / max(1, total - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_loader(train_set: TrainImages, config: TrainConfig, epoch: int) -> DataLoader:
    # A generator seeded per epoch: a resumed run sees the same order as an unbroken one.
    generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    sampler = None
    if config.balance == "sampler":
        counts = class_counts(train_set.labels, max(train_set.labels) + 1)
        per_sample = [1.0 / counts[label] for label in train_set.labels]
        sampler = WeightedRandomSampler(per_sample, len(per_sample), generator=generator)
    return DataLoader(train_set, batch_size=config.batch_size, shuffle=sampler is None,
                      sampler=sampler, generator=generator, num_workers=config.workers,
                      collate_fn=collate_skipping, drop_last=len(train_set) > config.batch_size,
                      persistent_workers=False)


@torch.no_grad()
def update_ema(ema: Classifier, model: Classifier, decay: float) -> None:
    for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        else:
            e.copy_(p)


def train_one_epoch(model: Classifier, loader: DataLoader, optimizer, schedule, config: TrainConfig,
                    device: torch.device, loss_weights: torch.Tensor | None, steps: int,
                    ema: Classifier | None, progress: Progress, description: str) -> dict:
    """At most `steps` optimizer steps over loader; returns the epoch's mean loss and speed."""
    model.train()
    model.freeze_stages(config.frozen_stages)
    if config.freeze_bn:
        set_batchnorm_eval(model)
    weights = loss_weights.to(device) if loss_weights is not None else None
    task = progress.add_task(description, total=steps, info="")
    seen, loss_sum, t0 = 0, 0.0, time.perf_counter()
    for step, batch in enumerate(loader):
        if step >= steps:
            break
        if batch is None:  # every photo of the batch failed to decode
            continue
        images, labels = batch[0].to(device), batch[1].to(device)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, weight=weights,
                               label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if ema is not None:
            update_ema(ema, model, config.ema_decay)
        seen += len(labels)
        loss_sum += loss.item() * len(labels)
        progress.update(task, advance=1, info=f"loss {loss_sum / seen:.3f}  "
                                              f"{seen / (time.perf_counter() - t0):.1f} img/s")
    progress.remove_task(task)
    return {"train_loss": round(loss_sum / max(seen, 1), 4),
            "images_per_s": round(seen / (time.perf_counter() - t0), 1)}


# --- checkpoints ----------------------------------------------------------------------------

@dataclass
class TrainState:
    """Where a run is; plain types only, so checkpoints load with torch.load(weights_only=True)."""
    epoch: int = 0                       # fine-tuning epochs done
    head_done: bool = False
    history: list[dict] = field(default_factory=list)
    best: dict | None = None             # the best row of history
    elapsed: float = 0.0                 # wall seconds of training so far, across resumes

    def epochs_since_best(self) -> int:
        """Fine-tuning epochs after the best one (from history, so early stopping survives a
        resume)."""
        if self.best is None:
            return 0
        last_best = max(i for i, row in enumerate(self.history) if row == self.best)
        return sum(1 for row in self.history[last_best + 1:] if row["phase"] == "finetune")


class Checkpointer:
    """Writes history.json, best.pt (the model to export, with its contract) and last.pt
    (everything --resume needs) after each phase or epoch, atomically."""

    def __init__(self, run: RunDir, config: TrainConfig, contract: ModelContract,
                 console: Console, elapsed_before: float = 0.0):
        self.run, self.config, self.contract, self.console = run, config, contract, console
        self.started = time.perf_counter() - elapsed_before

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def restore(self, model: Classifier, optimizer, schedule,
                ema: Classifier | None) -> TrainState:
        """The state of the run in OUT (its last checkpoint), or a fresh one."""
        if not (self.config.resume and self.run.last.is_file()):
            if self.config.resume:
                self.console.print(f"no checkpoint in {self.run.root} yet: starting from the "
                                   "beginning")
            return TrainState()
        checkpoint = load_checkpoint(self.run.last)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        if ema is not None and checkpoint.get("ema") is not None:
            ema.load_state_dict(checkpoint["ema"])
        state = TrainState(**checkpoint["state"])
        self.started = time.perf_counter() - state.elapsed
        self.console.print(f"[bold green]resumed[/] from {self.run.last}: {state.epoch} of "
                           f"{self.config.epochs} fine-tuning epochs done")
        return state

    def record(self, state: TrainState, row: dict, model: Classifier, eval_model: Classifier,
               optimizer, schedule, ema: Classifier | None) -> bool:
        """Append the row; write best.pt if it is the best so far, then last.pt."""
        row["wall_s"] = round(self.elapsed(), 1)
        state.history.append(row)
        best = state.best
        improved = best is None or (row["val_macro_f1"], row["val_acc"]) > (
            best["val_macro_f1"], best["val_acc"])
        common = {"contract": self.contract.model_dump(),
                  "config": self.config.model_dump(mode="json")}
        if improved:
            state.best = row
            atomic_torch_save({"model": eval_model.state_dict(), "metrics": row, **common},
                              self.run.best)
        state.elapsed = self.elapsed()
        atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "schedule": schedule.state_dict(),
                           "ema": ema.state_dict() if ema is not None else None,
                           "state": asdict(state), **common}, self.run.last)
        atomic_write_json(self.run.history, state.history)
        self.console.print(summary_line(row, improved))
        return improved


def summary_line(row: dict, improved: bool) -> str:
    loss = f"train loss {row['train_loss']:.3f}  " if row.get("train_loss") is not None else ""
    mark = "  [green]* best[/]" if improved else ""
    label = "head" if row["phase"] == "head" else f"epoch {row['epoch']}"
    return (f"{label:>9}: {loss}val loss {row['val_loss']:.3f}  acc {row['val_acc']:.4f}  "
            f"macro-F1 {row['val_macro_f1']:.4f}  {row['images_per_s']:.1f} img/s  "
            f"{row['wall_s']:.0f}s{mark}")


# --- the run ----------------------------------------------------------------------------------

def open_run(config: TrainConfig) -> tuple[TrainConfig, RunDir]:
    """The config to train with (a resumed run's own) and its run folder, config saved."""
    run = RunDir(config.out)
    if config.resume:
        config = load_config(run.root).model_copy(update={"resume": True})
    elif run.last.exists():
        raise TrainerError(f"{run.root} already holds a run; pass --resume to continue it, "
                           "or choose another --out")
    # An absolute data path: `--resume` from another directory still finds the photos.
    config = config.model_copy(update={"data": Path(config.data).resolve()})
    run.root.mkdir(parents=True, exist_ok=True)
    save_config(config, run.root)
    return config, run


def write_dataset_info(run: RunDir, data: Path, splits: DatasetSplits, train_set: TrainImages,
                       val_set: EvalImages, skipped: Skipped) -> None:
    labels = splits.labels
    used = {"train": dict(zip(labels, class_counts(train_set.labels, len(labels)).tolist())),
            "val": dict(zip(labels, class_counts(val_set.labels.tolist(), len(labels)).tolist()))}
    atomic_write_json(run.dataset, {
        "data": str(data),
        "labels": labels, "val_source": splits.val_source, "found": splits.counts(),
        "used": used, "skipped": [{"path": p, "reason": r} for p, r in skipped.files],
        # the exact files used, so evaluate/export judge the model on what it was selected on
        "val_samples": [[str(s.path), s.label] for s in val_set.samples],
        "train_samples": [[str(s.path), s.label] for s in train_set.samples],
    })


@dataclass
class TrainData:
    labels: list[str]
    contract: ModelContract
    train_set: TrainImages
    val_set: EvalImages
    loss_weights: torch.Tensor | None


def load_data(config: TrainConfig, run: RunDir, console: Console) -> TrainData:
    """Discover the splits, decode train into RAM and validation through the contract."""
    splits = discover(config.data, val_fraction=config.val_fraction, seed=config.seed,
                      min_images_per_class=config.min_images_per_class,
                      max_train_images=config.max_train_images,
                      max_val_images=config.max_val_images)
    contract = make_contract(config, splits.labels)
    skipped = Skipped()
    with progress_bar(console) as progress:
        train_set = TrainImages(splits.train, contract, train_transform(config, contract), skipped,
                                cache=config.cache_images, progress=progress)
        val_set = EvalImages(splits.val, contract, skipped, progress=progress)
    if len(val_set) == 0:
        raise TrainerError("no validation image could be decoded")
    write_dataset_info(run, config.data, splits, train_set, val_set, skipped)
    console.print(f"{len(splits.labels)} labels, {len(train_set)} train / {len(val_set)} val "
                  f"images (validation: {splits.val_source}); {len(skipped)} skipped")
    num_classes = len(splits.labels)
    loss_weights = class_weights(config, train_set.labels, num_classes)
    if loss_weights is not None:
        console.print("class-weighted loss (1/sqrt(frequency)): imbalance "
                      f"{imbalance_ratio(class_counts(train_set.labels, num_classes)):.1f}x")
    return TrainData(splits.labels, contract, train_set, val_set, loss_weights)


def head_phase(model: Classifier, data: TrainData, config: TrainConfig, device: torch.device,
               console: Console) -> dict:
    """Train the head on backbone features of the training photos computed once; the row
    for history."""
    if data.train_set.images is None:
        raise TrainerError("the head phase needs cache_images=True (or --head-epochs 0)")
    t0 = time.perf_counter()
    with progress_bar(console) as progress:
        batches = EvalView(data.contract).batches(data.train_set.images, config.eval_batch_size)
        feats = extract_features(model, batches, len(data.train_set), device,
                                 config.channels_last, progress,
                                 "head phase: backbone features of train")
    train_head(model, feats, torch.tensor(data.train_set.labels), config, data.loss_weights,
               device)
    return {"epoch": 0, "phase": "head", "train_loss": None,
            "images_per_s": round(len(data.train_set) / (time.perf_counter() - t0), 1),
            **scores(predict(model, data.val_set.tensor, config.eval_batch_size, device,
                             config.channels_last), data.val_set.labels)}


def train(config: TrainConfig, console: Console | None = None) -> TrainResult:
    console = console or Console()
    setup_logging(console)
    config, run = open_run(config)
    console.rule(f"trainer: {run.root}")
    console.print_json(config.model_dump_json())
    seed_everything(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    data = load_data(config, run, console)

    model = build_model(config.arch, len(data.labels), config.weights).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    steps_per_epoch = len(train_loader(data.train_set, config, 0))
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    schedule = make_schedule(optimizer, config, steps_per_epoch)
    ema = copy.deepcopy(model).eval() if config.ema_decay else None
    checkpointer = Checkpointer(run, config, data.contract, console)
    state = checkpointer.restore(model, optimizer, schedule, ema)

    if config.head_epochs and not state.head_done:
        row = head_phase(model, data, config, device, console)
        if ema is not None:
            ema.load_state_dict(model.state_dict())
        state.head_done = True
        checkpointer.record(state, row, model, model, optimizer, schedule, ema)

    for epoch in range(state.epoch, config.epochs):
        if state.epochs_since_best() >= config.patience:
            console.print(f"early stop: no better validation macro-F1 for {config.patience} "
                          "epochs")
            break
        torch.manual_seed(config.seed * 1000 + epoch)  # augmentation draws: resumable
        with progress_bar(console) as progress:
            metrics = train_one_epoch(model, train_loader(data.train_set, config, epoch),
                                      optimizer, schedule, config, device, data.loss_weights,
                                      steps_per_epoch, ema, progress,
                                      f"epoch {epoch + 1}/{config.epochs}")
        eval_model = ema if ema is not None else model
        row = {"epoch": epoch + 1, "phase": "finetune", **metrics,
               "lr_head": schedule.get_last_lr()[1],
               **scores(predict(eval_model, data.val_set.tensor, config.eval_batch_size, device,
                                config.channels_last), data.val_set.labels)}
        state.epoch = epoch + 1
        checkpointer.record(state, row, model, eval_model, optimizer, schedule, ema)

    best = state.best
    console.rule(f"done in {checkpointer.elapsed() / 60:.1f} min: best epoch {best['epoch']} "
                 f"({best['phase']}) val acc {best['val_acc']:.4f}, macro-F1 "
                 f"{best['val_macro_f1']:.4f}")
    return TrainResult(run.root, best, state.history, checkpointer.elapsed())
