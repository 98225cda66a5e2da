"""Every training knob in one typed config: defaults and descriptions are what `--help` shows.

The config is printed at the start of a run and saved as `RUN_DIR/config.json`; `--resume`
reads it back, so a resumed run trains with exactly the knobs it started with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

CONFIG_FILE = "config.json"


class TrainerError(Exception):
    """A problem the user can fix; the CLI prints its message without a traceback."""


class TrainConfig(BaseModel):
    """Fine-tune a pretrained CNN on an ImageFolder tree (one folder per label)."""

    data: Path | None = Field(None, description=(
        "ImageFolder root: DIR/<label>/*.jpg, or split folders "
        "DIR/train|val|validation|test/<label>/*.jpg (not needed with --resume)"))
    out: Path = Field(description="run folder: config, checkpoints, history, report, export")

    # --- model -----------------------------------------------------------------------------
    arch: str = Field("tf_efficientnet_lite0", description=(
        "backbone. Offline ImageNet weights (pip packages): tf_efficientnet_lite0 (224 px; "
        "cost 1x), tf_efficientnet_lite1 (240 px; ~2.4x Lite0's training step time here, 2 CPU "
        "cores), tf_efficientnet_lite2 (260 px; ~3.4x; with --image-size 224 1.45x, and 480 "
        "steps scored 0.921 against Lite0's 0.900 on clothing-small in the same ~13 min, "
        "serving 0.75x Lite0's fp32 images/s). torchvision mobilenet_v3_large | "
        "efficientnet_b0 | resnet50 download their weights when online"))
    weights: str = Field("default", description=(
        "'default' = the backbone's ImageNet weights; a PATH to a local .pth state dict; "
        "'none' = random init"))
    image_size: int | None = Field(None, ge=32, le=1024, description=(
        "square input size in pixels (evaluation and service); default: the backbone's own "
        "(224 / 240 / 260 for Lite0 / 1 / 2)"))
    crop_pct: float | None = Field(None, gt=0.3, le=1.0, description=(
        "evaluation centre crop / resized short side; default: the backbone's own (0.875)"))
    train_image_size: int | None = Field(None, ge=32, le=1024, description=(
        "random crops for fine-tuning at this size, below image_size (FixRes: random crops "
        "enlarge objects, so training lower than testing matches their apparent size; each "
        "step costs ~(train/test)^2: 192 for 224 measured 1.36x faster steps on clothing-small, "
        "-0.6 points, within one run's noise); default: image_size"))

    # --- schedule ----------------------------------------------------------------------------
    steps: int | None = Field(None, ge=1, description=(
        "fine-tuning budget in optimizer steps; default: `budget_epochs` passes over the "
        "training photos, but at least `min_steps` and at most `max_steps` (small sets get "
        "enough updates, big ones do not take hours)"))
    budget_epochs: float = Field(10, gt=0, description="passes over train in the default budget")
    min_steps: int = Field(200, ge=1, description=(
        "floor of the default step budget (200 steps of batch 32 = 6,400 augmented views)"))
    max_steps: int = Field(720, ge=1, description=(
        "cap of the default step budget (720 steps of batch 32 at 224 px: ~11 min on 2 CPU "
        "cores, Lite0)"))
    epochs: int | None = Field(None, ge=0, description=(
        "fixed number of fine-tuning epochs instead of the step budget; 0 = train the linear "
        "head only (the linear probe)"))
    head_epochs: int = Field(30, ge=0, description=(
        "head-only epochs with the backbone frozen, run on features computed once (cheap)"))
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["adamw", "adam"] = Field("adamw")
    lr: float = Field(1e-3, gt=0, description="peak learning rate of the classifier head")
    backbone_lr_ratio: float = Field(0.1, ge=0, description=(
        "backbone peak LR = lr * ratio: pretrained features move slowly"))
    weight_decay: float = Field(0.02, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description=(
        "linear LR warm-up over this share of the fine-tuning steps, then cosine decay to zero"))
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    freeze_bn: bool = Field(True, description=(
        "keep BatchNorm running statistics frozen while fine-tuning (small batches and few "
        "images make updated statistics worse than ImageNet's)"))
    frozen_stages: int = Field(3, ge=0, description=(
        "leading backbone stages (stem first) that stay frozen during fine-tuning: low-level "
        "features "
        "transfer as they are, and not back-propagating through the high-resolution stages "
        "makes each step cheaper"))
    dropout: float = Field(0.2, ge=0, lt=1, description="dropout before the linear head")
    ema_horizon: float = Field(0.0, ge=0, le=1, description=(
        "validate and export an exponential moving average of the fine-tuned weights that "
        "spans about this fraction of the fine-tuning steps (decay 1 - 1/(fraction x steps): "
        "it follows the step budget, as warm-up and decay do); 0 = off, the default: 0.25 "
        "gained 1 photo of 341 on clothing-small and lost 5 of 4,463 on 3 x 80 (BENCHMARKS.md)"))
    patience: int = Field(3, ge=1, description=(
        "early stopping (selection 'val' only): evaluations without a better validation "
        "macro-F1"))
    evaluations: int = Field(10, ge=1, description=(
        "validate and checkpoint about this many times over the fine-tuning steps (at epoch "
        "ends)"))

    # --- model selection -------------------------------------------------------------------
    selection: Literal["auto", "val", "cv"] = Field("auto", description=(
        "val = keep the best evaluation on the validation split (head phase or an epoch), with "
        "early stopping; cv = k-fold cross-validation on train+val of the fixed schedule "
        "against the linear probe on the same folds, then the winner refit on train+val; "
        "auto = cv when validation has fewer than `small_val` photos (one noisy number cannot "
        "tell epochs apart) and train+val is at most `cv_max_images`, else val"))
    small_val: int = Field(150, ge=1, description="'auto' cross-validates below this many "
                                                  "validation photos")
    cv_folds: int = Field(3, ge=2, le=10, description="folds of the cross-validation")
    cv_max_images: int = Field(2000, ge=10, description=(
        "'auto' cross-validates only up to this many train+val photos (cost: folds + 1 "
        "trainings)"))
    cv_confidence: float = Field(0.95, ge=0.5, lt=1, description=(
        "with cross-validation: how sure it must be that the probe (or the WiSE-FT average) "
        "beats fine-tuning before it is exported instead: the share of bootstrap resamples of "
        "the out-of-fold photos in which its macro-F1 is higher; 0.5 = whichever scores higher"))
    wise_alpha: float | None = Field(None, gt=0, lt=1, description=(
        "with cross-validation: also score the fine-tuned weights averaged with the head "
        "phase's, (1 - a) x (ImageNet backbone + probe head) + a x fine-tuned (WiSE-FT, "
        "Wortsman et al. 2022; 0.5 is the usual a): one model, no serving cost, exported "
        "when it wins out of fold beyond noise (cv_confidence); off by default"))
    calibrate: bool = Field(True, description=(
        "fit a temperature on validation (or out-of-fold) logits so scores are calibrated; "
        "stored in the contract, ECE before/after in the model card"))

    # --- augmentation ------------------------------------------------------------------------
    augment: Literal["recipe", "light", "none"] = Field("recipe", description=(
        "recipe = random resized crop + flip + colour jitter + TrivialAugment; light = crop + "
        "flip; none = the evaluation transform"))
    min_crop_scale: float = Field(0.35, gt=0, le=1, description=(
        "smallest area fraction of a random resized crop (milder crops keep the product in "
        "view)"))
    trivial_augment: bool = Field(True, description="TrivialAugmentWide after the crop")
    color_jitter: float = Field(0.2, ge=0, description="brightness/contrast/saturation jitter")

    # --- data --------------------------------------------------------------------------------
    balance: Literal["auto", "sampler", "loss", "none"] = Field("auto", description=(
        "class imbalance: 'auto' = loss weights ~ 1/sqrt(frequency) when the largest class has "
        "more than 1.5x the smallest, else none"))
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description=(
        "share of train held out for validation when DATA has no val/validation split"))
    min_images_per_class: int = Field(5, ge=2, description="fewer is a clear error")
    max_train_images: int | None = Field(None, ge=1, description=(
        "use at most N training images (stratified, fixed seed): quick trials and tests"))
    max_val_images: int | None = Field(None, ge=1, description="same for validation")
    cache_images: bool = Field(True, description=(
        "decode each training photo once and keep it in RAM at the resize size (~0.25 MB "
        "each at 224 px): decoding is a large part of CPU step time"))
    workers: int = Field(0, ge=0, description="DataLoader worker processes (0 = main process; "
                                              "on a 2-core CPU workers steal compute)")

    # --- run ---------------------------------------------------------------------------------
    seed: int = Field(0)
    device: str = Field("auto", description=(
        "auto | cpu | cuda | cuda:N. Several processes: `torchrun --nproc-per-node N -m "
        "trainer train ...` (NCCL on GPUs, one per process; gloo on CPU); batch_size stays "
        "the global batch"))
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    channels_last: bool = Field(True, description="NHWC memory layout: faster convs on CPU")
    max_steps_per_epoch: int | None = Field(None, ge=1, description=(
        "cut each fine-tuning epoch after N steps (tests and quick trials)"))
    eval_batch_size: int = Field(64, ge=1)
    resume: bool = Field(False, description="continue the run in OUT from its last checkpoint")

    @model_validator(mode="after")
    def _something_to_train(self) -> TrainConfig:
        if self.data is None and not self.resume:
            raise ValueError("--data DIR is required (an ImageFolder tree)")
        if self.data is not None and not self.resume and not self.data.is_dir():
            raise ValueError(f"data folder {self.data} does not exist")
        if self.epochs == 0 and self.head_epochs == 0:
            raise ValueError("epochs and head_epochs are both 0: nothing to train")
        if self.wise_alpha is not None and self.head_epochs == 0:
            raise ValueError("wise_alpha averages with the head phase's weights: it needs "
                             "head_epochs > 0")
        return self


def save_config(config: TrainConfig, run_dir: Path) -> Path:
    path = run_dir / CONFIG_FILE
    path.write_text(config.model_dump_json(indent=2))
    return path


def load_config(run_dir: Path) -> TrainConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise TrainerError(f"{path} does not exist: is {run_dir} a run folder made by "
                                "`trainer train`?")
    saved = json.loads(path.read_text())
    if saved.get("ema_decay"):  # a knob renamed: resuming without it would drop the average
        raise TrainerError(f"{run_dir} was started with --ema-decay {saved['ema_decay']}, which "
                           "this version replaced by --ema-horizon (a fraction of the steps): "
                           "resume it with the version that started it, or train it again")
    return TrainConfig.model_validate(saved)
