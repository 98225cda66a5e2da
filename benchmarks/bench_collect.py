"""`make bench-collect`: the collector vs img2dataset on the same image URLs, side by side.

The demo shop serves a catalog (datasets/clothing-small/train when present, see
benchmarks/datasets.py, else the bundled demo catalog) from its own process on 127.0.0.1, faults off. Both tools get the same
URL list and run as their CLIs, each from a cold start into an empty folder, alternating:

  collector    `collector crawl` with url_lists (validation: full decode, min side, phash;
               dedup on; content-addressed atomic files; SQLite manifest)
  img2dataset  its defaults (1 process, 256 threads, re-encode on) with `--resize_mode no`

images/s = images each tool stored / wall seconds of its whole command. Medians over repeats.
The load average (1 min) at the start and end is printed and kept in results.json: on shared
cores the ratio moves with it (img2dataset's 256 threads suffer more from a busy machine),
so a figure without its load is not comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import yaml
from rich.console import Console
from rich.table import Table

from benchmarks.datasets import CLOTHING_SMALL

REPO = Path(__file__).resolve().parents[1]
SHARED_TRAIN = CLOTHING_SMALL / "train"
console = Console()


def start_shop(catalog: Path, port: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector.demo_shop", "--catalog", str(catalog),
         "--port", str(port), "--faults", "none"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    if not line.startswith("demo shop: "):
        proc.kill()
        raise SystemExit(f"demo shop did not start: {line}")
    return proc, line.split()[2]


def url_lists(shop_url: str, folder: Path) -> dict[str, Path]:
    plan = httpx.get(f"{shop_url}/_plan.json", timeout=30).json()
    by_label: dict[str, list[str]] = defaultdict(list)
    for pid, product in plan["products"].items():
        by_label[product["label"]].append(f"{shop_url}/img/{pid}/full.jpg")
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for label, urls in sorted(by_label.items()):
        files[label] = folder / f"urls-{label}.txt"
        files[label].write_text("\n".join(urls) + "\n")
    (folder / "urls.txt").write_text("".join(p.read_text() for p in files.values()))
    return files


def run_collector(files: dict[str, Path], out: Path, concurrency: int) -> tuple[int, float]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sources = out / "sources.yaml"
    sources.write_text(yaml.safe_dump({
        "output_dir": "collected",
        "url_lists": {label: str(path) for label, path in files.items()},
        "politeness": {"concurrency_per_host": concurrency,
                       "requests_per_second_per_host": 100000},
    }))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "collector", "crawl", str(sources)], cwd=REPO,
                   check=True, capture_output=True)
    seconds = time.perf_counter() - started
    db = sqlite3.connect(out / "collected" / "manifest.sqlite")
    stored = db.execute("SELECT COUNT(*) FROM images WHERE path IS NOT NULL").fetchone()[0]
    db.close()
    return stored, seconds


def run_img2dataset(binary: Path, url_file: Path, out: Path) -> tuple[int, float]:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run([str(binary), "--url_list", str(url_file), "--input_format", "txt",
                    "--output_folder", str(out), "--output_format", "files",
                    "--resize_mode", "no", "--enable_wandb", "False"],
                   cwd=out.parent, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    return len(list(out.rglob("*.jpg"))), seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_collect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path,
                        default=SHARED_TRAIN if SHARED_TRAIN.is_dir() else
                        REPO / "demo_data" / "catalog")
    parser.add_argument("--img2dataset", type=Path, default=REPO / ".venv-bench" / "bin" /
                        "img2dataset")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16,
                        help="collector requests in flight to the one host (default: 16)")
    parser.add_argument("--port", type=int, default=8799)
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "collect")
    args = parser.parse_args(argv)
    if not args.img2dataset.exists():
        raise SystemExit(f"{args.img2dataset} not found: `make bench-collect` installs it "
                         "into .venv-bench")

    shop, shop_url = start_shop(args.catalog, args.port)
    try:
        files = url_lists(shop_url, args.out)
        n_urls = sum(len(p.read_text().split()) for p in files.values())
        console.print(f"{n_urls} image URLs from {args.catalog} served at {shop_url}")
        load_start = os.getloadavg()[0]
        runs: dict[str, list[tuple[int, float]]] = {"collector": [], "img2dataset": []}
        for repeat in range(args.repeats):
            runs["collector"].append(run_collector(files, args.out / "collector",
                                                   args.concurrency))
            runs["img2dataset"].append(run_img2dataset(args.img2dataset,
                                                       args.out / "urls.txt",
                                                       args.out / "img2dataset"))
            console.print(f"repeat {repeat + 1}: " + ", ".join(
                f"{tool} {r[-1][0]} images in {r[-1][1]:.1f} s" for tool, r in runs.items()))
        load_end = os.getloadavg()[0]
    finally:
        shop.terminate()
        shop.wait(timeout=10)

    table = Table(title=f"bench-collect: {n_urls} URLs on 127.0.0.1, median of {args.repeats}, "
                        f"{os.cpu_count()} cores, load average {load_start:.1f} -> {load_end:.1f}")
    for column in ("tool", "images stored (median)", "seconds", "images/s"):
        table.add_column(column, justify="right")
    rates = {}
    for tool, results in runs.items():
        seconds = statistics.median(s for _, s in results)
        stored = int(statistics.median(n for n, _ in results))
        rates[tool] = statistics.median(n / s for n, s in results)
        table.add_row(tool, str(stored), f"{seconds:.1f}", f"{rates[tool]:.1f}")
    console.print(table)
    ratio = rates["collector"] / rates["img2dataset"]
    console.print(f"collector / img2dataset throughput: [bold]{ratio:.2f}x[/]")
    (args.out / "results.json").write_text(json.dumps(
        {"urls": n_urls, "catalog": str(args.catalog), "runs": runs, "images_per_s": rates,
         "ratio": ratio, "cores": os.cpu_count(), "load_average": [load_start, load_end],
         "concurrency": args.concurrency, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        indent=2))


if __name__ == "__main__":
    main()
