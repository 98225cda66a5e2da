"""`make soak-collect`: one crawl of the demo shop with every fault on, for a set time: does the
collector's memory stay flat, and does every image the shop offered end accounted for?

Why one long crawl of a big shop. The bundled catalogue (330 images) crawls in ~13 s, and a
soak is about one process living long: a leak per page or per image shows as RSS that keeps
rising, where crawls repeated in fresh processes would start from zero each time (and the
shop's one-shot faults, the 429s, 500 bursts and the captcha, would be spent after the first).
So the soak builds a catalogue sized to the duration (every label of --catalog, its photos
repeated as hard links until the shop lists about rate x duration products; a repeat is the
same bytes under another product, an exact duplicate for dedup to find, so disk use stays at
the catalogue's size), serves it from its own process with `--faults all`, and runs one
`collector crawl` through it at a fixed polite rate (politeness.requests_per_second_per_host =
--rate), which is how a real crawl spends its time and leaves the CPUs to whatever else runs.
The faults hit a fixed number of products per label (see collector.demo_shop), the same few
dozen however long the soak is.

Memory: the crawl process's RSS every --sample-every-s seconds: first, median, last and max
after --warmup-s (imports and the first pages), the slope per minute (least squares) over that
and over the second half; drift as in benchmarks/soak.py: the last fifth above the first fifth
by more than --max-rss-growth-mb and still rising over the second half faster than
--max-rss-slope-mb-per-min. (The crawl keeps a small record per stored image, to reuse a URL
seen under two labels: some growth is by design.) The crawl runs without the MALLOC_*
variables that training sets (no mmap, never trim: glibc then keeps every arena's high-water
mark; in a 240 s soak the crawl's RSS went 80 -> 112 MB, +8.3 MB/min, with them and 76 -> 79
MB, +0.7 MB/min, without), so it is measured as `collector crawl` runs; --inherit-malloc-env
keeps them.
Accounting: every (label, product) the shop listed (its /_plan.json) must be one manifest row,
at the image URL the shop offered, with a final status: ok / duplicate / conflict (stored),
rejected, failed or blocked; none missing, none extra, none pending.

    python -m benchmarks.soak_collect --duration-s 600
    python -m benchmarks.soak_collect --duration-s 60 --rate 20 --catalog demo_data/catalog

Writes results.json and rss_samples.csv to --out; exit status 1 when an image is not
accounted for, the crawl failed, or memory drifted.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import re
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict
from rich.console import Console
from rich.table import Table

from benchmarks.datasets import CLOTHING_SMALL
from benchmarks.results import git_commit
from benchmarks.soak import RssSampler, _fifths, _slope_per_min
from loadtests.servers import REPO, free_port, launch

console = Console(soft_wrap=True)   # one line per figure, also in a log
DEMO_CATALOG = REPO / "demo_data" / "catalog"
SHARED_TRAIN = CLOTHING_SMALL / "train"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
FINAL_STATUSES = ("ok", "duplicate", "conflict", "rejected", "failed", "blocked")
STORED = ("ok", "duplicate", "conflict")
# What `collector crawl` prints at the end (collector/cli.py).
_DONE = re.compile(r"done in ([\d.]+) s: (\d+) pages, (\d+) images \(([\d.]+)/s\), "
                   r"(\d+) requests, (\d+) retries")


class SoakCollectConfig(BaseSettings):
    """Crawl the demo shop with every fault on for about --duration-s seconds: the crawl
    process's RSS over time, and every image the shop listed accounted for."""

    model_config = SettingsConfigDict(cli_prog_name="python -m benchmarks.soak_collect",
                                      cli_kebab_case=True, cli_implicit_flags=True,
                                      env_prefix="SOAK_COLLECT_")

    duration_s: float = Field(600.0, gt=0, description=(
        "seconds the crawl should take: the shop lists about rate x duration products"))
    rate: float = Field(10.0, gt=0, description=(
        "requests per second the crawl makes to the shop "
        "(politeness.requests_per_second_per_host)"))
    catalog: Path = Field(SHARED_TRAIN if SHARED_TRAIN.is_dir() else DEMO_CATALOG,
                          description="ImageFolder whose photos the shop lists (repeated as "
                                      "needed); default clothing-small/train when present, "
                                      "else the bundled demo catalogue")
    warmup_s: float = Field(30.0, ge=0, description="first seconds left out of slopes and "
                                                    "the drift verdict")
    sample_every_s: float = Field(2.0, gt=0, description="RSS sampling period")
    max_rss_growth_mb: float = Field(50.0, gt=0, description=(
        "memory drift: RSS of the last fifth above the first fifth by more than this..."))
    max_rss_slope_mb_per_min: float = Field(1.0, gt=0, description=(
        "...and still rising faster than this over the second half"))
    inherit_malloc_env: bool = Field(False, description=(
        "run the crawl with this environment's MALLOC_* variables (training's MALLOC_MMAP_MAX_=0 "
        "and MALLOC_TRIM_THRESHOLD_, where set; by default the crawl runs without them, as "
        "`collector crawl` does)"))
    timeout_s: float | None = Field(None, gt=0, description=(
        "stop the crawl (SIGINT) after this long; default 2 x duration + 300 s"))
    out: Path = Field(REPO / "bench_out" / "soak_collect", description="where results go")

    def cli_cmd(self) -> None:
        report = run_soak_collect(self)
        raise SystemExit(0 if report.passed else 1)


SoakCollectConfig.__doc__ = inspect.cleandoc(SoakCollectConfig.__doc__ or "")  # --help as written


@dataclass
class Accounting:
    offered: int                       # (label, product) pairs the shop listed
    counts: dict[str, int]             # manifest rows by status
    reasons: dict[str, int]            # "status: reason" -> rows
    missing: list[str] = field(default_factory=list)    # listed, no row
    extra: list[str] = field(default_factory=list)      # a row the shop never listed
    not_final: list[str] = field(default_factory=list)  # pending / downloaded
    wrong_url: list[str] = field(default_factory=list)  # a row at another URL than offered

    @property
    def complete(self) -> bool:
        return self.offered > 0 and not (self.missing or self.extra or self.not_final
                                         or self.wrong_url)


@dataclass
class SoakCollectReport:
    started: str
    commit: str
    cores: int
    load_average: list[float]          # 1-minute load at start and end
    duration_s: float                  # asked for
    rate: float
    catalog: str
    labels: int
    products_per_label: int
    crawl_s: float                     # the crawl command's wall time
    crawl_cpu_s: float                 # its CPU seconds (user + system)
    malloc_env: dict[str, str]         # the MALLOC_* variables the crawl ran with
    exit_code: int | None
    timed_out: bool
    requests: int | None               # from the crawl's summary line
    retries: int | None
    accounting: Accounting
    rss_first_mb: float
    rss_median_mb: float
    rss_last_mb: float
    rss_max_mb: float
    rss_first_fifth_mb: float
    rss_last_fifth_mb: float
    rss_slope_mb_per_min: float        # after the warm-up
    rss_slope_last_half_mb_per_min: float
    memory_drift: bool
    samples: int

    @property
    def passed(self) -> bool:
        return self.exit_code == 0 and self.accounting.complete and not self.memory_drift


def products_per_label(rate: float, duration_s: float, labels: int) -> int:
    """Products per label for a crawl of about `duration_s` at `rate` requests/s: each listed
    image is one request, a listing page (12 cards) one more, and ~8 % is left for retries,
    the shop's Retry-After and captcha pauses, and its planted copies."""
    images = rate * duration_s * 0.92 / (1 + 1 / 12)
    return max(2, round(images / labels) - 2)


def build_catalog(source: Path, folder: Path, per_label: int) -> dict[str, int]:
    """`folder`/LABEL/NNNNN-PHOTO: `per_label` entries per label of `source`, its photos in
    turn (hard links where possible); returns the number of distinct photos per label."""
    shutil.rmtree(folder, ignore_errors=True)
    distinct = {}
    for label_dir in sorted(p for p in source.iterdir() if p.is_dir()
                            and not p.name.startswith(".")):
        photos = sorted(p for p in label_dir.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
        if not photos:
            continue
        target = folder / label_dir.name
        target.mkdir(parents=True)
        for i in range(per_label):
            photo = photos[i % len(photos)]
            link = target / f"{i:05d}-{photo.name}"
            try:
                os.link(photo.resolve(), link)
            except OSError:
                shutil.copyfile(photo, link)
        distinct[label_dir.name] = min(per_label, len(photos))
    if not distinct:
        raise SystemExit(f"{source}: no label folders with photos (expected LABEL/*.jpg)")
    return distinct


def offered_path(pid: str, faults: list[str]) -> str:
    """The image URL path the shop's cards offer for a product (DemoShop.image_url)."""
    base = "/private/img" if "robots" in faults else "/out" if "offsite" in faults else "/img"
    return f"{base}/{pid}/full.jpg"


def account(plan: dict, manifest: Path) -> Accounting:
    """Every (label, product) of the shop's plan against the manifest's image rows."""
    offered = {(label, pid): offered_path(pid, plan["products"][pid]["faults"])
               for label, ids in plan["listings"].items() for pid in ids}
    db = sqlite3.connect(f"file:{manifest}?mode=ro", uri=True)
    try:
        got = db.execute("SELECT label, product_id, url, status, reason FROM images "
                         "ORDER BY id").fetchall()
    finally:
        db.close()
    result = Accounting(offered=len(offered), counts=dict(Counter(r[3] for r in got)),
                        reasons=dict(Counter(f"{r[3]}: {r[4]}" for r in got if r[4]
                                             and r[3] not in STORED)))
    seen = set()
    for label, pid, url, status, _reason in got:
        key, name = (label, pid), f"{label}/{pid}"
        if key not in offered or key in seen:
            result.extra.append(name)
            continue
        seen.add(key)
        if urlsplit(url).path != offered[key]:
            result.wrong_url.append(f"{name}: {urlsplit(url).path}")
        if status not in FINAL_STATUSES:
            result.not_final.append(f"{name}: {status}")
    result.missing = sorted(f"{label}/{pid}" for label, pid in set(offered) - seen)
    return result



def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def soak_sources(shop_sources: Path, rate: float) -> Path:
    """The shop's own sources file at the soak's rate, with limits that never cut it short."""
    config = yaml.safe_load(shop_sources.read_text())
    config["politeness"]["requests_per_second_per_host"] = rate
    config["limits"] = {"max_pages": 100_000, "max_images_per_label": 1_000_000}
    shop_sources.write_text(yaml.safe_dump(config, sort_keys=False))
    return shop_sources


def run_soak_collect(config: SoakCollectConfig) -> SoakCollectReport:
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    source_labels = [p for p in config.catalog.iterdir() if p.is_dir()
                     and not p.name.startswith(".")]
    per_label = products_per_label(config.rate, config.duration_s, max(1, len(source_labels)))
    distinct = build_catalog(config.catalog, out / "catalog", per_label)
    shutil.rmtree(out / "collected", ignore_errors=True)
    sources = out / "sources.yaml"
    port = free_port()
    shop = launch("soak-shop", [sys.executable, "-m", "collector.demo_shop", "--catalog",
                                str(out / "catalog"), "--port", str(port), "--faults", "all",
                                "--write-sources", str(sources), "--output-dir", "collected"],
                  port=port, log_dir=out, ready_path="/robots.txt", timeout_s=300)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    commit = git_commit()                # the code the crawl runs (HEAD may move meanwhile)
    load_start = os.getloadavg()[0]
    timeout_s = config.timeout_s or 2 * config.duration_s + 300
    timed_out = False
    try:
        plan = httpx.get(f"{shop.url}/_plan.json", timeout=60).json()
        soak_sources(sources, config.rate)
        n_listed = sum(len(set(ids)) for ids in plan["listings"].values())
        console.print(f"soak-collect: {n_listed} images listed by {len(distinct)} labels x "
                      f"{per_label} products ({sum(distinct.values())} distinct photos from "
                      f"{config.catalog}), every fault on, at {config.rate:g} requests/s for "
                      f"~{config.duration_s:.0f} s; load average {load_start:.1f}")
        env = {key: value for key, value in os.environ.items()
               if config.inherit_malloc_env or not key.startswith("MALLOC_")}
        cpu_before = _children_cpu_s()
        with (out / "crawl.log").open("wb") as log:
            crawl_started = time.perf_counter()
            crawl = subprocess.Popen([sys.executable, "-m", "collector", "crawl", str(sources)],
                                     cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        watched = psutil.Process(crawl.pid)
        sampler = RssSampler(lambda: [watched], config.sample_every_s)
        sampler.start()
        try:
            crawl.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            crawl.send_signal(signal.SIGINT)   # "interrupted": the manifest keeps its work
            try:
                crawl.wait(timeout=60)
            except subprocess.TimeoutExpired:
                crawl.kill()
                crawl.wait(timeout=30)
        finally:
            sampler.stopped.set()
            sampler.join()
            if crawl.poll() is None:
                crawl.kill()
                crawl.wait(timeout=30)
        crawl_s = time.perf_counter() - crawl_started
        crawl_cpu_s = _children_cpu_s() - cpu_before
    finally:
        shop.stop()
    load_end = os.getloadavg()[0]
    manifest = out / "collected" / "manifest.sqlite"
    accounting = (account(plan, manifest) if manifest.exists() else
                  Accounting(offered=len({(label, pid) for label, ids in plan["listings"].items()
                                          for pid in ids}), counts={}, reasons={},
                             missing=["(no manifest)"]))
    done = _DONE.search((out / "crawl.log").read_text(errors="replace"))

    samples = [(t, mb) for t, mb in sampler.samples if mb > 0]   # 0: the process had ended
    warm = samples[0][0] + config.warmup_s if samples else 0.0
    kept = [p for p in samples if p[0] >= warm]    # after the warm-up (imports, first pages)
    values = [mb for _, mb in kept]
    first_fifth, last_fifth = _fifths(samples, warm)
    slope_half = _slope_per_min(kept[len(kept) // 2:])
    nan = math.nan
    report = SoakCollectReport(
        started=started, commit=commit, cores=os.cpu_count() or 0,
        load_average=[round(load_start, 2), round(load_end, 2)],
        duration_s=config.duration_s, rate=config.rate, catalog=str(config.catalog),
        labels=len(distinct), products_per_label=per_label, crawl_s=round(crawl_s, 1),
        crawl_cpu_s=round(crawl_cpu_s, 1),
        malloc_env={k: v for k, v in env.items() if k.startswith("MALLOC_")},
        exit_code=crawl.returncode, timed_out=timed_out,
        requests=int(done.group(5)) if done else None,
        retries=int(done.group(6)) if done else None, accounting=accounting,
        rss_first_mb=values[0] if values else nan,
        rss_median_mb=statistics.median(values) if values else nan,
        rss_last_mb=values[-1] if values else nan, rss_max_mb=max(values, default=nan),
        rss_first_fifth_mb=first_fifth, rss_last_fifth_mb=last_fifth,
        rss_slope_mb_per_min=_slope_per_min(kept),
        rss_slope_last_half_mb_per_min=slope_half,
        memory_drift=(last_fifth - first_fifth > config.max_rss_growth_mb
                      and slope_half > config.max_rss_slope_mb_per_min),
        samples=len(samples))
    with (out / "rss_samples.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seconds", "rss_mb"])
        for t, mb in samples:
            writer.writerow([round(t - samples[0][0], 2), round(mb, 1)])
    (out / "results.json").write_text(json.dumps(asdict(report), indent=2))
    show(report, out)
    return report


def show(report: SoakCollectReport, out: Path) -> None:
    a = report.accounting
    verdict = "[red]DRIFT[/]" if report.memory_drift else "[green]stable[/]"
    ended = ("timed out (stopped with SIGINT)" if report.timed_out
             else f"exit status {report.exit_code}")
    console.print(
        f"crawl: {report.crawl_s:.0f} s, {ended}, {report.crawl_cpu_s:.0f} CPU s, "
        f"{report.requests if report.requests is not None else '?'} requests, "
        f"{report.retries if report.retries is not None else '?'} retries; load average "
        f"{report.load_average[0]:.1f} -> {report.load_average[1]:.1f} on {report.cores} cores; "
        f"malloc env: {' '.join(f'{k}={v}' for k, v in report.malloc_env.items()) or 'none'}")
    console.print(
        f"memory {verdict}: RSS first {report.rss_first_mb:.0f} MB, median "
        f"{report.rss_median_mb:.0f}, last {report.rss_last_mb:.0f}, max "
        f"{report.rss_max_mb:.0f} MB; first -> last fifth {report.rss_first_fifth_mb:.0f} -> "
        f"{report.rss_last_fifth_mb:.0f} MB; slope {report.rss_slope_mb_per_min:+.2f} MB/min "
        f"(second half {report.rss_slope_last_half_mb_per_min:+.2f}); {report.samples} samples")
    table = Table(title=f"{a.offered} images listed: where each one ended")
    table.add_column("status")
    table.add_column("images", justify="right")
    for status in (*FINAL_STATUSES, *sorted(set(a.counts) - set(FINAL_STATUSES))):
        if a.counts.get(status):
            table.add_row(status, str(a.counts[status]))
    table.add_row("[bold]all rows", f"[bold]{sum(a.counts.values())}")
    console.print(table)
    console.print("left out, by reason: " + ", ".join(
        f"{reason} {n}" for reason, n in sorted(a.reasons.items(), key=lambda kv: -kv[1])))
    if a.complete:
        console.print(f"[green]accounted for[/]: all {a.offered} listed images have one row "
                      "at the offered URL with a final status")
    else:
        for what, names in (("missing", a.missing), ("extra", a.extra),
                            ("not final", a.not_final), ("at another URL", a.wrong_url)):
            if names:
                console.print(f"[red]{len(names)} {what}[/]: {', '.join(names[:10])}"
                              + (" ..." if len(names) > 10 else ""))
    console.print(f"[dim]written: {out}/results.json, rss_samples.csv, crawl.log[/]")


def main() -> None:
    CliApp.run(SoakCollectConfig)


if __name__ == "__main__":
    main()
