"""`make demo`: the whole pipeline end to end, offline, on the bundled CC0 catalog.

shop (faults on) -> crawl -> export split -> fine-tune -> ONNX export + verify -> BentoML store
-> `bentoml serve` -> classify held-out photos -> short Locust burst -> stop everything.

Each step is the same CLI a user runs; this file only strings them together, prints what
happened and cleans up its servers on success, failure and Ctrl-C. `--small` is the size the
end-to-end test runs in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from loadtests.servers import ServerNotReady, ServerProcess, free_port, launch, start_bentoml

REPO = Path(__file__).resolve().parent
CATALOG = REPO / "demo_data" / "catalog"
console = Console()


class StepFailed(RuntimeError):
    pass


def start_server(name: str, argv: list[str], port: int, logs: Path, *, ready_path: str,
                 timeout_s: float) -> ServerProcess:
    try:
        return launch(name, argv, port=port, log_dir=logs, ready_path=ready_path,
                      timeout_s=timeout_s, interval_s=0.2)
    except ServerNotReady as exc:
        raise StepFailed(str(exc)) from None


def run_step(title: str, argv: list[str], log_dir: Path, env: dict | None = None) -> str:
    """Run one CLI step in the foreground, its output shown live and kept in a log."""
    console.rule(f"[bold]{title}")
    console.print(f"$ {' '.join(str(a) for a in argv)}", style="dim")
    started = time.perf_counter()
    log_path = log_dir / (title.lower().replace(" ", "_") + ".log")
    with open(log_path, "w") as log:
        # Rich wraps piped output at 80 columns; keep the user's terminal width instead.
        width = str(shutil.get_terminal_size((120, 40)).columns)
        proc = subprocess.Popen([str(a) for a in argv], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "COLUMNS": width, **(env or {})})
        output = []
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            output.append(line)
        code = proc.wait()
    if code != 0:
        raise StepFailed(f"'{title}' failed with exit code {code}; full output in {log_path}")
    console.print(f"[green]done[/] in {time.perf_counter() - started:.1f} s")
    return "".join(output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "demo_out",
                        help="where the crawl, dataset, run folder and reports go")
    parser.add_argument("--small", action="store_true",
                        help="tiny sizes (CI's end-to-end test): few images, one short epoch")
    args = parser.parse_args(argv)
    return run_demo(args.out, small=args.small)


def held_out_photos(dataset: Path, count: int) -> list[tuple[str, Path]]:
    """One test-split photo per label, round robin, so the printout shows several labels."""
    by_label = {d.name: sorted(d.iterdir()) for d in sorted((dataset / "test").iterdir())
                if d.is_dir() and any(d.iterdir())}
    picked: list[tuple[str, Path]] = []
    for index in range(count):
        for label, files in by_label.items():
            if index < len(files) and len(picked) < count:
                picked.append((label, files[index]))
    return picked


def classify_held_out(url: str, photos: list[tuple[str, Path]],
                      colours: dict[str, str] | None = None) -> Table:
    """The answers as a table; with `colours` (file name -> the colour its title named) the
    model's colour head beside it."""
    table = Table(title="held-out photos through POST /classify")
    columns = ["photo", "true label", "predicted", "score", "latency ms"]
    if colours:
        columns[4:4] = ["title colour", "predicted colour"]
    for column in columns:
        table.add_column(column, justify="right" if column in ("score", "latency ms") else "left")
    with httpx.Client(timeout=30) as client:
        for true_label, photo in photos:
            started = time.perf_counter()
            response = client.post(f"{url}/classify",
                                   files={"image": (photo.name, photo.read_bytes(), "image/jpeg")})
            latency_ms = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                raise StepFailed(f"/classify answered {response.status_code}: {response.text}")
            body = response.json()
            mark = "[green]" if body["label"] == true_label else "[red]"
            cells = [photo.name, true_label, f"{mark}{body['label']}[/]", f"{body['score']:.2f}"]
            if colours:
                said = colours.get(photo.name, "unknown")
                got = (body.get("attributes") or {}).get("colour", {})
                hue = "" if said == "unknown" else "[green]" if got.get("label") == said else "[red]"
                cells += [said, f"{hue}{got.get('label')} {got.get('score', 0):.2f}" +
                          ("[/]" if hue else "")]
            table.add_row(*cells, f"{latency_ms:.0f}")
    return table


def title_colours(dataset: Path) -> dict[str, str]:
    """file name -> attr_colour of the export's manifest.csv (empty without the column)."""
    import csv

    with open(dataset / "manifest.csv", newline="") as handle:
        return {Path(row["file"]).name: row["attr_colour"] for row in csv.DictReader(handle)
                if row.get("attr_colour")}


def run_demo(out: Path, small: bool = False) -> int:
    from loadtests.locust_run import run_locust

    python = sys.executable
    if out.exists():
        if not (out / ".demo").is_file():
            raise StepFailed(f"{out} exists and was not made by the demo; choose another --out")
        shutil.rmtree(out)  # the demo starts from scratch, so the faults show every time
    logs = out / "logs"
    logs.mkdir(parents=True)
    (out / ".demo").touch()
    sources, collected, dataset = out / "sources.yaml", out / "collected", out / "dataset"
    run_dir, reports = out / "runs" / "demo", out / "reports"
    started = time.perf_counter()

    with contextlib.ExitStack() as servers:  # every server stopped on success, error, Ctrl-C
        console.rule("[bold]1. demo shop (faults on) on 127.0.0.1")
        shop_port = free_port()
        shop_args = ["--catalog", CATALOG, "--port", shop_port, "--faults", "all",
                     "--write-sources", sources, "--output-dir", collected]
        if small:
            shop_args += ["--per-label", 16]
        shop = servers.enter_context(start_server(
            "shop", [python, "-m", "collector.demo_shop", *map(str, shop_args)], shop_port,
            logs, ready_path="/robots.txt", timeout_s=60))
        console.print(shop.log_path.read_text().strip())

        run_step("2. crawl", [python, "-m", "collector", "crawl", sources], logs)
        run_step("3. export split dataset",
                 [python, "-m", "collector", "export", "--data", collected, "--out", dataset,
                  "--val", 0.15, "--test", 0.15], logs)
        shop.stop()

        train_args = (["--epochs", 1, "--head-epochs", 3, "--image-size", 128,
                       "--max-steps-per-epoch", 3] if small else [])  # the default recipe
        run_step("4. fine-tune", [python, "-m", "trainer", "train", "--data", dataset,
                                  "--out", run_dir, *train_args], logs)
        exported = run_step("5. export ONNX, verify, save to BentoML store",
                            [python, "-m", "trainer", "export", run_dir], logs)
        tag = next((word for line in exported.splitlines() for word in line.split()
                    if word.startswith("product-classifier:")), "product-classifier:latest")

        console.rule("[bold]6. bentoml serve")
        try:
            serve = servers.enter_context(start_bentoml(tag, log_dir=logs, name="serve",
                                                        timeout_s=180))
        except ServerNotReady as exc:
            raise StepFailed(str(exc)) from None
        url = serve.url
        console.print(f"{url} ready in {serve.cold_start_s:.1f} s, serving {tag}")

        console.rule("[bold]7. classify held-out photos")
        console.print(classify_held_out(url, held_out_photos(dataset, 4 if small else 10),
                                        title_colours(dataset)))

        console.rule("[bold]8. short Locust burst")
        burst = run_locust(url, users=8, run_time_s=5 if small else 15,
                           csv_prefix=reports / "locust", html=reports / "locust.html",
                           timeout_s=120)
        console.print(f"{burst.requests} requests, {burst.failures} failures, "
                      f"{burst.rps:.1f} req/s, p50 {burst.p50_ms:.0f} ms, "
                      f"p95 {burst.p95_ms:.0f} ms, p99 {burst.p99_ms:.0f} ms")
        if burst.failures:
            raise StepFailed(f"Locust saw failures: {burst.failure_reasons}")

    summary = Table(title=f"demo finished in {time.perf_counter() - started:.0f} s", show_header=False)
    for name, path in [("collection (manifest)", collected), ("dataset", dataset),
                       ("run folder", run_dir), ("model card", run_dir / "report" / "MODEL_CARD.md"),
                       ("load test report", reports / "locust.html"), ("logs", logs)]:
        summary.add_row(name, str(path))
    summary.add_row("BentoML model", f"{tag}  (serve it: MODEL_TAG={tag} bentoml serve)")
    console.print(summary)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StepFailed as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; every server the demo started has been stopped[/]")
        sys.exit(130)
