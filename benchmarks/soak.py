"""`make soak`: hold a steady load for a set time and say whether memory or latency drift.

A leak or a slowly growing queue does not show in a 20-second benchmark. The soak starts the
service (or targets one already running with --host), runs Locust at a steady rate (users
with a think time, below saturation), samples the RSS of every server process every few
seconds, and compares the first and last fifth of the run (after a warm-up):
  memory drift   last-fifth RSS above first-fifth RSS by more than --max-rss-growth-mb and
                 still rising over the second half (--max-rss-slope-mb-per-min);
  latency drift  last-fifth p95 above first-fifth p95 by more than --max-p95-growth.
It writes soak.json, soak_samples.csv and soak.png (RSS and latency over time) to --out.

    python -m benchmarks.soak --model runs/demo/export/model.onnx --duration-s 600
    python -m benchmarks.soak --host http://127.0.0.1:3000 --duration-s 300
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import psutil
from pydantic import Field
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict
from rich.console import Console

from loadtests.locust_run import run_locust
from loadtests.servers import REPO, process_role, start_bentoml

console = Console()


class SoakConfig(BaseSettings):
    """Steady load for a set time; reports memory (RSS) and latency drift of the server."""

    model_config = SettingsConfigDict(cli_prog_name="python -m benchmarks.soak",
                                      cli_kebab_case=True, cli_implicit_flags=True,
                                      env_prefix="SOAK_")

    model: str | None = Field(None, description=(
        "start `bentoml serve` with this MODEL_TAG (BentoML tag or .onnx path)"))
    host: str | None = Field(None, description=(
        "instead, soak a server already running at this URL on 127.0.0.1 (its processes "
        "are found by the port it listens on)"))
    duration_s: float = Field(600.0, gt=0, description="seconds of steady load")
    warmup_s: float = Field(30.0, ge=0, description="first seconds left out of the comparison")
    users: int = Field(8, ge=1, description="concurrent users")
    think_time_s: float = Field(0.2, ge=0, description=(
        "pause of each user between requests: keeps the load steady and below saturation"))
    sample_every_s: float = Field(2.0, gt=0, description="RSS sampling period")
    photos_per_label: int = Field(3, ge=1, description="photos per label, each in every size")
    max_rss_growth_mb: float = Field(50.0, gt=0, description=(
        "memory drift: RSS of the last fifth above the first fifth by more than this..."))
    max_rss_slope_mb_per_min: float = Field(1.0, gt=0, description=(
        "...and still rising faster than this over the second half of the run (growth that "
        "levels off, e.g. ONNX Runtime's arena sizing itself to a new batch shape, is reported "
        "but is not drift)"))
    max_p95_growth: float = Field(0.25, gt=0, description="latency drift threshold (fraction)")
    cpu_split: Literal["pinned", "shared"] = Field("pinned", description=(
        "pinned: a server started here on --server-cpus, Locust on --loadgen-cpus"))
    server_cpus: str = Field("1")
    loadgen_cpus: str = Field("0")
    out: Path = Field(REPO / "reports" / "soak", description="where reports are written")

    def cli_cmd(self) -> None:
        report = run_soak(self)
        raise SystemExit(1 if report.memory_drift or report.latency_drift else 0)


@dataclass
class SoakReport:
    duration_s: float
    requests: int
    failures: int
    rps: float
    rss_first_mb: float
    rss_last_mb: float
    rss_slope_mb_per_min: float
    rss_slope_last_half_mb_per_min: float   # ~0: grew, then levelled off; > 0: still growing
    rss_growth_by_role_mb: dict
    p50_first_ms: float
    p50_last_ms: float
    p95_first_ms: float
    p95_last_ms: float
    memory_drift: bool
    latency_drift: bool
    samples: int


def server_processes(url: str) -> list[psutil.Process]:
    """Processes listening on URL's port, their `bentoml serve` supervisor and its children."""
    port = urlparse(url).port
    roots = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN \
                and conn.pid:
            roots.append(psutil.Process(conn.pid))
    found = {}
    for root in roots:
        # BentoML's API worker holds the listening socket; its `bentoml serve` supervisor
        # (the parent) also owns the model workers, which listen elsewhere.
        parent = root.parent()
        while parent is not None and "bentoml" in " ".join(parent.cmdline()):
            root, parent = parent, parent.parent()
        for proc in [root, *root.children(recursive=True)]:
            found[proc.pid] = proc
    return list(found.values())


class RssSampler(threading.Thread):
    """Samples the RSS of a process list every `period` seconds until stopped: the sum, and
    per process role so that growth can be pinned on the API or the model process."""

    def __init__(self, processes, period: float):
        super().__init__(daemon=True)
        self.processes, self.period = processes, period
        self.samples: list[tuple[float, float]] = []  # (unix time, MB summed)
        self.by_role: list[dict[str, float]] = []     # MB per role, same order
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            roles: dict[str, float] = {}
            for proc in self.processes():
                try:
                    mb = proc.memory_info().rss / 2**20
                except psutil.NoSuchProcess:
                    continue
                role = process_role(proc)
                roles[role] = roles.get(role, 0.0) + mb
            self.samples.append((time.time(), sum(roles.values())))
            self.by_role.append(roles)
            self.stopped.wait(self.period)


def _slope_per_min(points: list[tuple[float, float]]) -> float:
    if len(points) < 3:
        return math.nan
    xs = [t for t, _ in points]
    ys = [v for _, v in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    return 60 * sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var \
        if var else math.nan


def _fifths(points: list[tuple[float, float]], start: float) -> tuple[float, float]:
    """Median of the first and of the last fifth of the points after `start`."""
    kept = [v for t, v in points if t >= start and not math.isnan(v)]
    if len(kept) < 5:
        return math.nan, math.nan
    n = max(1, len(kept) // 5)
    return statistics.median(kept[:n]), statistics.median(kept[-n:])


def latency_history(csv_prefix: Path) -> tuple[list, list]:
    """(time, p50) and (time, p95) from Locust's per-second history (current 10 s window)."""
    p50, p95 = [], []
    with open(f"{csv_prefix}_stats_history.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["Name"] != "Aggregated" or row["50%"] in ("N/A", "0"):
                continue
            p50.append((float(row["Timestamp"]), float(row["50%"])))
            p95.append((float(row["Timestamp"]), float(row["95%"])))
    return p50, p95


def plot(rss, p50, p95, path: Path, warmup_end: float | None = None) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    t0 = min(t for t, _ in rss + p50) if rss or p50 else 0
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot([t - t0 for t, _ in rss], [v for _, v in rss], color="tab:blue")
    top.set_ylabel("server RSS (MB)")
    bottom.plot([t - t0 for t, _ in p50], [v for _, v in p50], label="p50")
    bottom.plot([t - t0 for t, _ in p95], [v for _, v in p95], label="p95")
    bottom.set_ylabel("latency (ms, 10 s window)")
    bottom.set_xlabel("seconds")
    if warmup_end is not None:
        for axis in (top, bottom):
            axis.axvline(warmup_end - t0, color="grey", linestyle=":", label="end of warm-up")
    bottom.legend()
    fig.suptitle("soak: memory and latency over time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_soak(config: SoakConfig) -> SoakReport:
    config.out.mkdir(parents=True, exist_ok=True)
    pinned = config.cpu_split == "pinned"
    server = None
    if config.host:
        host = config.host
        processes = lambda: server_processes(host)  # re-read: workers may restart
        if not processes():
            raise SystemExit(f"nothing listens on {host}: start the service first "
                             "(make serve) or pass --model")
    elif config.model:

        server = start_bentoml(config.model, log_dir=config.out, name="soak-service",
                               cpus=config.server_cpus if pinned else None)
        host = server.url
        processes = server.tree
        console.print(f"service ready in {server.cold_start_s:.1f}s at {host}")
    else:
        raise SystemExit("give --model MODEL_TAG_OR_ONNX (start a service) or --host URL")
    sampler = RssSampler(processes, config.sample_every_s)
    csv_prefix = config.out / "soak"
    console.print(f"soaking {host} for {config.duration_s:.0f}s: {config.users} users, "
                  f"{config.think_time_s}s think time")
    try:
        sampler.start()
        load = run_locust(host, config.users, config.duration_s, csv_prefix,
                          cpus=config.loadgen_cpus if pinned else None, full_history=True,
                          html=config.out / "soak.html", timeout_s=config.duration_s + 120,
                          extra=["--think-time", str(config.think_time_s),
                                 "--photos-per-label", str(config.photos_per_label)])
    finally:
        sampler.stopped.set()
        sampler.join()
        if server:
            server.stop()
    start = sampler.samples[0][0] + config.warmup_s if sampler.samples else 0
    rss_first, rss_last = _fifths(sampler.samples, start)
    kept = [p for p in sampler.samples if p[0] >= start]
    last_half = kept[len(kept) // 2:]
    growth_by_role = {}
    for role in sorted({r for roles in sampler.by_role for r in roles}):
        series = [(t, roles.get(role, math.nan))
                  for (t, _), roles in zip(sampler.samples, sampler.by_role, strict=True)]
        first, last = _fifths(series, start)
        growth_by_role[role] = round(last - first, 1)
    p50, p95 = latency_history(csv_prefix)
    p50_first, p50_last = _fifths(p50, start)
    p95_first, p95_last = _fifths(p95, start)
    report = SoakReport(
        duration_s=config.duration_s, requests=load.requests, failures=load.failures,
        rps=load.rps, rss_first_mb=rss_first, rss_last_mb=rss_last,
        rss_slope_mb_per_min=_slope_per_min(kept),
        rss_slope_last_half_mb_per_min=_slope_per_min(last_half),
        rss_growth_by_role_mb=growth_by_role,
        p50_first_ms=p50_first, p50_last_ms=p50_last, p95_first_ms=p95_first,
        p95_last_ms=p95_last,
        memory_drift=(rss_last - rss_first > config.max_rss_growth_mb
                      and _slope_per_min(last_half) > config.max_rss_slope_mb_per_min),
        latency_drift=p95_last > p95_first * (1 + config.max_p95_growth),
        samples=len(sampler.samples))
    with (config.out / "soak_samples.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        roles = sorted(growth_by_role)
        writer.writerow(["unix_time", "rss_mb", *(f"rss_mb_{role}" for role in roles)])
        for (t, total), by_role in zip(sampler.samples, sampler.by_role, strict=True):
            writer.writerow([t, round(total, 1), *(round(by_role.get(r, math.nan), 1)
                                                   for r in roles)])
    (config.out / "soak.json").write_text(json.dumps(asdict(report), indent=2))
    picture = plot(sampler.samples, p50, p95, config.out / "soak.png", warmup_end=start)
    verdict = lambda drift: "[red]DRIFT[/]" if drift else "[green]stable[/]"
    console.print(
        f"{load.requests} requests, {load.failures} failures, {load.rps:.1f} req/s\n"
        f"memory  {verdict(report.memory_drift)}: RSS {rss_first:.0f} -> {rss_last:.0f} MB "
        f"(first vs last fifth), slope {report.rss_slope_mb_per_min:+.2f} MB/min, over the "
        f"second half {report.rss_slope_last_half_mb_per_min:+.2f} MB/min; growth by process: "
        + ", ".join(f"{role} {mb:+.0f} MB" for role, mb in growth_by_role.items()) + "\n"
        f"latency {verdict(report.latency_drift)}: p50 {p50_first:.0f} -> {p50_last:.0f} ms, "
        f"p95 {p95_first:.0f} -> {p95_last:.0f} ms\n"
        f"[dim]written: {config.out}/soak.json, soak_samples.csv, soak.html"
        + (f", {picture.name}" if picture else "") + "[/]")
    return report


def main() -> None:
    CliApp.run(SoakConfig)


if __name__ == "__main__":
    main()
