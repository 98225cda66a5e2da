"""ImageFolder discovery, robust decoding, and the train/eval datasets.

Evaluation uses `service.contract.load_and_preprocess`, the very function the service runs,
so validation accuracy is the accuracy the service will have. Training decodes with the
contract's `decode_image` and augments with torchvision on PIL images. A file that does not
decode is skipped with a warning and counted, never a crash.
"""

from __future__ import annotations

import copy
import logging
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from service.contract import (
    ImageDecodeError,
    ModelContract,
    crop_pixels,
    decode_image,
    load_and_preprocess,
    normalize,
    preprocess,
    resize_short_side,
)
from trainer.config import TrainerError

log = logging.getLogger("trainer")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TRAIN_DIRS = ("train",)
VAL_DIRS = ("val", "validation", "valid")
TEST_DIRS = ("test",)


class DataError(TrainerError, ValueError):
    """The dataset cannot be trained on as it is; the message says what to fix."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class DatasetSplits:
    labels: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    val_source: str  # where validation came from, for the model card

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: {self.labels[k]: v for k, v in sorted(Counter(s.label for s in split).items())}
                for name, split in (("train", self.train), ("val", self.val), ("test", self.test))}


@dataclass
class Skipped:
    """Files that could not be used, with the reason; reported in dataset.json and the card."""
    files: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: Path, reason: str) -> None:
        self.files.append((str(path), reason))
        log.warning("skipping %s: %s", path, reason)

    def __len__(self) -> int:
        return len(self.files)


def _label_folders(root: Path) -> dict[str, list[Path]]:
    folders = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        folders[folder.name] = files
    return folders


def _find_split(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def stratified_subset(samples: list[Sample], n: int | None, seed: int) -> list[Sample]:
    """At most n samples with the label mix kept (every label keeps at least one)."""
    if n is None or n >= len(samples):
        return samples
    rng = random.Random(seed)
    by_label: dict[int, list[Sample]] = {}
    for sample in samples:
        by_label.setdefault(sample.label, []).append(sample)
    chosen = []
    for label, group in sorted(by_label.items()):
        group = group[:]
        rng.shuffle(group)
        chosen += group[:max(1, round(n * len(group) / len(samples)))]
    return sorted(chosen, key=lambda s: (s.label, str(s.path)))


def discover(root: Path, *, val_fraction: float = 0.15, seed: int = 0,
             min_images_per_class: int = 5, max_train_images: int | None = None,
             max_val_images: int | None = None) -> DatasetSplits:
    """Find labels and splits under root. Labels are the train folder's subfolders, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    train_dir = _find_split(root, TRAIN_DIRS)
    val_dir = _find_split(root, VAL_DIRS)
    test_dir = _find_split(root, TEST_DIRS)
    if train_dir is None and (val_dir or test_dir):
        raise DataError(f"{root} has a validation/test split folder but no train/ folder")
    train_folders = _label_folders(train_dir or root)
    if len(train_folders) < 2:
        raise DataError(f"{train_dir or root} needs one subfolder per label with images in it "
                        f"(at least 2 labels); found {sorted(train_folders) or 'none'}")
    labels = sorted(train_folders)
    index = {label: i for i, label in enumerate(labels)}
    train = [Sample(p, index[label]) for label, files in train_folders.items() for p in files]

    def split_samples(split_dir: Path | None) -> list[Sample]:
        if split_dir is None:
            return []
        folders = _label_folders(split_dir)
        unknown = sorted(set(folders) - set(labels))
        if unknown:
            raise DataError(f"{split_dir} has labels that train does not: {unknown}")
        return [Sample(p, index[label]) for label, files in folders.items() for p in files]

    val, test = split_samples(val_dir), split_samples(test_dir)
    val_source = f"the {val_dir.name}/ folder" if val_dir else ""
    if not val:
        # Hold out a fixed-seed stratified share of train: the same split on every run.
        rng = random.Random(seed)
        train_keep, val = [], []
        for label in range(len(labels)):
            group = [s for s in train if s.label == label]
            rng.shuffle(group)
            n_val = max(1, round(len(group) * val_fraction)) if len(group) >= 2 else 0
            val += group[:n_val]
            train_keep += group[n_val:]
        train = sorted(train_keep, key=lambda s: (s.label, str(s.path)))
        val.sort(key=lambda s: (s.label, str(s.path)))
        val_source = f"{val_fraction:.0%} of train held out per label (seed {seed})"

    counts = Counter(s.label for s in train)
    too_few = {labels[i]: counts.get(i, 0) for i in range(len(labels))
               if counts.get(i, 0) < min_images_per_class}
    if too_few:
        raise DataError(
            f"labels with fewer than {min_images_per_class} training images: {too_few}. "
            "Collect more photos for them, drop their folders, or lower --min-images-per-class")
    train = stratified_subset(train, max_train_images, seed)
    val = stratified_subset(val, max_val_images, seed)
    return DatasetSplits(labels, train, val, test, val_source)


# --- decoding --------------------------------------------------------------------------------

def decode_for_training(path: Path, short_side: int) -> Image.Image:
    """Decode (JPEG at a reduced DCT scale when it is big) and shrink so the short side is
    `short_side`: every random crop is taken from this image, so nothing is lost."""
    image = decode_image(path.read_bytes(), draft_size=short_side)
    width, height = image.size
    scale = short_side / min(width, height)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
    return image


def _try(fn, path: Path, skipped: Skipped):
    try:
        return fn(path)
    except ImageDecodeError as exc:
        skipped.add(path, exc.reason + ": " + exc.detail)
    except OSError as exc:  # unreadable file (permissions, vanished)
        skipped.add(path, f"unreadable: {exc}")
    return None


def decode_all(samples: list[Sample], fn, skipped: Skipped, progress=None,
               description: str = "decoding") -> tuple[list, list[Sample]]:
    """Run fn over every sample's path on 2 threads (Pillow decodes without the GIL);
    returns the results and the samples that decoded, in order."""
    results, kept = [], []
    task = progress.add_task(description, total=len(samples), info="") if progress else None
    with ThreadPoolExecutor(max_workers=2) as pool:
        for sample, result in zip(samples, pool.map(lambda s: _try(fn, s.path, skipped), samples)):
            if progress:
                progress.advance(task)
            if result is not None:
                results.append(result)
                kept.append(sample)
    if progress:
        progress.remove_task(task)
    return results, kept


# --- datasets --------------------------------------------------------------------------------

def train_transform(config, contract: ModelContract) -> T.Compose:
    """Augmentations on PIL images, ending in the contract's normalisation."""
    size = config.train_image_size or contract.input_size
    normalize = [T.ToImage(), T.ToDtype(torch.float32, scale=True),
                 T.Normalize(list(contract.mean), list(contract.std))]
    if config.augment == "none":
        return EvalView(contract)
    steps = [T.RandomResizedCrop(size, scale=(config.min_crop_scale, 1.0), antialias=True),
             T.RandomHorizontalFlip()]
    if config.augment == "recipe":
        if config.color_jitter > 0:
            jitter = config.color_jitter
            steps.append(T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
        if config.trivial_augment:
            steps.append(T.TrivialAugmentWide())
    return T.Compose(steps + normalize)


class EvalView:
    """PIL image -> the evaluation tensor, by the contract's own `preprocess` (crop, then
    normalise): the service's transform, not a copy of it. A class, not a lambda, so
    DataLoader workers can pickle it."""

    def __init__(self, contract: ModelContract):
        self.contract = contract

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocess(image, self.contract))

    def batches(self, images: list[Image.Image], batch_size: int):
        """[N,3,S,S] batches of many images: crops stacked as uint8, normalised once per batch
        (the service's split), so the whole set never sits in RAM as float32."""
        for start in range(0, len(images), batch_size):
            pixels = np.stack([crop_pixels(image, self.contract)
                               for image in images[start:start + batch_size]])
            yield torch.from_numpy(normalize(pixels, self.contract))


class TrainImages(Dataset):
    """Training photos, decoded once into RAM (cache) or per item; corrupt ones are skipped."""

    def __init__(self, samples: list[Sample], contract: ModelContract, transform,
                 skipped: Skipped, cache: bool = True, progress=None):
        self.short_side = resize_short_side(contract)
        self.transform = transform
        self.skipped = skipped
        if cache:
            self.images, self.samples = decode_all(
                samples, lambda p: decode_for_training(p, self.short_side), skipped, progress,
                "decoding training photos into RAM")
        else:
            self.images, self.samples = None, list(samples)
        self.labels = [s.label for s in self.samples]

    def subset(self, indices) -> TrainImages:
        """The same photos (shared, not copied) restricted to indices: a fold of the set."""
        part = copy.copy(self)
        part.samples = [self.samples[i] for i in indices]
        part.labels = [self.labels[i] for i in indices]
        part.images = None if self.images is None else [self.images[i] for i in indices]
        return part

    def joined(self, other: TrainImages) -> TrainImages:
        """This set followed by other (same transform): train+val for a refit."""
        both = copy.copy(self)
        both.samples = self.samples + other.samples
        both.labels = self.labels + other.labels
        both.images = None if self.images is None else self.images + other.images
        return both

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        if self.images is not None:
            image = self.images[i]
        else:
            image = _try(lambda p: decode_for_training(p, self.short_side),
                         self.samples[i].path, self.skipped)
            if image is None:
                return None  # dropped by collate_skipping
        return self.transform(image), self.labels[i]


def collate_skipping(batch):
    """Default collate without the items that failed to decode (lazy loading only)."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    images, labels = zip(*batch)
    return torch.stack(images), torch.tensor(labels)


class EvalImages(Dataset):
    """Validation/test photos through `service.contract.load_and_preprocess`, exactly.

    Preprocessed once and kept (float32, ~0.6 MB per photo at 224 px): every epoch's
    evaluation is then forward passes only.
    """

    def __init__(self, samples: list[Sample], contract: ModelContract, skipped: Skipped,
                 progress=None, description: str = "preprocessing validation photos"):
        arrays, self.samples = decode_all(
            samples, lambda p: load_and_preprocess(p.read_bytes(), contract), skipped, progress,
            description)
        size = contract.input_size
        self.tensor = (torch.from_numpy(np.stack(arrays)) if arrays
                       else torch.empty(0, 3, size, size))
        self.labels = torch.tensor([s.label for s in self.samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.tensor[i], int(self.labels[i])


def class_counts(labels: list[int], num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def imbalance_ratio(counts: np.ndarray) -> float:
    present = counts[counts > 0]
    return float(present.max() / present.min()) if len(present) else 1.0


def loss_weights(counts: np.ndarray, balance: str) -> torch.Tensor | None:
    """Per-class loss weights ~ 1/sqrt(frequency), mean 1, for the main label and every
    attribute head: rare classes count more without flipping the prior so far that accuracy
    on common ones suffers. 'auto' weighs only a set whose largest class has more than 1.5x
    the photos of its smallest; 'none' and 'sampler' (which balances by drawing) weigh none."""
    if balance in ("none", "sampler"):
        return None
    if balance == "auto" and imbalance_ratio(counts) <= 1.5:
        return None
    weights = 1.0 / np.sqrt(np.maximum(np.asarray(counts, dtype=np.float64), 1))
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)
