"""The content-addressed image store: verified image bytes -> a file, atomically.

Files go to `images/ab/abcdef....ext` named by sha256: written to a temp file in the same
folder, then renamed, so a kill -9 leaves either the whole file or a `*.tmp` that
`ImageStore.sweep()` removes on the next start. No fsync per file (it halved throughput
here): a crash of the machine itself is covered instead by the crawl's start-up check, which
sends rows whose file is missing or short back to pending.

A full disk is not a bad image. The first write the disk refuses (ENOSPC, EDQUOT) removes its
temp file and makes the store refuse every later write without touching the disk, so the
crawl can stop cleanly (`out_of_space` tells such errors apart, SQLite's too), and a
`SpaceReserve` beside the manifest, given back at that moment, leaves room for the
manifest's last commit.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import threading
from pathlib import Path

# What a disk says when it is full: no space, or the user's quota is used up.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# SQLite's codes for a write the disk refused: SQLITE_FULL is its ENOSPC; EDQUOT comes back as
# a write I/O error, and a shared-memory index it could not grow as SHMSIZE.
_SQLITE_NO_SPACE = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR_WRITE,
                              sqlite3.SQLITE_IOERR_SHMSIZE})
RESERVE_FILE = ".space-reserve"
RESERVE_BYTES = 1 << 20   # a commit of ~100 image rows needs well under this much WAL


def out_of_space(exc: BaseException) -> bool:
    """True for a write the disk refused for want of space or quota: an OSError with ENOSPC
    or EDQUOT, or SQLite's 'database or disk is full' (and its EDQUOT / shm-size errors)."""
    if isinstance(exc, OSError):
        return exc.errno in NO_SPACE_ERRNOS
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code in _SQLITE_NO_SPACE or "disk is full" in str(exc)
    return False


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


class ImageStore:
    """Content-addressed files under `root/images/`; paths are relative to `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.images = self.root / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self._folders: set[Path] = set()
        self._lock = threading.Condition()
        self._writing = 0
        self.refused: OSError | None = None   # the write that stopped the store, if any

    def relative_path(self, sha256: str, extension: str) -> str:
        return f"images/{sha256[:2]}/{sha256}.{extension}"

    def put(self, data: bytes, sha256: str, extension: str) -> str:
        """Write the file (atomically) and return its path relative to root. Raises OSError;
        after a no-space error every later call raises ENOSPC without writing."""
        relative = self.relative_path(sha256, extension)
        final = self.root / relative
        with self._lock:
            if self.refused is not None:
                raise OSError(errno.ENOSPC, "not written: the store stopped after "
                                            f"{self.refused}", str(final))
            self._writing += 1
        # A unique temp name without mkstemp's retries: the content hash plus who writes it.
        # Same content from two writers is harmless: the last rename wins with equal bytes.
        tmp = final.parent / f".{sha256}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            if final.parent not in self._folders:
                final.parent.mkdir(parents=True, exist_ok=True)
                self._folders.add(final.parent)
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if out_of_space(exc):
                refused = OSError(exc.errno, exc.strerror, str(final))
                self.stop_writes(refused, wait=False)
                raise refused from exc
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            with self._lock:
                self._writing -= 1
                self._lock.notify_all()
        return relative

    def stop_writes(self, reason: OSError, wait: bool = True, timeout: float = 30.0) -> None:
        """Refuse every later write (the first reason is kept); with `wait`, return once the
        writes in progress have ended (local file writes: quick), so nothing else takes the
        space a SpaceReserve gives back."""
        with self._lock:
            if self.refused is None:
                self.refused = reason
            if wait:
                self._lock.wait_for(lambda: self._writing == 0, timeout=timeout)

    def sweep(self) -> int:
        """Remove temp files a killed run left behind; returns how many."""
        removed = 0
        for tmp in self.images.glob("*/.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
        return removed


class SpaceReserve:
    """A file of `size` bytes (RESERVE_FILE in `folder`) held while a crawl runs and removed
    when the disk fills, so that the manifest beside it can still commit what was finished.
    `hold` raises the disk's OSError (ENOSPC) when even that much space is not there."""

    def __init__(self, folder: Path, size: int = RESERVE_BYTES):
        self.path = Path(folder) / RESERVE_FILE
        self.size = size

    def hold(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if self.path.stat().st_size == self.size:
                return                   # left by a killed run: still ours
        except FileNotFoundError:
            pass
        try:
            with open(self.path, "wb") as handle:
                try:   # allocated, not sparse: a hole would give nothing back
                    os.posix_fallocate(handle.fileno(), 0, self.size)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
                    handle.write(b"\0" * self.size)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
