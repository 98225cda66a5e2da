"""Thumbnails for the review grid: made once per image, cached on disk, served as files.

The cache key is the image file's content hash when the manifest has one (so a re-crawl
that re-downloads the same bytes reuses the thumbnail) and the image id otherwise.
Writes are atomic (temp file + rename): a kill in the middle never leaves half a JPEG that
the browser would then be served forever.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from PIL import Image

from service.contract import ImageDecodeError, decode_image

THUMB_SIZE = 256          # long side in px; cards show them at ~180 css px, sharp on 1.5x screens
THUMB_QUALITY = 82

# Served for files that are gone or do not decode, so one bad file never breaks the grid.
BROKEN_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="256" height="256" viewBox="0 0 256 256">'
    '<rect width="256" height="256" fill="#2b2b2b"/>'
    '<path d="M78 78l100 100M178 78L78 178" stroke="#e05252" stroke-width="14"/>'
    '<text x="128" y="230" fill="#ccc" font-family="sans-serif" font-size="22" '
    'text-anchor="middle">{reason}</text></svg>'
)


class ThumbnailCache:
    """`path_for(key, source)` returns a cached JPEG thumbnail, making it on first use."""

    def __init__(self, cache_dir: Path, size: int = THUMB_SIZE):
        self.cache_dir = Path(cache_dir)
        self.size = size

    def cached_path(self, key: str) -> Path:
        safe = "".join(ch for ch in key if ch.isalnum() or ch in "-_") or "unnamed"
        return self.cache_dir / str(self.size) / safe[:2] / f"{safe}.jpg"

    def path_for(self, key: str, source: Path) -> Path:
        """Path of the thumbnail for `source`; raises ImageDecodeError when it cannot be made."""
        target = self.cached_path(key)
        if target.is_file():
            return target
        make_thumbnail(source, target, self.size)
        return target


def make_thumbnail(source: Path, target: Path, size: int = THUMB_SIZE) -> None:
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        raise ImageDecodeError("missing", f"{source}: {exc.strerror or exc}") from exc
    # draft() lets libjpeg decode at 1/2..1/8 scale: most of the cost of a thumbnail is decode.
    image = decode_image(data, draft_size=size)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            image.save(out, "JPEG", quality=THUMB_QUALITY, optimize=True)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
