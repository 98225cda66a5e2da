"""Validation trusts bytes: real photos pass with their true format, everything else is
rejected with the same reason names the service uses."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from collector.config import Validation
from collector.validate import validate_image
from service.contract import ImageDecodeError
from tests.conftest import DEMO_CATALOG

PHOTO = min((DEMO_CATALOG / "shirt").glob("*.jpg")).read_bytes()


def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def test_collector_valid_photo_facts():
    valid = validate_image(PHOTO, Validation())
    with Image.open(io.BytesIO(PHOTO)) as image:
        assert (valid.width, valid.height) == image.size
    assert valid.format == "JPEG" and valid.extension == "jpg" and len(valid.phash) == 16
    webp = encode(Image.open(io.BytesIO(PHOTO)), "WEBP")
    assert validate_image(webp, Validation()).extension == "webp"   # whatever the URL said


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"<!doctype html><html><body>Access denied</body></html>", "not_an_image"),
    (PHOTO[: len(PHOTO) // 2], "corrupt"),
    (encode(Image.new("RGB", (40, 300)), "PNG"), "too_small"),
    (encode(Image.new("1", (9000, 9000)), "PNG"), "too_many_pixels"),
])
def test_collector_rejections(data, reason):
    with pytest.raises(ImageDecodeError) as info:
        validate_image(data, Validation(min_side=64, max_pixels=50_000_000))
    assert info.value.reason == reason


def test_collector_near_duplicate_phash_is_close():
    from collector.dedup import cluster

    image = Image.open(io.BytesIO(PHOTO)).convert("RGB")
    smaller = image.resize((image.width * 9 // 10, image.height * 9 // 10))
    out = io.BytesIO()
    smaller.save(out, "JPEG", quality=60)
    other = min((DEMO_CATALOG / "pants").glob("*.jpg")).read_bytes()
    hashes = [validate_image(d, Validation()) for d in (PHOTO, out.getvalue(), other)]
    groups = cluster([h.sha256 for h in hashes], [h.phash for h in hashes], threshold=6)
    assert groups[0] == groups[1] != groups[2]


def test_collector_phash_same_bits_as_imagehash():
    """validate's scipy-free phash gives imagehash.phash's bits, so hashes stored by earlier
    runs stay comparable (same draft-decoded image in, same 16 hex digits out)."""
    import imagehash

    from collector.validate import _HASH_DRAFT, phash
    from service.contract import decode_image

    photos = sorted(DEMO_CATALOG.glob("*/*.jpg"))[:40]
    assert photos
    for path in photos:
        image = decode_image(path.read_bytes(), draft_size=_HASH_DRAFT)
        assert phash(image) == str(imagehash.phash(image)), path
    png = Image.open(io.BytesIO(PHOTO)).convert("RGBA")
    assert validate_image(encode(png, "PNG"), Validation()).phash == str(
        imagehash.phash(decode_image(encode(png, "PNG"))))
