"""Where the benchmarks find clothing-small: 3,409 real clothing photos in 10 classes (CC0).

Get it once (e.g. `git clone https://github.com/alexeygrigorev/clothing-dataset-small`) and
link or copy it to `datasets/clothing-small` in the checkout (ignored by git), or pass the
benchmark's `--data`/`--catalog` flag. It holds `train/`, `validation/` and `test/` folders.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLOTHING_SMALL = REPO / "datasets" / "clothing-small"


def require(path: Path) -> Path:
    """`path` if it is a folder, else SystemExit saying how to get clothing-small there."""
    if not path.is_dir():
        raise SystemExit(f"{path} not found: put clothing-small there "
                         f"(ln -s /path/to/clothing-small {CLOTHING_SMALL.relative_to(REPO)}), "
                         "or pass its folder explicitly; see benchmarks/datasets.py")
    return path
