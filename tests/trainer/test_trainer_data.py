"""Dataset discovery, robust decoding, and the evaluation transform being the service's."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from service.contract import ModelContract, load_and_preprocess, preprocess
from trainer.config import TrainConfig
from trainer.data import (
    DataError,
    EvalImages,
    EvalView,
    Skipped,
    TrainImages,
    collate_skipping,
    discover,
    train_transform,
)


def contract_for(labels, size=64) -> ModelContract:
    return ModelContract(version="test", labels=labels, input_size=size)


def add_corrupt_files(folder: Path, good_photo: Path) -> list[Path]:
    """A truncated JPEG, a text file named .jpg, and an empty file."""
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(good_photo.read_bytes()[:2000])
    text = folder / "not-a-photo.jpg"
    text.write_text("<html>404 not found</html>")
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    return [truncated, text, empty]


def test_split_folders_are_found(shared_dataset):
    splits = discover(shared_dataset)
    assert splits.labels == sorted(p.name for p in (shared_dataset / "train").iterdir())
    assert "validation/" in splits.val_source
    assert all("/validation/" in str(s.path) for s in splits.val)
    assert all("/train/" in str(s.path) for s in splits.train)
    assert len(splits.train) == 3068 and len(splits.val) == 341


def test_missing_validation_is_held_out_with_a_fixed_seed(tiny_folder):
    first = discover(tiny_folder, val_fraction=0.2, seed=3)
    again = discover(tiny_folder, val_fraction=0.2, seed=3)
    other = discover(tiny_folder, val_fraction=0.2, seed=4)
    assert first.val == again.val and first.train == again.train
    assert first.val != other.val
    assert not {s.path for s in first.val} & {s.path for s in first.train}
    # stratified: every label is in validation, ~20% of each
    counts = first.counts()
    assert set(counts["val"]) == set(first.labels)
    assert all(n == round(10 * 0.2) for n in counts["val"].values())  # 10 per label


def test_a_label_with_too_few_images_is_a_clear_error(tiny_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    for photo in sorted((data / "hat").iterdir())[3:]:
        photo.unlink()
    with pytest.raises(DataError, match=r"fewer than 5 training images: \{'hat': 2\}"):
        discover(data, min_images_per_class=5)


def test_val_labels_unknown_to_train_are_an_error(tiny_folder, tmp_path):
    shutil.copytree(tiny_folder, tmp_path / "train")
    shutil.copytree(tiny_folder / "hat", tmp_path / "val" / "sombrero")
    with pytest.raises(DataError, match="sombrero"):
        discover(tmp_path)


def test_corrupt_images_are_skipped_and_counted(tiny_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    bad = add_corrupt_files(data / "shoes", next((data / "shoes").iterdir()))
    splits = discover(data, val_fraction=0.2)
    contract = contract_for(splits.labels)
    config = TrainConfig(data=data, out=tmp_path / "run")
    everything = splits.train + splits.val

    skipped = Skipped()
    cached = TrainImages(everything, contract, train_transform(config, contract), skipped)
    assert len(cached) == len(everything) - 3
    assert sorted(Path(p).name for p, _ in skipped.files) == sorted(p.name for p in bad)

    skipped_eval = Skipped()
    evaluated = EvalImages(everything, contract, skipped_eval)
    assert len(evaluated) == len(everything) - 3 and len(skipped_eval) == 3
    assert {reason.split(":")[0] for _, reason in skipped_eval.files} <= {
        "corrupt", "not_an_image", "empty"}

    # Lazy decoding (no RAM cache) drops them at batch time instead.
    lazy_skipped = Skipped()
    lazy = TrainImages(everything, contract, train_transform(config, contract), lazy_skipped,
                       cache=False)
    batch = collate_skipping([lazy[i] for i in range(len(lazy))])
    assert batch[0].shape == (len(everything) - 3, 3, 64, 64) and len(lazy_skipped) == 3


def test_eval_item_is_the_service_preprocessing_bit_for_bit(tiny_folder):
    splits = discover(tiny_folder)
    contract = ModelContract(version="t", labels=splits.labels, input_size=224, crop_pct=0.875)
    dataset = EvalImages(splits.val[:6], contract, Skipped())
    for i, sample in enumerate(dataset.samples):
        expected = load_and_preprocess(sample.path.read_bytes(), contract)
        item, label = dataset[i]
        assert item.dtype == torch.float32 and label == sample.label
        assert np.array_equal(item.numpy(), expected)


def test_train_transform_ends_in_the_contract_normalisation(tiny_folder, tmp_path):
    splits = discover(tiny_folder)
    contract = contract_for(splits.labels, size=64)
    config = TrainConfig(data=tiny_folder, out=tmp_path, augment="none")
    dataset = TrainImages(splits.val[:2], contract, train_transform(config, contract), Skipped())
    item, _ = dataset[0]
    expected = load_and_preprocess(splits.val[0].path.read_bytes(), contract)
    # 'none' is the evaluation crop taken from the RAM-cached (pre-shrunk) photo: close to the
    # service's tensor, not bit-identical (the evaluation set itself is, see above).
    assert item.shape == (3, 64, 64)
    assert float(np.abs(item.numpy() - expected).mean()) < 0.05


def test_head_phase_view_is_the_contract_preprocessing(tiny_folder):
    """The head phase's centre crops of cached photos are `service.contract.preprocess` of
    them, batch by batch, bit for bit (no copy of the crop maths to drift)."""
    splits = discover(tiny_folder)
    contract = contract_for(splits.labels, size=96)
    dataset = TrainImages(splits.val[:5], contract, EvalView(contract), Skipped())
    batches = list(EvalView(contract).batches(dataset.images, batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 1]
    expected = np.stack([preprocess(image, contract) for image in dataset.images])
    assert np.array_equal(torch.cat(batches).numpy(), expected)
    assert np.array_equal(dataset[0][0].numpy(), expected[0])


def test_fine_tuning_crops_can_be_smaller_than_the_served_size(tiny_folder, tmp_path):
    # FixRes: train at 48 px, evaluate (and serve) at 64 px.
    splits = discover(tiny_folder)
    contract = contract_for(splits.labels, size=64)
    config = TrainConfig(data=tiny_folder, out=tmp_path, train_image_size=48)
    dataset = TrainImages(splits.val[:2], contract, train_transform(config, contract), Skipped())
    assert dataset[0][0].shape == (3, 48, 48)
    assert EvalImages(splits.val[:2], contract, Skipped()).tensor.shape[-1] == 64
