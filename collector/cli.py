"""`collector crawl | check | status | review | rank | export`: the collector's command line.

Each subcommand is a pydantic model, so its flags, defaults and help come from one place
(pydantic-settings' CliApp), and every command that reads a collection names its folder the
same way: `--data DIR`. The review page and the ranking belong to collector/review/; their
commands here only translate flags and import that package when run, so crawling never
loads the review page's dependencies (Starlette, numpy, scikit-learn).
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    CliApp,
    CliPositionalArg,
    CliSubCommand,
    SettingsConfigDict,
)
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from collector.config import ConfigError, load_sources
from collector.manifest import MANIFEST_FILE, open_manifest
from collector.review.config import DATA_HELP, RankConfig, ReviewConfig

console = Console(stderr=True, soft_wrap=True)  # messages: never hard-wrapped mid-line
out = Console()

_STATUS_COLUMNS = ("ok", "duplicate", "conflict", "rejected", "failed", "blocked", "pending",
                   "downloaded")


def _collection(data: Path) -> Path:
    if data.name == MANIFEST_FILE and data.is_file():   # the file itself is fine too
        data = data.parent
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
        titles = manifest.title_counts()
        attributes = manifest.attribute_counts()
        reviewed = manifest.query(
            "SELECT review_status, COUNT(*) FROM images WHERE review_status IS NOT NULL "
            "GROUP BY review_status")
        page_reasons = manifest.query(   # why pages failed or were blocked (captcha, ...)
            "SELECT status, reason, COUNT(*) FROM pages WHERE status IN ('failed', 'blocked') "
            "GROUP BY status, reason ORDER BY COUNT(*) DESC")
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
    for status, reason, n in page_reasons:
        page_table.add_row(f"{status}: {reason}", str(n))
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
    tables = [images, page_table, reason_table]
    if titles.get("off_topic"):   # off_topic: flag keeps them; the review page filters them
        reason_table.add_row("flagged", "off_topic_title (kept, to review)",
                             str(titles["off_topic"]))
    if attributes:                # attribute rules in sources.yaml, over what export writes
        table = Table(title="attributes (exported images)")
        for column in ("attribute", "value", "images"):
            table.add_column(column, justify="right" if column == "images" else "left")
        for name, values in attributes.items():
            for value, n in values.items():
                table.add_row(name, value, str(n))
        tables.append(table)
    return tables


class Crawl(BaseModel):
    """Crawl the categories in SOURCES into its output_dir. Re-running the same command
    resumes: finished pages and images are kept, pending ones are done, nothing twice.
    Exits 3 when a shop answered block pages (captcha) until the crawl stopped asking it:
    the collector never solves captchas or changes identity; run it again later, slower.
    Exits 4 when the disk is full: what was finished is in the manifest; make room and run
    the same command again."""

    sources: CliPositionalArg[Path] = Field(description="sources YAML (see collector/examples/)")
    retry_failed: bool = Field(False, description="also retry pages and images that failed "
                                                   "in an earlier run (HTTP errors, timeouts)")
    # Exit status: 0 done; 1 bad sources file; 3 a host was stopped by block pages (run the
    # same command later: it resumes there); 4 disk full (collector.crawl.DiskFull); 130
    # interrupted.

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
        if result.stopped:   # repeated last, where it is seen; exit 3: not done, come back
            for message in result.stopped.values():
                console.print(f"[red]{escape(message)}")
            raise SystemExit(3)


class Check(BaseModel):
    """Fetch one listing page with its site profile and show what the collector reads
    there: cards, ids, titles, image URLs (the first few downloaded: pixel size, bytes,
    kept or why not), the next link, and any block-page marker. Adapt the profile in
    SOURCES until this looks right, then crawl. Exits 1 when the page has no products."""

    sources: CliPositionalArg[Path] = Field(description="sources YAML with the site profile")
    url: str | None = Field(None, description="the listing page to check; default: the first "
                                              "start URL (of --label)")
    label: str | None = Field(None, description="take the start URL of this label")
    html: Path | None = Field(None, description="read this saved page instead of fetching it "
                                                "(the URL still picks the profile and resolves "
                                                "relative links)")
    images: int = Field(3, ge=0, le=50, description="download the first N images to show their "
                                                     "size and whether validation keeps them")
    cards: int = Field(20, ge=1, description="list at most this many cards")

    def cli_cmd(self) -> None:
        try:
            config = load_sources(self.sources)
        except ConfigError as exc:
            raise SystemExit(f"error: {exc}") from None
        url = self.url or _start_url(config, self.label)
        raise SystemExit(asyncio.run(check_page(config, url, self.html, self.images,
                                                self.cards)))


def say(message: str) -> None:
    out.print(message, soft_wrap=True)   # one line each: easy to read, grep and test


def _start_url(config, label: str | None) -> str:
    if label is not None and label not in config.categories:
        raise SystemExit(f"error: no label {label!r} under categories (there are "
                         f"{sorted(config.categories)})")
    labels = [label] if label else sorted(config.categories)
    if not labels:
        raise SystemExit("error: no categories in the sources file; pass --url")
    return config.categories[labels[0]][0]


async def check_page(config, url: str, html_file: Path | None, n_images: int,
                     n_cards: int) -> int:
    """Print what a crawl would read on `url`; 0 when it finds products, else 1."""
    from collector.blocks import block_check, listing_verdict
    from collector.extract import extract_listing
    from collector.fetch import Fetcher, FetchError
    from collector.validate import validate_image
    from service.contract import ImageDecodeError

    try:
        profile = config.profile_for(url)
    except KeyError:
        console.print(f"[red]no site profile for {urlsplit(url).netloc!r}[/] (sites has "
                      f"{sorted(config.sites)}): add one under 'sites'")
        return 1
    async with Fetcher(config.politeness, config.download, [url]) as fetcher:
        if html_file is not None:
            page, final_url = html_file.read_text(errors="replace"), url
            console.print(f"page: {html_file} (as {url})")
        else:
            try:
                fetched = await fetcher.get(url, block_check=block_check(profile))
            except FetchError as exc:
                kind = "block page" if exc.blocked and exc.reason != "robots" else "failed"
                console.print(f"[red]{kind}: {exc.reason}[/] {escape(exc.detail)}")
                return 1
            page, final_url = fetched.content.decode("utf-8", "replace"), fetched.url
            hops = " -> ".join([*fetched.redirects, fetched.url])
            console.print(f"page: {hops}  (HTTP {fetched.status}, {len(fetched.content):,} "
                          f"bytes, {fetched.attempts} attempt(s))")
        listing = extract_listing(page, final_url, profile)
        table = Table(title=f"{len(listing.products)} products (card {profile.card!r})")
        for column in ("#", "id", "title", "image", "size"):
            table.add_column(column, overflow="fold")
        for i, product in enumerate(listing.products[:n_cards]):
            size = ""
            if i < n_images and product.image_url:
                try:
                    image = await fetcher.get(product.image_url)
                    valid = validate_image(image.content, config.validation)
                    size = f"{valid.width}x{valid.height} {valid.format} {len(image.content):,} B"
                except FetchError as exc:
                    size = f"[red]{exc.reason}"
                except ImageDecodeError as exc:
                    size = f"[red]{exc.reason}[/] {escape(exc.detail)}"
            table.add_row(str(product.position), escape(product.product_id[:40]),
                          escape(product.title[:60]),
                          escape(product.image_url) if product.image_url else "[red]no image",
                          size)
        out.print(table)
        say(f"next page: {escape(listing.next_url or 'none')}"
            f"{'' if profile.next_page else ' (no next_page selector)'}")
        say(f"cards skipped (no id): {listing.skipped_cards}; cards without an image: "
            f"{listing.cards_without_image}")
        verdict = listing_verdict(page, final_url, profile, len(listing.products))
        if verdict:
            reason, seen = verdict
            say(f"[red]block page: {reason}[/] ({escape(seen)}). A shop shows this to clients "
                "it takes for bots; the collector does not solve captchas or change "
                "identity. Try later, slower (politeness.requests_per_second_per_host).")
        else:
            say("block-page markers: none")
        if not listing.products and not verdict:
            say("no products: check the card selector in your browser's inspector")
    return 0 if listing.products else 1


_DATA_HELP = DATA_HELP


class Status(BaseModel):
    """Show what the manifest holds: images per label and status, pages, reasons."""

    data: Path = Field(Path("collected"), description=_DATA_HELP)

    def cli_cmd(self) -> None:
        for table in status_tables(self.data):
            out.print(table)


class Export(BaseModel):
    """Write the kept (and reviewer-approved) images as a grouped, stratified
    train/val/test ImageFolder with manifest.csv and stats.json."""

    data: Path = Field(Path("collected"), description=_DATA_HELP)
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


class _ReviewSettings(BaseSettings):
    # Flags may also come from the environment: REVIEW_PORT=8800 collector review
    model_config = SettingsConfigDict(env_prefix="REVIEW_")


class Review(ReviewConfig, _ReviewSettings):
    __doc__ = ReviewConfig.__doc__

    def cli_cmd(self) -> None:
        from collector.review.app import serve  # the web app loads only when asked for

        _collection(self.data)
        try:
            serve(ReviewConfig.model_validate(self.model_dump()))
        except (FileNotFoundError, ValueError, ImportError) as exc:
            raise SystemExit(f"error: {exc}") from None


class Rank(RankConfig, _ReviewSettings):
    __doc__ = RankConfig.__doc__

    def cli_cmd(self) -> None:
        from collector.review.rank import rank  # loads the backbone's dependencies

        _collection(self.data)
        try:
            result = rank(RankConfig.model_validate(self.model_dump()))
        except (FileNotFoundError, ValueError, ImportError) as exc:
            raise SystemExit(f"error: {exc}") from None
        console.print(f"ranked {result['ranked']} images with {result['model']}: out-of-sample "
                      f"predictions agree with {result['out_of_sample_agreement']:.1%} of "
                      f"labels; {result['confident_disagreements']} confident disagreements "
                      f"to review (sort by 'suspect' on the review page)")


class Collector(BaseSettings, cli_prog_name="collector", cli_kebab_case=True,
                cli_implicit_flags=True, cli_hide_none_type=True):
    """Collect product photos from shop listing pages into a clean, resumable dataset.

    Typical run: `collector crawl sources.yaml`, `collector status --data collected`,
    `collector review --data collected` and `collector rank --data collected` (optional),
    `collector export --data collected --out dataset`.
    """

    crawl: CliSubCommand[Crawl] = Field(description="crawl sources into the manifest (resumes)")
    check: CliSubCommand[Check] = Field(description="show what a profile reads on one listing "
                                                    "page (before a long crawl)")
    status: CliSubCommand[Status] = Field(description="show the manifest's state")
    review: CliSubCommand[Review] = Field(description="look at, fix and approve the images "
                                                      "in a browser")
    rank: CliSubCommand[Rank] = Field(description="rank images by how likely their label is "
                                                  "wrong (for the review page)")
    export: CliSubCommand[Export] = Field(description="write the split ImageFolder dataset")

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


for _command in (Crawl, Check, Status, Review, Rank, Export, Collector):  # help shows docstrings as written
    _command.__doc__ = inspect.cleandoc(_command.__doc__ or "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["--help"]
    CliApp.run(Collector, cli_args=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
