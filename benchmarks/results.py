"""What the serving benchmarks measure, as plain records, and small helpers on them.

`bench_serve` fills them, `report` renders them, `soak`/`ab_serve`/`bench_service` share the
percentile, every benchmark the commit it records; kept apart so that the report and the
runner do not import each other.
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtests.locust_run import LoadResult

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The checkout's short commit, recorded with every figure ("unknown" outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values` by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Step:
    variant: str
    users: int
    load: LoadResult
    mean_batch: float = math.nan
    batches: int = 0
    server_cpu_pct: float = math.nan
    req_per_cpu_s: float = math.nan   # requests per CPU-second of all server processes
    rss_mb: float = math.nan


@dataclass
class BenchResult:
    started: str
    machine: str
    cpu_split: str
    threads: int
    decode_ms: dict[str, float]
    ceiling: dict[str, list[dict]]
    cold_start_s: dict[str, float]
    cold_start_cpu_s: dict[str, float] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    not_measured: dict[str, str] = field(default_factory=dict)   # variant -> why
    profile: dict[str, float] = field(default_factory=dict)      # stage -> % of CPU samples
    served: dict[str, str] = field(default_factory=dict)  # variant -> runtime-precision (/model)


def save(result: BenchResult, out: Path) -> Path:
    path = out / "bench_serve.json"
    path.write_text(json.dumps(asdict(result), indent=2, default=str))
    return path


def load_result(path: Path) -> BenchResult:
    """A saved bench_serve.json back into a BenchResult."""
    data = json.loads(Path(path).read_text())
    steps = [Step(**{**step, "load": LoadResult(**step["load"])}) for step in data.pop("steps")]
    return BenchResult(**data, steps=steps)
