"""Run the locustfile headless as a subprocess and read its CSV stats back.

The benchmark and the soak drive Locust exactly as a user does from the shell (same flags,
same reports), so their figures can be reproduced by hand with the printed command.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.servers import REPO, pinned

LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
BIN = Path(sys.executable).parent


@dataclass
class LoadResult:
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float
    duration_s: float
    loadgen_cpu_pct: float          # load generator CPU use: near 100% means it was the limit
    failure_reasons: dict[str, int] = field(default_factory=dict)
    exit_code: int | None = None    # Locust exits 1 when any request failed
    csv_prefix: str = ""
    command: str = ""


def locust_command(host: str, users: int, run_time_s: float, csv_prefix: Path, *,
                   spawn_rate: float | None = None, html: Path | None = None,
                   extra: list[str] = (), full_history: bool = False) -> list[str]:
    command = [str(BIN / "locust"), "-f", str(LOCUSTFILE.relative_to(REPO)), "--headless",
               "--host", host, "-u", str(users), "-r", str(spawn_rate or users),
               "-t", f"{max(1, round(run_time_s))}s", "--csv", str(csv_prefix),
               "--only-summary", "--loglevel", "WARNING", "--stop-timeout", "10"]
    if html:
        command += ["--html", str(html)]
    if full_history:
        command.append("--csv-full-history")
    return command + list(extra)


def _number(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_stats(csv_prefix: Path, duration_s: float = math.nan) -> LoadResult:
    """The 'Aggregated' row of Locust's <prefix>_stats.csv, plus failure reasons."""
    with open(f"{csv_prefix}_stats.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    total = next(row for row in rows if row["Name"] == "Aggregated")
    reasons: dict[str, int] = {}
    failures_csv = Path(f"{csv_prefix}_failures.csv")
    if failures_csv.is_file():
        with failures_csv.open(newline="") as handle:
            for row in csv.DictReader(handle):
                reasons[f"{row['Name']}: {row['Error']}"] = int(row["Occurrences"])
    return LoadResult(
        requests=int(total["Request Count"]), failures=int(total["Failure Count"]),
        rps=_number(total["Requests/s"]), p50_ms=_number(total["50%"]),
        p95_ms=_number(total["95%"]), p99_ms=_number(total["99%"]),
        avg_ms=_number(total["Average Response Time"]), duration_s=duration_s,
        loadgen_cpu_pct=math.nan, failure_reasons=reasons, csv_prefix=str(csv_prefix))


def run_locust(host: str, users: int, run_time_s: float, csv_prefix: Path, *,
               cpus: str | None = None, extra: list[str] = (), html: Path | None = None,
               full_history: bool = False, timeout_s: float | None = None) -> LoadResult:
    """Run Locust headless to completion (bounded by -t and a hard timeout) and parse it."""
    csv_prefix.parent.mkdir(parents=True, exist_ok=True)
    command = pinned(locust_command(host, users, run_time_s, csv_prefix, html=html,
                                    extra=extra, full_history=full_history), cpus)
    log_path = Path(f"{csv_prefix}.log")
    cpu_report = Path(f"{csv_prefix}_cpu.json")
    command = [*command, "--cpu-report", str(cpu_report)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if not Path(f"{csv_prefix}_stats.csv").is_file():
        raise RuntimeError(f"locust wrote no stats (exit {process.returncode}); see {log_path}:\n"
                           + log_path.read_text(errors="replace")[-2000:])
    result = read_stats(csv_prefix, duration_s=run_time_s)
    if cpu_report.is_file():  # measured from test start to stop, photo loading excluded
        result.loadgen_cpu_pct = json.loads(cpu_report.read_text())["cpu_pct"]
    result.command = " ".join(command)
    result.exit_code = process.returncode
    return result
