"""Real product photos as upload bytes, read once and kept in memory in several sizes.

Shops upload what their cameras and CMS produce: thumbnails, catalogue-sized images and big
phone photos. Decode cost grows with size, so a load test that only posts one small file
flatters the server. Each photo is re-encoded per size class once, before any load starts.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CATALOG = REPO / "demo_data" / "catalog"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}

# Short side in pixels per size class; "original" keeps the catalogue file's own bytes.
SIZE_CLASSES: dict[str, int | None] = {"thumb": 224, "original": None, "large": 1200}


@dataclass(frozen=True)
class Payload:
    name: str        # file name, used as the multipart filename
    size_class: str  # thumb | original | large
    data: bytes
    label: str       # the catalogue folder the photo came from


def _encode(image: Image.Image, short_side: int) -> bytes:
    width, height = image.size
    scale = short_side / min(width, height)
    resized = image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                           Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    resized.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def load_payloads(catalog: Path = DEFAULT_CATALOG, per_label: int = 3,
                  sizes: tuple[str, ...] = ("thumb", "original", "large"),
                  seed: int = 0) -> list[Payload]:
    """`per_label` photos from each label folder of an ImageFolder-style catalogue, per size."""
    unknown = set(sizes) - set(SIZE_CLASSES)
    if unknown:
        raise ValueError(f"unknown size classes {sorted(unknown)}; "
                         f"choose from {list(SIZE_CLASSES)}")
    root = Path(catalog)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not folders:
        raise FileNotFoundError(f"{catalog} has no label folders with photos "
                                "(expected CATALOG/<label>/<photo>.jpg)")
    rng = random.Random(seed)
    payloads: list[Payload] = []
    for folder in folders:
        photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for path in rng.sample(photos, min(per_label, len(photos))):
            original = path.read_bytes()
            with Image.open(io.BytesIO(original)) as opened:
                image = opened.convert("RGB")
            for size_class in sizes:
                short_side = SIZE_CLASSES[size_class]
                data = original if short_side is None else _encode(image, short_side)
                payloads.append(Payload(path.name, size_class, data, folder.name))
    return payloads
