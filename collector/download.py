"""Image bytes -> a verified file in the content-addressed store, atomically.

The byte cap is enforced while streaming (and up front from Content-Length), so a 2 GB "image"
costs at most `max_bytes` of memory. Files go to `images/ab/abcdef....ext` named by sha256:
written to a temp file in the same folder, then renamed, so a kill -9 leaves either the whole
file or a `*.tmp` that `ImageStore.sweep()` removes on the next start. No fsync per file (it
halved throughput here): a crash of the machine itself is covered instead by the crawl's
start-up check, which sends rows whose file is missing or short back to pending.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import httpx

from collector.fetch import FetchError


async def read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise FetchError("too_large", f"Content-Length {declared} > {max_bytes} bytes",
                         http_status=response.status_code)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise FetchError("too_large", f"more than {max_bytes} bytes",
                             http_status=response.status_code)
        chunks.append(chunk)
    return b"".join(chunks)


class ImageStore:
    """Content-addressed files under `root/images/`; paths are relative to `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.images = self.root / "images"
        self.images.mkdir(parents=True, exist_ok=True)

    def relative_path(self, sha256: str, extension: str) -> str:
        return f"images/{sha256[:2]}/{sha256}.{extension}"

    def put(self, data: bytes, sha256: str, extension: str) -> str:
        relative = self.relative_path(sha256, extension)
        final = self.root / relative
        if final.exists() and final.stat().st_size == len(data):
            return relative                      # same content already stored (dup or resume)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return relative

    def sweep(self) -> int:
        """Remove temp files a killed run left behind; returns how many."""
        removed = 0
        for tmp in self.images.glob("*/.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
        return removed
