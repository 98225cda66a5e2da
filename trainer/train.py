"""The training loop: a head-only phase on cached features, then fine-tuning, with
validation every epoch, best/last checkpoints and --resume.

Read top to bottom: setup -> data -> model -> head phase -> fine-tuning epochs -> done.
"""

from __future__ import annotations

import copy
import json
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
from torch.utils.data import DataLoader, Sampler

from service.contract import ModelContract
from trainer import distributed
from trainer.calibration import calibration_report, carry_to_refit, logit_spread
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
    loss_weights,
    train_transform,
)
from trainer.distributed import Processes, barrier, shard, wrap
from trainer.models import BACKBONES, Classifier, build_model, set_batchnorm_eval
from trainer.runs import RunDir, atomic_torch_save, atomic_write_json, load_checkpoint

log = logging.getLogger("trainer")


@dataclass
class TrainResult:
    run_dir: Path
    best: dict            # the best epoch's history row
    history: list[dict]
    wall_s: float
    selection: dict = field(default_factory=dict)    # how the model was chosen (Selection)
    calibration: dict = field(default_factory=dict)  # temperature, ECE before/after


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
    return ModelContract(version=config.out.name, labels=labels,
                         input_size=config.image_size or spec.image_size,
                         crop_pct=config.crop_pct or spec.crop_pct, mean=spec.mean, std=spec.std,
                         architecture=config.arch)


def class_weights(config: TrainConfig, labels: list[int], num_classes: int) -> torch.Tensor | None:
    return loss_weights(class_counts(labels, num_classes), config.balance)


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


@dataclass(frozen=True)
class Plan:
    """The fine-tuning schedule in optimizer steps, cut into epochs (passes over train)."""
    steps: int
    steps_per_epoch: int
    eval_every: int        # epochs between evaluations / checkpoints

    @property
    def epochs(self) -> int:
        return math.ceil(self.steps / self.steps_per_epoch)

    def steps_in(self, epoch: int) -> int:
        """The last epoch is cut short so the run ends on the budget exactly."""
        return min(self.steps_per_epoch, self.steps - epoch * self.steps_per_epoch)

    def evaluates_after(self, epoch: int) -> bool:
        return (epoch + 1) % self.eval_every == 0 or epoch + 1 == self.epochs

    def describe(self, images: int) -> str:
        return (f"{self.steps} fine-tuning steps = {self.epochs} epochs of {self.steps_per_epoch}"
                f" steps over {images} photos, validated every {self.eval_every} epoch(s)")


def plan_schedule(config: TrainConfig, train_images: int) -> Plan:
    """Steps from --epochs (fixed), --steps, or the default budget: budget_epochs passes,
    clamped to [min_steps, max_steps], so 250 photos get enough updates and 30,000 photos
    do not take hours."""
    per_epoch = max(1, train_images // config.batch_size) if train_images > config.batch_size \
        else 1
    if config.max_steps_per_epoch:
        per_epoch = min(per_epoch, config.max_steps_per_epoch)
    if config.epochs is not None:
        steps = config.epochs * per_epoch
    elif config.steps is not None:
        steps = config.steps
    else:
        steps = min(max(round(config.budget_epochs * per_epoch), config.min_steps),
                    config.max_steps)
    epochs = math.ceil(steps / per_epoch)
    return Plan(steps, per_epoch, max(1, round(epochs / config.evaluations)))


def make_schedule(optimizer, config: TrainConfig, total_steps: int):
    """Linear warm-up over warmup_fraction of the steps, then cosine decay to zero at the
    last step: both follow the step budget."""
    total = max(1, total_steps)
    warmup = round(config.warmup_fraction * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup)
                                   / max(1, total - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EpochBatches(Sampler):
    """The epoch's global batches of `batch_size` photo indices, and this process's slice of
    each (all of it on one process). Seeded per epoch: a resumed run sees the same order as an
    unbroken one, and every process cuts the same global batches."""

    def __init__(self, labels: list[int], config: TrainConfig, epoch: int,
                 processes: Processes):
        self.labels, self.config, self.epoch, self.processes = labels, config, epoch, processes

    def _global_batches(self) -> list[list[int]]:
        n, size = len(self.labels), self.config.batch_size
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + self.epoch)
        if self.config.balance == "sampler":
            counts = class_counts(self.labels, max(self.labels) + 1)
            per_sample = torch.tensor([1.0 / counts[label] for label in self.labels])
            order = torch.multinomial(per_sample, n, replacement=True, generator=generator)
        else:
            order = torch.randperm(n, generator=generator)
        order = order.tolist()
        batches = [order[i:i + size] for i in range(0, n, size)]
        if n > size and len(batches[-1]) < size:
            batches.pop()  # a last, smaller batch gives one noisy step
        return batches

    def __iter__(self):
        return (shard(batch, self.processes) for batch in self._global_batches())

    def __len__(self) -> int:
        return len(self._global_batches())


def train_loader(train_set: TrainImages, config: TrainConfig, epoch: int,
                 processes: Processes | None = None) -> DataLoader:
    processes = processes or Processes()
    return DataLoader(train_set, batch_sampler=EpochBatches(train_set.labels, config, epoch,
                                                            processes),
                      num_workers=config.workers, collate_fn=collate_skipping,
                      persistent_workers=False)


def seed_epoch(config: TrainConfig, epoch: int, processes: Processes) -> None:
    # Augmentation and dropout draws: resumable; each process draws its own.
    torch.manual_seed(config.seed * 1000 + epoch + 7919 * processes.rank)


def ema_decay(config: TrainConfig, steps: int) -> float:
    """Per-step decay of the weight average: it spans about ema_horizon of the steps, so a
    200-step run and a 720-step one average the same share of their schedule (a fixed 0.995
    would span all of the first and a quarter of the second)."""
    return 1 - 1 / max(1.0, config.ema_horizon * steps)


@torch.no_grad()
def update_ema(ema: Classifier, model: Classifier, decay: float) -> None:
    for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        else:
            e.copy_(p)


def train_one_epoch(model: Classifier, loader: DataLoader, optimizer, schedule, config: TrainConfig,
                    device: torch.device, loss_weights: torch.Tensor | None, steps: int,
                    ema: Classifier | None, decay: float, progress: Progress,
                    description: str, net: torch.nn.Module | None = None) -> dict:
    """At most `steps` optimizer steps over loader; returns the epoch's mean loss and speed.
    `net` runs the forward pass: model itself, or its DistributedDataParallel wrapper."""
    net = net or model
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
            logits = net(images)
        loss = F.cross_entropy(logits.float(), labels, weight=weights,
                               label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if ema is not None:
            update_ema(ema, model, decay)
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

    def evals_since_best(self) -> int:
        """Fine-tuning evaluations after the best one (from history, so early stopping
        survives a resume)."""
        if self.best is None:
            return 0
        last_best = max(i for i, row in enumerate(self.history) if row == self.best)
        return sum(1 for row in self.history[last_best + 1:] if row["phase"] == "finetune")


class Checkpointer:
    """Writes history.json, best.pt (the model to export, with its contract) and last.pt
    (everything --resume needs) after each phase or epoch, atomically."""

    def __init__(self, run: RunDir, config: TrainConfig, contract: ModelContract,
                 console: Console, elapsed_before: float = 0.0, writes: bool = True):
        self.run, self.config, self.contract, self.console = run, config, contract, console
        self.started = time.perf_counter() - elapsed_before
        self.writes = writes  # rank 0 only when several processes train

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def restore(self, model: Classifier, optimizer, schedule, ema: Classifier | None,
                plan: Plan) -> TrainState:
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
                           f"{plan.epochs} fine-tuning epochs done")
        return state

    def record(self, state: TrainState, row: dict, model: Classifier, eval_model: Classifier,
               optimizer, schedule, ema: Classifier | None) -> bool:
        """Append the row; write best.pt if it is the best so far (without validation: the
        latest, the schedule being fixed), then last.pt."""
        row["wall_s"] = round(self.elapsed(), 1)
        state.history.append(row)
        best = state.best
        improved = best is None or "val_acc" not in row or (
            row["val_macro_f1"], row["val_acc"]) > (best["val_macro_f1"], best["val_acc"])
        common = {"contract": self.contract.model_dump(),
                  "config": self.config.model_dump(mode="json")}
        if improved:
            state.best = row
        state.elapsed = self.elapsed()
        if not self.writes:
            return improved
        if improved:
            atomic_torch_save({"model": eval_model.state_dict(), "metrics": row, **common},
                              self.run.best)
        atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "schedule": schedule.state_dict(),
                           "ema": ema.state_dict() if ema is not None else None,
                           "state": asdict(state), **common}, self.run.last)
        atomic_write_json(self.run.history, state.history)
        self.console.print(summary_line(row, improved))
        return improved


def summary_line(row: dict, improved: bool) -> str:
    loss = f"train loss {row['train_loss']:.3f}  " if row.get("train_loss") is not None else ""
    val = (f"val loss {row['val_loss']:.3f}  acc {row['val_acc']:.4f}  macro-F1 "
           f"{row['val_macro_f1']:.4f}  " if "val_acc" in row else "")
    mark = "  [green]* best[/]" if improved and val else ""
    label = "head" if row["phase"] == "head" else f"epoch {row['epoch']}"
    return f"{label:>9}: {loss}{val}{row['images_per_s']:.1f} img/s  {row['wall_s']:.0f}s{mark}"


# --- the run folder and its data --------------------------------------------------------------

def open_run(config: TrainConfig, processes: Processes) -> tuple[TrainConfig, RunDir]:
    """The config to train with (a resumed run's own) and its run folder, config saved."""
    run = RunDir(config.out)
    if config.resume:
        config = load_config(run.root).model_copy(update={"resume": True})
    elif run.last.exists():
        raise TrainerError(f"{run.root} already holds a run; pass --resume to continue it, "
                           "or choose another --out")
    # An absolute data path: `--resume` from another directory still finds the photos.
    config = config.model_copy(update={"data": Path(config.data).resolve()})
    barrier()  # every process has looked before rank 0 writes
    if processes.main:
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
    val_set: EvalImages | None        # None: a refit on train+val
    loss_weights: torch.Tensor | None


def load_data(config: TrainConfig, run: RunDir, console: Console,
              processes: Processes) -> TrainData:
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
    if processes.main:
        write_dataset_info(run, config.data, splits, train_set, val_set, skipped)
    console.print(f"{len(splits.labels)} labels, {len(train_set)} train / {len(val_set)} val "
                  f"images (validation: {splits.val_source}); {len(skipped)} skipped")
    num_classes = len(splits.labels)
    loss_weights = class_weights(config, train_set.labels, num_classes)
    if loss_weights is not None:
        console.print("class-weighted loss (1/sqrt(frequency)): imbalance "
                      f"{imbalance_ratio(class_counts(train_set.labels, num_classes)):.1f}x")
    return TrainData(splits.labels, contract, train_set, val_set, loss_weights)


def val_scores(model: Classifier, data: TrainData, config: TrainConfig,
               device: torch.device) -> dict:
    """Validation loss/accuracy/macro-F1 of model, or nothing when the run has no validation
    (a refit on train+val)."""
    if data.val_set is None:
        return {}
    return scores(predict(model, data.val_set.tensor, config.eval_batch_size, device,
                          config.channels_last), data.val_set.labels)


def head_phase(model: Classifier, data: TrainData, config: TrainConfig, device: torch.device,
               console: Console, feats: torch.Tensor | None = None) -> dict:
    """Train the head on backbone features of the training photos computed once (or given:
    a refit's are cross-validation's, the features its fold probes trained on); the row for
    history."""
    t0 = time.perf_counter()
    if feats is None:
        if data.train_set.images is None:
            raise TrainerError("the head phase needs cache_images=True (or --head-epochs 0)")
        with progress_bar(console) as progress:
            batches = EvalView(data.contract).batches(data.train_set.images,
                                                      config.eval_batch_size)
            feats = extract_features(model, batches, len(data.train_set), device,
                                     config.channels_last, progress,
                                     "head phase: backbone features of train")
    train_head(model, feats, torch.tensor(data.train_set.labels), config, data.loss_weights,
               device)
    return {"epoch": 0, "phase": "head", "train_loss": None,
            "images_per_s": round(len(data.train_set) / (time.perf_counter() - t0), 1),
            **val_scores(model, data, config, device)}


def new_model(config: TrainConfig, num_classes: int, device: torch.device) -> Classifier:
    torch.manual_seed(config.seed)  # the same head initialisation in every fold and refit
    model = build_model(config.arch, num_classes, config.weights,
                        dropout=config.dropout).to(device)
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


def fine_tune_fold(model: Classifier, train_set: TrainImages, plan: Plan, config: TrainConfig,
                   device: torch.device, loss_weights, console: Console, name: str,
                   processes: Processes) -> None:
    """The fixed schedule on one fold, start to end: no evaluation, no checkpoints."""
    optimizer = make_optimizer(model, config)
    schedule = make_schedule(optimizer, config, plan.steps)
    model.freeze_stages(config.frozen_stages)
    net = wrap(model, processes, device)
    ema = copy.deepcopy(model).eval() if config.ema_horizon else None
    for epoch in range(plan.epochs):
        seed_epoch(config, epoch, processes)
        with progress_bar(console) as progress:
            train_one_epoch(model, train_loader(train_set, config, epoch, processes), optimizer,
                            schedule, config, device, loss_weights, plan.steps_in(epoch), ema,
                            ema_decay(config, plan.steps), progress,
                            f"{name}: epoch {epoch + 1}/{plan.epochs}", net)
    if ema is not None:  # the folds score what a refit exports: the average
        model.load_state_dict(ema.state_dict())


# --- model selection on a small validation split --------------------------------------------

# Cross-validation candidates, simplest first. Fine-tuning is the recipe: the others replace
# it only with a lead that resamples of the out-of-fold photos confirm (`decide`).
CANDIDATES = {"probe": "linear probe", "wise": "WiSE-FT average", "finetune": "fine-tuned"}
RESAMPLES = 2000


def average_weights(start: dict, tuned: dict, alpha: float) -> dict:
    """WiSE-FT: (1 - alpha) * start + alpha * tuned for every float tensor (integer counters
    stay tuned's). Frozen stages and frozen BatchNorm statistics are the same in both."""
    return {name: torch.lerp(start[name].to(value.dtype), value, alpha)
            if value.is_floating_point() else value for name, value in tuned.items()}


def weights_copy(model: Classifier) -> dict:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@dataclass
class Selection:
    """How the exported model was chosen; saved as selection.json and in best.pt."""
    mode: str                          # "val" or "cv"
    reason: str
    finetune: bool = True              # False: the linear probe won (head phase only)
    wise_alpha: float | None = None    # set: the fine-tuned weights averaged with the head's
    folds: list[dict] = field(default_factory=list)
    oof: dict | None = None            # out-of-fold logits of every candidate, per photo
    summary: dict = field(default_factory=dict)


def choose_selection(config: TrainConfig, train_images: int, val_images: int) -> Selection:
    fine_tunes = config.epochs != 0
    if not fine_tunes:
        return Selection("val", "--epochs 0: the linear probe alone, nothing to choose",
                         finetune=False)
    pool = train_images + val_images
    if config.selection == "val" or (config.selection == "auto" and (
            val_images >= config.small_val or pool > config.cv_max_images)):
        why = ("--selection val" if config.selection == "val" else
               f"{val_images} validation photos (>= {config.small_val})"
               if val_images >= config.small_val else
               f"train+val has {pool} photos (> {config.cv_max_images}: cross-validation "
               "would cost too much)")
        return Selection("val", f"{why}: best evaluation on validation, early stopping")
    why = ("--selection cv" if config.selection == "cv" else
           f"only {val_images} validation photos (< {config.small_val}): one number that noisy "
           "cannot tell epochs, or fine-tuning from the probe, apart")
    return Selection("cv", f"{why}: {config.cv_folds}-fold cross-validation on train+val of "
                           "the fixed schedule vs the linear probe, winner refit on train+val")


def pooled(data: TrainData, config: TrainConfig, console: Console) -> TrainData:
    """Train+val as one training set (validation photos decoded the training way too)."""
    with progress_bar(console) as progress:
        val_train = TrainImages(data.val_set.samples, data.contract,
                                data.train_set.transform, Skipped(), cache=config.cache_images,
                                progress=progress)
    pool = data.train_set.joined(val_train)
    return TrainData(data.labels, data.contract, pool, None,
                     class_weights(config, pool.labels, len(data.labels)))


def cross_validate(selection: Selection, pool: TrainData, config: TrainConfig,
                   device: torch.device, console: Console, run: RunDir,
                   processes: Processes) -> tuple[Selection, torch.Tensor]:
    """k stratified folds of train+val: on each, the linear probe and the fixed fine-tuning
    schedule (head phase, then the step budget) train on k-1 folds and predict the held-out
    one. Every photo is then predicted once by each candidate, by a model that never saw it:
    281 out-of-fold predictions instead of 32 validation ones. Folds already done (in
    selection.json) are not redone on --resume. Returns the choice and the backbone features
    of train+val (what the refit's head phase trains on)."""
    from sklearn.model_selection import StratifiedKFold

    done = json.loads(run.selection.read_text()) if run.selection.is_file() else {}
    folds = done.get("folds", []) if done.get("mode") == "cv" else []
    labels = np.asarray(pool.train_set.labels)
    num_classes = len(pool.labels)
    n_splits = min(config.cv_folds, int(np.bincount(labels).min()))
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=config.seed)
    with progress_bar(console) as progress:
        evaluated = EvalImages(pool.train_set.samples, pool.contract, Skipped(),
                               progress=progress, description="cross-validation photos")
    if len(evaluated) != len(labels):
        raise TrainerError("a photo decoded for training but not for evaluation")
    probe_model = new_model(config, num_classes, device)
    with progress_bar(console) as progress:
        feats = extract_features(probe_model, evaluated.tensor.split(config.eval_batch_size),
                                 len(evaluated), device, config.channels_last, progress,
                                 "cross-validation: backbone features")
    oof = {name: np.zeros((len(labels), num_classes)) for name in CANDIDATES
           if name != "wise" or config.wise_alpha}
    for k, (fit_idx, held_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold = TrainData(pool.labels, pool.contract, pool.train_set.subset(fit_idx), None,
                         class_weights(config, labels[fit_idx].tolist(), num_classes))
        plan = plan_schedule(config, len(fit_idx))
        if k < len(folds):  # done before a --resume
            for name, logits in folds[k]["logits"].items():
                oof[name][held_idx] = np.asarray(logits)
            continue
        t0 = time.perf_counter()
        model = new_model(config, num_classes, device)
        train_head(model, feats[fit_idx], torch.as_tensor(labels[fit_idx]), config,
                   fold.loss_weights, device)
        # The probe (a head on cached features: free) predicts all of train+val: the held-out
        # fold is its out-of-fold prediction, and the spread of all its logits is what the
        # refit probe's is compared with in finalise.
        probe_everywhere = model.head(feats.to(device)).detach().float().cpu().numpy()
        logits = {"probe": probe_everywhere[held_idx]}
        held = evaluated.tensor[held_idx]
        start = weights_copy(model) if config.wise_alpha else None
        fine_tune_fold(model, fold.train_set, plan, config, device, fold.loss_weights, console,
                       f"fold {k + 1}/{n_splits}", processes)
        logits["finetune"] = predict(model, held, config.eval_batch_size, device,
                                     config.channels_last).numpy()
        if start is not None:
            model.load_state_dict(average_weights(start, model.state_dict(), config.wise_alpha))
            logits["wise"] = predict(model, held, config.eval_batch_size, device,
                                     config.channels_last).numpy()
        for name, lg in logits.items():
            oof[name][held_idx] = lg
        row = {"fold": k + 1, "images": len(held_idx), "train_images": len(fit_idx),
               "steps": plan.steps, "wall_s": round(time.perf_counter() - t0, 1),
               **{f"{name}_acc": round(float((lg.argmax(1) == labels[held_idx]).mean()), 4)
                  for name, lg in logits.items()},
               "probe_logit_spread": round(logit_spread(probe_everywhere), 4),
               "logits": {name: lg.round(4).tolist() for name, lg in logits.items()}}
        folds.append(row)
        console.print(f"fold {k + 1}/{n_splits}: " + ", ".join(
            f"{CANDIDATES[name]} {row[f'{name}_acc']:.4f}" for name in logits)
            + f" on {len(held_idx)} held-out photos ({row['wall_s']:.0f}s)")
        if processes.main:
            atomic_write_json(run.selection, {"mode": "cv", "folds": folds})
    return decide(selection, folds, oof, labels, evaluated.samples, num_classes,
                  config.wise_alpha, config.cv_confidence), feats


def macro_f1_resampled(labels: np.ndarray, predicted: np.ndarray, resamples: np.ndarray,
                       num_classes: int) -> np.ndarray:
    """Macro-F1 on each bootstrap resample (a row of photo indices), as sklearn's f1_score with
    every label counted and zero_division=0."""
    truth, guess = labels[resamples], predicted[resamples]
    per_class = []
    for c in range(num_classes):
        tp = ((truth == c) & (guess == c)).sum(1)
        wrong = ((truth == c) != (guess == c)).sum(1)  # false positives + false negatives
        per_class.append(2 * tp / np.maximum(2 * tp + wrong, 1))
    return np.mean(per_class, axis=0)


def decide(selection: Selection, folds: list[dict], oof: dict, labels: np.ndarray, samples,
           num_classes: int, wise_alpha: float | None = None,
           confidence: float = 0.95) -> Selection:
    """Fine-tuned, unless a simpler candidate (the probe, the WiSE-FT average) has the best
    out-of-fold macro-F1 (then accuracy) and keeps that lead over fine-tuning in at least
    `confidence` of bootstrap resamples of the photos. On a few hundred photos a lead of a few
    is noise (one photo of 240 is 0.4 points), and there fine-tuning is the better bet: on
    the benchmark splits where the probe led by 1-3 photos, the fine-tuned refit scored +0.85
    points over the probe refit held out, on average (BENCHMARKS.md)."""
    summary = {}
    for name, logits in oof.items():
        predicted = logits.argmax(1)
        summary[name] = {"acc": round(float((predicted == labels).mean()), 4),
                         "macro_f1": round(float(f1_score(labels, predicted, average="macro",
                                                          labels=list(range(num_classes)),
                                                          zero_division=0)), 4)}
    names = [name for name in CANDIDATES if name in oof]
    best = max(names, key=lambda name: (summary[name]["macro_f1"], summary[name]["acc"],
                                        -names.index(name)))
    scores = " vs ".join(f"{CANDIDATES[name]} acc {summary[name]['acc']:.4f} / macro-F1 "
                         f"{summary[name]['macro_f1']:.4f}" for name in reversed(names))
    disagree = int((oof["finetune"].argmax(1) != oof["probe"].argmax(1)).sum())
    photos = f"{len(labels)} photos"
    chosen, why = best, f"{CANDIDATES[best]} wins out of fold on {photos}"
    if best != "finetune":
        resamples = np.random.default_rng(0).integers(0, len(labels), (RESAMPLES, len(labels)))
        f1 = {name: macro_f1_resampled(labels, oof[name].argmax(1), resamples, num_classes)
              for name in (best, "finetune")}
        won = float(np.mean(f1[best] > f1["finetune"]) + np.mean(f1[best] == f1["finetune"]) / 2)
        summary["resampled"] = {"leader": best, "won": round(won, 4), "resamples": RESAMPLES,
                                "needed": confidence}
        resampled = f"{won:.0%} of {RESAMPLES} resamples of them"
        if won >= confidence:
            why = f"{CANDIDATES[best]} wins out of fold on {photos}, and in {resampled}"
        else:
            chosen = "finetune"
            why = (f"fine-tuned kept: the {CANDIDATES[best]} leads out of fold on {photos} but "
                   f"beats fine-tuning in only {resampled} (< {confidence:.0%}): too close to "
                   "call")
    summary["chosen"] = chosen
    summary["why"] = f"{why}: {scores} ({disagree} photos where fine-tuned and probe disagree)"
    return Selection(selection.mode, selection.reason, finetune=chosen != "probe",
                     wise_alpha=wise_alpha if chosen == "wise" else None, folds=folds,
                     oof={"paths": [str(s.path) for s in samples], "labels": labels.tolist(),
                          "logits": {name: lg.round(4).tolist() for name, lg in oof.items()}},
                     summary=summary)


def average_with_head_phase(run: RunDir, alpha: float, console: Console) -> None:
    """best.pt's weights (the refit's last) averaged with the head phase's (head.pt): the
    WiSE-FT model the cross-validation chose. Done once: best.pt records it (--resume)."""
    checkpoint = load_checkpoint(run.best)
    if checkpoint.get("wise_alpha") is not None:
        return
    start = load_checkpoint(run.head)["model"]
    checkpoint["model"] = average_weights(start, checkpoint["model"], alpha)
    checkpoint["wise_alpha"] = alpha
    atomic_torch_save(checkpoint, run.best)
    console.print(f"WiSE-FT: best.pt = {1 - alpha:g} x head phase + {alpha:g} x fine-tuned")


# --- calibration and the final best.pt -------------------------------------------------------

def finalise(run: RunDir, selection: Selection, data: TrainData, config: TrainConfig,
             device: torch.device, console: Console,
             pool_features: torch.Tensor | None = None) -> dict:
    """Fit the temperature (on validation logits of the best model, or on the winner's
    out-of-fold logits, carried to a refit probe) and write it into best.pt's contract with how
    the model was chosen. pool_features: cross-validation's backbone features of train+val."""
    checkpoint = load_checkpoint(run.best)
    model = build_model(config.arch, len(data.labels), weights="none")
    model.load_state_dict(checkpoint["model"])
    model.to(device)
    if selection.mode == "cv":
        name = selection.summary["chosen"]
        logits = np.asarray(selection.oof["logits"][name])
        labels = np.asarray(selection.oof["labels"])
        fitted_on = f"out-of-fold logits of the {name} candidate ({len(labels)} photos)"
    else:
        logits = predict(model, data.val_set.tensor, config.eval_batch_size, device).numpy()
        labels = data.val_set.labels.numpy()
        fitted_on = f"validation logits of the selected model ({len(labels)} photos)"
    if not config.calibrate:
        calibration = {"temperature": 1.0, "fitted_on": "not calibrated (--no-calibrate)"}
    else:
        calibration = calibration_report(logits, labels, fitted_on)
        fold_spreads = [fold["probe_logit_spread"] for fold in selection.folds
                        if "probe_logit_spread" in fold]  # none in val mode
        if fold_spreads and selection.summary["chosen"] == "probe":
            # The refit probe trains 1.5x the fold probes' steps and is sharper than they are
            # (trainer.calibration.carry_to_refit). A fine-tuned model fits the photos it
            # trained on far more tightly than a linear head does, so its spread on photos the
            # refit saw and the folds partly did not says little about new photos: its T stays
            # as fitted. The refit probe is the untouched backbone under a new head, so its
            # logits on train+val are that head over the features cross-validation computed.
            with torch.no_grad():
                refit = model.eval().head(pool_features.to(device)).float().cpu().numpy()
            calibration = carry_to_refit(calibration, float(np.mean(fold_spreads)),
                                         logit_spread(refit))
    contract = ModelContract.model_validate(checkpoint["contract"]).model_copy(
        update={"temperature": calibration["temperature"]})
    checkpoint["contract"] = contract.model_dump()
    checkpoint["calibration"] = calibration
    checkpoint["selection"] = asdict(selection)
    atomic_torch_save(checkpoint, run.best)
    atomic_write_json(run.selection, {**asdict(selection), "calibration": calibration})
    if config.calibrate:
        carried = (f", x{calibration['refit_logit_scale']:.3f} for the refit's sharper logits"
                   if "refit_logit_scale" in calibration else "")
        console.print(f"temperature {calibration['temperature']:.3f} (fitted on {fitted_on}"
                      f"{carried}): ECE {calibration['ece_before']:.4f} -> "
                      f"{calibration['ece_after']:.4f}")
    return calibration


# --- the run ----------------------------------------------------------------------------------

def train(config: TrainConfig, console: Console | None = None) -> TrainResult:
    processes, device_name = distributed.start(config.device)
    console = console or Console()
    if not processes.main:
        console = Console(quiet=True)  # one process reports, the others train
    setup_logging(console)
    config, run = open_run(config, processes)
    console.rule(f"trainer: {run.root}"
                 + (f" ({processes.world} processes)" if processes.distributed else ""))
    console.print_json(config.model_dump_json())
    seed_everything(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(device_name)
    started = time.perf_counter()
    data = load_data(config, run, console, processes)

    selection = choose_selection(config, len(data.train_set), len(data.val_set))
    pool_features = None
    console.print(f"model selection: {selection.mode}: {selection.reason}")
    if selection.mode == "cv":
        data = pooled(data, config, console)
        selection, pool_features = cross_validate(selection, data, config, device, console,
                                                  run, processes)
        console.print(f"[bold]chosen:[/] {selection.summary['why']}")
    plan = plan_schedule(config, len(data.train_set)) if selection.finetune else Plan(0, 1, 1)
    console.print(plan.describe(len(data.train_set)))

    model = new_model(config, len(data.labels), device)
    optimizer = make_optimizer(model, config)
    schedule = make_schedule(optimizer, config, plan.steps)
    ema = copy.deepcopy(model).eval() if config.ema_horizon else None
    checkpointer = Checkpointer(run, config, data.contract, console,
                                elapsed_before=time.perf_counter() - started,
                                writes=processes.main)
    state = checkpointer.restore(model, optimizer, schedule, ema, plan)

    if config.head_epochs and not state.head_done:
        # A refit trains its head on cross-validation's features of the same photos: the
        # fold probes' procedure, on all of train+val, without a second backbone pass.
        row = head_phase(model, data, config, device, console, pool_features)
        if ema is not None:
            ema.load_state_dict(model.state_dict())
        state.head_done = True
        if config.wise_alpha and processes.main:  # kept before last.pt says the head is done
            atomic_torch_save({"model": weights_copy(model)}, run.head)
        checkpointer.record(state, row, model, model, optimizer, schedule, ema)

    model.freeze_stages(config.frozen_stages)
    net = wrap(model, processes, device)  # after the head phase, which trains on all photos
    for epoch in range(state.epoch, plan.epochs):
        if selection.mode == "val" and state.evals_since_best() >= config.patience:
            # Said in selection.json and best.pt too: a shorter history alone reads as a crash.
            selection.summary["early_stop"] = (
                f"after epoch {state.epoch} of {plan.epochs}: no better validation macro-F1 "
                f"for {config.patience} evaluations (patience)")
            console.print(f"early stop {selection.summary['early_stop']}")
            break
        seed_epoch(config, epoch, processes)
        with progress_bar(console) as progress:
            metrics = train_one_epoch(model, train_loader(data.train_set, config, epoch,
                                                          processes),
                                      optimizer, schedule, config, device, data.loss_weights,
                                      plan.steps_in(epoch), ema,
                                      ema_decay(config, plan.steps), progress,
                                      f"epoch {epoch + 1}/{plan.epochs}", net)
        if not plan.evaluates_after(epoch):
            continue
        eval_model = ema if ema is not None else model
        row = {"epoch": epoch + 1, "phase": "finetune", **metrics,
               "lr_head": schedule.get_last_lr()[1],
               **val_scores(eval_model, data, config, device)}
        state.epoch = epoch + 1
        checkpointer.record(state, row, model, eval_model, optimizer, schedule, ema)

    if selection.wise_alpha and processes.main:
        average_with_head_phase(run, selection.wise_alpha, console)
    calibration = (finalise(run, selection, data, config, device, console, pool_features)
                   if processes.main else {})
    distributed.stop()  # the other processes wait for rank 0's files
    best = state.best
    chosen = (selection.summary["why"] if selection.mode == "cv" else
              f"best epoch {best['epoch']} ({best['phase']}) val acc {best['val_acc']:.4f}, "
              f"macro-F1 {best['val_macro_f1']:.4f}")
    console.rule(f"done in {checkpointer.elapsed() / 60:.1f} min: {chosen}")
    return TrainResult(run.root, best, state.history, checkpointer.elapsed(), asdict(selection),
                       calibration)
