"""The model contract round-trips through metadata and rejects what it cannot use."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from service.contract import (
    CONTRACT_KEY,
    ContractError,
    ImageDecodeError,
    ModelContract,
    decode_image,
    load_and_preprocess,
    load_pixels,
    normalize,
)


def test_contract_round_trips_through_metadata():
    contract = ModelContract(version="v1", labels=["hat", "shoes"], input_size=192)
    metadata = contract.to_metadata()
    assert json.loads(metadata["labels"]) == ["hat", "shoes"]
    assert ModelContract.from_metadata(metadata) == contract


@pytest.mark.parametrize("metadata, message", [
    ({}, "no 'product_classifier.contract'"),
    ({CONTRACT_KEY: '{"version": "v", "labels": ["only-one"]}'}, "labels"),
    ({CONTRACT_KEY: '{"version": "v", "labels": ["a", "a"]}'}, "unique"),
    ({CONTRACT_KEY: "not json"}, "invalid"),
])
def test_contract_errors_name_the_problem(metadata, message):
    with pytest.raises(ContractError, match=message):
        ModelContract.from_metadata(metadata)


def _jpeg(size, color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_decode_rejects_bad_bytes_with_reasons():
    with pytest.raises(ImageDecodeError) as empty:
        decode_image(b"")
    assert empty.value.reason == "empty"
    with pytest.raises(ImageDecodeError) as html:
        decode_image(b"<html><body>not a photo</body></html>")
    assert html.value.reason == "not_an_image"
    data = _jpeg((640, 480))
    with pytest.raises(ImageDecodeError) as truncated:
        decode_image(data[: len(data) // 2])
    assert truncated.value.reason == "corrupt"
    with pytest.raises(ImageDecodeError) as bomb:
        decode_image(_jpeg((3000, 3000)), max_pixels=1_000_000)
    assert bomb.value.reason == "too_many_pixels"


def test_preprocess_normalises_a_real_photo(demo_catalog):
    photo = min((demo_catalog / "hat").iterdir()).read_bytes()
    contract = ModelContract(version="v", labels=["a", "b"], mean=(0.5,) * 3, std=(0.5,) * 3)
    tensor = load_and_preprocess(photo, contract)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == np.float32
    assert -1.0 <= tensor.min() < tensor.max() <= 1.0
    # A flat colour stays that colour after crop and resize.
    flat = load_and_preprocess(_jpeg((400, 533), (255, 255, 255)), contract)
    np.testing.assert_allclose(flat, 1.0, atol=0.02)


def test_split_preprocessing_gives_the_same_tensor(demo_catalog):
    """The service crops to uint8 in its API process and normalises the batch in its model
    process; that must be bit-identical to `load_and_preprocess` (what evaluation uses)."""
    photos = [min(folder.iterdir()).read_bytes()
              for folder in sorted(demo_catalog.iterdir())[:4]]
    contract = ModelContract(version="v", labels=["a", "b"], mean=(0.485, 0.456, 0.406),
                             std=(0.229, 0.224, 0.225), input_size=192)
    pixels = np.stack([load_pixels(photo, contract) for photo in photos])
    assert pixels.dtype == np.uint8 and pixels.shape == (4, 192, 192, 3)
    batch = normalize(pixels, contract)
    assert batch.dtype == np.float32 and batch.shape == (4, 3, 192, 192)
    assert batch.flags.c_contiguous
    for row, photo in zip(batch, photos):
        assert np.array_equal(row, load_and_preprocess(photo, contract))
