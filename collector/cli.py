"""`collector crawl | status | export | review`: the collector's command line.

Each subcommand is a pydantic model, so its flags, defaults and help come from one place
(pydantic-settings' CliApp). `review` belongs to collector/review/ and is imported only when
asked for, so crawling never loads the review page's dependencies.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, CliApp, CliPositionalArg, CliSubCommand
from rich.console import Console
from rich.table import Table

from collector.config import ConfigError, load_sources
from collector.manifest import MANIFEST_FILE, open_manifest

console = Console(stderr=True, soft_wrap=True)  # messages: never hard-wrapped mid-line
out = Console()

_STATUS_COLUMNS = ("ok", "duplicate", "conflict", "rejected", "failed", "blocked", "pending",
                   "downloaded")


def _collection(data: Path) -> Path:
    if not (data / MANIFEST_FILE).is_file():
        raise SystemExit(f"error: {data / MANIFEST_FILE} not found; run `collector crawl "
                         "sources.yaml` first, or pass --data to the folder it wrote")
    return data


def status_tables(data: Path) -> list[Table]:
    """Per-label images by status, pages by status, and the reasons things were left out."""
    with open_manifest(_collection(data)) as manifest:
        counts = manifest.image_counts()
        pages = manifest.page_counts()
        reasons = manifest.reasons()
        reviewed = manifest.query(
            "SELECT review_status, COUNT(*) FROM images WHERE review_status IS NOT NULL "
            "GROUP BY review_status")
    images = Table(title=f"images in {data}")
    images.add_column("label")
    columns = [c for c in _STATUS_COLUMNS if any(c in row for row in counts.values())]
    for column in columns + ["total"]:
        images.add_column(column, justify="right")
    totals = dict.fromkeys(columns + ["total"], 0)
    for label in sorted(counts):
        row = counts[label]
        for column in columns:
            totals[column] += row.get(column, 0)
        totals["total"] += sum(row.values())
        images.add_row(label, *(str(row.get(c, 0)) for c in columns), str(sum(row.values())))
    images.add_row("[bold]all", *(f"[bold]{totals[c]}" for c in columns + ["total"]))

    page_table = Table(title="pages")
    page_table.add_column("status")
    page_table.add_column("pages", justify="right")
    for status, n in sorted(pages.items()):
        page_table.add_row(status, str(n))
    for review_status, n in reviewed:
        page_table.add_row(f"reviewed: {review_status}", str(n))

    reason_table = Table(title="left out, by reason")
    reason_table.add_column("status")
    reason_table.add_column("reason")
    reason_table.add_column("images", justify="right")
    conflicts = sum(n for (status, _), n in reasons.items() if status == "conflict")
    for (status, reason), n in reasons.items():
        if status != "conflict":
            reason_table.add_row(status, reason, str(n))
    if conflicts:  # one line, not one per label pair; `collector review` shows the pairs
        reason_table.add_row("conflict", "same image under 2+ labels", str(conflicts))
    return [images, page_table, reason_table]


class Crawl(BaseModel):
    """Crawl the categories in SOURCES into its output_dir. Re-running the same command
    resumes: finished pages and images are kept, pending ones are done, nothing twice."""

    sources: CliPositionalArg[Path] = Field(description="sources YAML (see collector/examples/)")
    retry_failed: bool = Field(False, description="also retry pages and images that failed "
                                                   "in an earlier run (HTTP errors, timeouts)")

    def cli_cmd(self) -> None:
        from collector.crawl import crawl

        try:
            config = load_sources(self.sources)
        except ConfigError as exc:
            raise SystemExit(f"error: {exc}") from None
        labels = sorted(set(config.categories) | set(config.url_lists))
        console.print(f"crawling {len(labels)} labels into {config.output_dir}")
        try:
            result = asyncio.run(crawl(config, console, retry_failed=self.retry_failed))
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: everything so far is in the manifest; "
                          "run the same command again to resume")
            raise SystemExit(130) from None
        s, d = result.stats, result.dedup
        rate = s.images_done / s.elapsed if s.elapsed else 0.0
        console.print(
            f"done in {s.elapsed:.1f} s: {s.pages} pages, {s.images_done} images "
            f"({rate:.1f}/s), {result.fetcher_stats['requests']} requests, "
            f"{result.fetcher_stats['retries']} retries; dedup: {d.kept} kept, "
            f"{d.duplicates} duplicates, {d.conflicts} in {d.conflict_clusters} cross-label "
            f"conflicts")
        for table in status_tables(config.output_dir):
            out.print(table)


class Status(BaseModel):
    """Show what the manifest holds: images per label and status, pages, reasons."""

    data: Path = Field(Path("collected"), description="the collection folder (output_dir)")

    def cli_cmd(self) -> None:
        for table in status_tables(self.data):
            out.print(table)


class Export(BaseModel):
    """Write the kept (and reviewer-approved) images as a grouped, stratified
    train/val/test ImageFolder with manifest.csv and stats.json."""

    data: Path = Field(Path("collected"), description="the collection folder (output_dir)")
    out: Path = Field(Path("dataset"), description="the dataset folder to write")
    val: float = Field(0.1, ge=0, lt=1, description="validation fraction (steps of 5 %)")
    test: float = Field(0.1, ge=0, lt=1, description="test fraction (steps of 5 %)")
    seed: int = Field(0, description="split seed: same seed, same manifest -> same split")
    zip: bool = Field(False, description="also write OUT.zip to hand the dataset over")
    overwrite: bool = Field(False, description="replace OUT if it exists")

    def cli_cmd(self) -> None:
        from collector.export import SPLITS, export_dataset

        with open_manifest(_collection(self.data)) as manifest:
            try:
                result = export_dataset(manifest, self.out, val=self.val, test=self.test,
                                        seed=self.seed, make_zip=self.zip,
                                        overwrite=self.overwrite)
            except (FileExistsError, ValueError) as exc:
                raise SystemExit(f"error: {exc}") from None
        table = Table(title=f"dataset {result.out_dir}")
        table.add_column("label")
        for split in SPLITS + ("total",):
            table.add_column(split, justify="right")
        for label, per_split in sorted(result.counts.items()):
            table.add_row(label, *(str(per_split[s]) for s in SPLITS),
                          str(sum(per_split.values())))
        totals = [sum(c[s] for c in result.counts.values()) for s in SPLITS]
        table.add_row("[bold]all", *(f"[bold]{n}" for n in totals), f"[bold]{sum(totals)}")
        out.print(table)
        if result.rejects:
            rejects = {k: v for k, v in result.rejects.items() if not k.startswith("conflict:")}
            conflicts = sum(v for k, v in result.rejects.items() if k.startswith("conflict:"))
            if conflicts:   # stats.json keeps them per label pair
                rejects["conflict: same image under 2+ labels"] = conflicts
            out.print("not exported: " + ", ".join(f"{k} {v}" for k, v in rejects.items()))
        if result.zip_path:
            out.print(f"archive: {result.zip_path}")


class Collector(BaseSettings, cli_prog_name="collector", cli_kebab_case=True,
                cli_implicit_flags=True, cli_hide_none_type=True):
    """Collect product photos from shop listing pages into a clean, resumable dataset.

    Typical run: `collector crawl sources.yaml`, `collector status --data collected`,
    `collector review --manifest collected/manifest.sqlite` (optional),
    `collector export --data collected --out dataset`.
    """

    crawl: CliSubCommand[Crawl] = Field(description="crawl sources into the manifest (resumes)")
    status: CliSubCommand[Status] = Field(description="show the manifest's state")
    export: CliSubCommand[Export] = Field(description="write the split ImageFolder dataset")

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


for _command in (Crawl, Status, Export, Collector):  # help shows docstrings as written
    _command.__doc__ = inspect.cleandoc(_command.__doc__ or "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["review"]:
        # Hook for collector/review/ (owned by the review page): imported only when used.
        from collector.review.app import main as review_main

        return review_main(argv[1:]) or 0
    if not argv:
        argv = ["--help"]
    CliApp.run(Collector, cli_args=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
