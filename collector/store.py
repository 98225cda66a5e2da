"""The content-addressed image store: verified image bytes -> a file, atomically.

Files go to `images/ab/abcdef....ext` named by sha256: written to a temp file in the same
folder, then renamed, so a kill -9 leaves either the whole file or a `*.tmp` that
`ImageStore.sweep()` removes on the next start. No fsync per file (it halved throughput
here): a crash of the machine itself is covered instead by the crawl's start-up check, which
sends rows whose file is missing or short back to pending.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


class ImageStore:
    """Content-addressed files under `root/images/`; paths are relative to `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.images = self.root / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self._folders: set[Path] = set()

    def relative_path(self, sha256: str, extension: str) -> str:
        return f"images/{sha256[:2]}/{sha256}.{extension}"

    def put(self, data: bytes, sha256: str, extension: str) -> str:
        relative = self.relative_path(sha256, extension)
        final = self.root / relative
        if final.parent not in self._folders:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._folders.add(final.parent)
        # A unique temp name without mkstemp's retries: the content hash plus who writes it.
        # Same content from two writers is harmless: the last rename wins with equal bytes.
        tmp = final.parent / f".{sha256}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return relative

    def sweep(self) -> int:
        """Remove temp files a killed run left behind; returns how many."""
        removed = 0
        for tmp in self.images.glob("*/.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
        return removed
