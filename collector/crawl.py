"""The crawl: listing pages -> product records -> downloaded, validated, stored images -> dedup.

One task per label walks its listing pages in order (pagination is sequential by nature, and
per-label order makes `max_images_per_label` pick the same products every time); a pool of
workers opens product pages, and a pool of download threads takes images as they are found,
each image's fetch, decode, hash and file write in one thread, its outcome handed back to the
event loop in batches. A page's products, its next-page link and its
own "done" are one transaction; image outcomes are committed in batches (a kill loses at most
a batch, still 'pending'); files are renamed into place; dedup runs once over everything at
the end. So a kill -9 at any instant leaves a manifest from which the same command resumes
to exactly the result of an uninterrupted crawl.

A block page (a captcha, or a listing without products: collector.blocks) is recorded as
`blocked` with its reason, pauses its host with a growing backoff and is retried a bounded
number of times (`politeness.block_*`); then the crawl stops that host, says how to come
back, and the next run of the same command starts again from that page. A page on a host
without a site profile is `failed: no_profile`, and one bad page never ends the crawl.

A full disk (ENOSPC or EDQUOT from an image file or from SQLite) ends the crawl instead: it is
no fault of the images, so none is recorded as bad. The store refuses further writes, the
space reserve held beside the manifest is given back, what was finished is committed, and the
crawl stops with `DiskFull` (exit status 4: the message names the disk and how much is free);
images in flight stay pending and the same command, run once there is room, resumes there.
"""

from __future__ import annotations

import asyncio
import errno
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from collector.blocks import BLOCK_REASONS, block_check, listing_verdict, page_marker
from collector.config import SiteProfile, SourcesConfig
from collector.dedup import DedupSummary, run_dedup
from collector.extract import extract_listing, extract_product_image
from collector.fetch import Fetched, Fetcher, FetchError
from collector.manifest import Manifest, open_manifest
from collector.rules import apply_rules, decide
from collector.store import ImageStore, SpaceReserve, free_bytes, out_of_space
from collector.validate import validate_image
from service.contract import ImageDecodeError

DISK_FULL_EXIT = 4


class DiskFull(SystemExit):
    """The collection's disk is full (or over quota): the crawl stopped with everything it
    finished committed. A SystemExit with status DISK_FULL_EXIT, so that `collector crawl`
    ends with the message (printed by `crawl`) and without a traceback; `message` says it."""

    def __init__(self, message: str):
        super().__init__(DISK_FULL_EXIT)
        self.message = message


def disk_full_message(error: BaseException, where: Path, manifest: Manifest | None,
                      unsaved: int = 0) -> str:
    """What went wrong, where, how much is free, what the manifest holds, how to go on."""
    kind = ("quota exceeded" if isinstance(error, OSError) and error.errno == errno.EDQUOT
            else "no space left")
    free = free_bytes(where)
    said = (f"{error.strerror}" if isinstance(error, OSError) and error.strerror
            else str(error))
    text = (f"disk full: {kind} writing {where} ({said}; "
            f"{'?' if free is None else _size(free)} free there now). The crawl stopped")
    if manifest is not None:
        try:
            stored, todo, pages = manifest.query(
                "SELECT (SELECT COUNT(*) FROM images WHERE path IS NOT NULL), "
                "(SELECT COUNT(*) FROM images WHERE status = 'pending'), "
                "(SELECT COUNT(*) FROM pages WHERE status = 'pending')")[0]
        except sqlite3.Error:
            stored = todo = pages = None
        if stored is not None:
            text += (f" with everything it finished in {Path(manifest.path)} ({stored} images "
                     f"stored; {todo} images and {pages} pages still to fetch)")
    if unsaved:
        text += f"; the last {unsaved} results could not be written and will be fetched again"
    return (text + ". Make room there (or point output_dir at a larger disk), then run the "
                   "same command again: it resumes from here.")


def _size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            break
    return f"{n:.1f} {unit}"


@dataclass
class CrawlStats:
    pages: int = 0
    pages_failed: int = 0
    images_done: int = 0
    stored: int = 0
    rejected: int = 0
    failed: int = 0
    blocked: int = 0
    blocked_pages: int = 0
    reused: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


@dataclass
class CrawlResult:
    stats: CrawlStats
    dedup: DedupSummary
    fetcher_stats: dict
    stopped: dict[str, str] = field(default_factory=dict)  # host -> why and how to come back


class Crawler:
    def __init__(self, config: SourcesConfig, manifest: Manifest, store: ImageStore,
                 fetcher: Fetcher, progress: Progress | None = None,
                 reserve: SpaceReserve | None = None):
        self.config = config
        self.manifest = manifest
        self.store = store
        self.fetcher = fetcher
        self.reserve = reserve           # given back when the disk fills: room to commit
        self.no_space: BaseException | None = None   # the write the disk refused: stop
        self.unsaved = 0                 # results the manifest could not take even then
        self._work: asyncio.Task | None = None
        self.progress = progress
        self.stats = CrawlStats()
        self.queue: asyncio.Queue[tuple[str, int, str]] = asyncio.Queue()   # product pages
        # Images go straight to download threads, whose outcomes come back in batches: one
        # event-loop wake-up per batch instead of asyncio.to_thread's future chain per image
        # (half the GIL-holding time of a 3,088-photo crawl was that hand-off, by profile).
        self._downloads: queue.SimpleQueue[tuple[int, str] | None] = queue.SimpleQueue()
        self._outcomes: list[tuple[int, str, str, object]] = []
        self._outcomes_lock = threading.Lock()
        self._wake_pending = False
        self._in_flight = 0              # images handed to the threads, outcome not recorded
        self._idle: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._recorded_all = False
        # Image outcomes are batched: one transaction per ~100 instead of one each (SQLite
        # commits dominated the CPU profile). A kill -9 loses at most the unflushed batch,
        # whose rows are still 'pending' and are simply redone on resume.
        self._writes: list[tuple[Callable[..., None], tuple, dict]] = []
        self._last_flush = time.monotonic()
        self._stored_by_url: dict[str, dict] = {}   # same URL under another label: reuse
        self.blocks: dict[str, int] = {}     # host -> block pages in a row
        self.stopped: dict[str, str] = {}    # host -> the message: no more requests to it
        self.console = progress.console if progress else Console(stderr=True)
        self._pages_task = progress.add_task("pages", total=None, status="") if progress else None
        self._images_task = progress.add_task("images", total=0, status="") if progress else None

    # -- progress ------------------------------------------------------------------------
    def _tick(self, pages: int = 0, images: int = 0, discovered: int = 0) -> None:
        if not self.progress or self.progress.disable:
            return
        s = self.stats
        rate = s.images_done / s.elapsed if s.elapsed > 0 else 0.0
        status = (f"ok {s.stored}  rejected {s.rejected}  failed {s.failed}  "
                  f"retries {self.fetcher.stats['retries']}  {rate:.1f} img/s")
        self.progress.update(self._pages_task, advance=pages, status=f"failed {s.pages_failed}")
        task = self.progress.tasks[self._images_task]
        self.progress.update(self._images_task, advance=images,
                             total=(task.total or 0) + discovered, status=status)

    # -- seeding & listing pages ---------------------------------------------------------
    def seed(self) -> None:
        self.requeue_blocked()
        with self.manifest.transaction():
            for label, urls in self.config.categories.items():
                for url in urls:
                    self.manifest.add_page(url, label, "listing", 1)
            for label, url_file in self.config.url_lists.items():
                self.seed_url_list(label, url_file)
        apply_rules(self.manifest, self.config)   # rules edited since the last run: re-file
        self.check_files()
        for row in self.manifest.query(
                "SELECT url, path, bytes, width, height, format, sha256, phash, http_status "
                "FROM images WHERE status IN ('downloaded', 'ok', 'duplicate', 'conflict')"):
            self._stored_by_url[row["url"]] = dict(row)
        pending = self.manifest.pending_images()
        for row in pending:
            self.submit_image(row["id"], row["url"])
        products = self.manifest.pending_pages("product")
        for row in products:
            self.queue.put_nowait(("product", row["id"], row["url"]))
        self._tick(discovered=len(pending) + len(products))

    def requeue_blocked(self) -> None:
        """Pages a block page stopped are the first ones the next run fetches: the same
        command resumes where the blocked run stopped (robots.txt blocks stay blocked)."""
        marks = ",".join("?" * len(BLOCK_REASONS))
        with self.manifest.transaction() as db:
            db.execute(f"UPDATE pages SET status = 'pending' WHERE status = 'blocked' "
                       f"AND reason IN ({marks})", BLOCK_REASONS)

    def check_files(self) -> None:
        """Rows whose file is gone or the wrong size (power loss, a user's rm) go back to
        pending: the manifest never claims an image it cannot hand over."""
        lost = []
        for row in self.manifest.query(
                "SELECT id, path, bytes FROM images WHERE path IS NOT NULL"):
            file = self.store.root / row["path"]
            try:
                if file.stat().st_size == row["bytes"]:
                    continue
            except FileNotFoundError:
                pass
            lost.append(row["id"])
        if lost:
            with self.manifest.transaction() as db:
                db.executemany("UPDATE images SET status = 'pending', path = NULL "
                               "WHERE id = ?", [(i,) for i in lost])

    def seed_url_list(self, label: str, url_file) -> None:
        """Image URLs given directly (no listing page): one image row each, file order."""
        limit = self.config.limits.max_images_per_label
        known = self.manifest.count_products(label)
        for position, line in enumerate(url_file.read_text().splitlines()):
            url = line.strip()
            if not url or url.startswith("#") or known >= limit:
                continue
            if self.manifest.add_image(url, label, page_url=url_file.as_uri(),
                                       shop=urlsplit(url).netloc, position=position):
                known += 1

    async def walk_label(self, label: str) -> None:
        while True:
            pages = [p for p in self.manifest.pending_pages("listing") if p["label"] == label
                     and urlsplit(p["url"]).netloc not in self.stopped]
            if not pages:
                return
            for page in pages:
                try:
                    await self.listing_page(page)
                except Exception as exc:  # noqa: BLE001 (one bad page must not end the crawl)
                    if out_of_space(exc):    # ...but a full disk does: the page stays pending
                        return self.halt_no_space(exc)
                    self.manifest.finish_page(page["id"], "failed", "internal_error")
                    self._page_done(failed=True)

    def profile(self, url: str) -> SiteProfile | None:
        try:
            return self.config.profile_for(url)
        except KeyError:                 # several profiles, none for this host
            return None

    async def fetch_page(self, page) -> tuple[Fetched, object] | None:
        """Fetch and read a listing page (-> ListingPage) or a product page (-> its image
        URL). A block page pauses the host and is fetched again, a bounded number of times;
        None when the page ended otherwise (recorded), or its host is stopped (pending)."""
        url, kind = page["url"], page["kind"]
        host = urlsplit(url).netloc
        profile = self.profile(url)
        if profile is None:
            self.manifest.finish_page(page["id"], "failed", "no_profile")
            return None
        while host not in self.stopped:
            try:
                fetched = await self.fetcher.get(url, block_check=block_check(profile))
            except FetchError as exc:
                if not exc.blocked or exc.reason == "robots":
                    self.manifest.finish_page(page["id"], "blocked" if exc.blocked else
                                              "failed", exc.reason, exc.http_status)
                    return None
                reason, seen, status = exc.reason, exc.detail, exc.http_status
            else:
                html = fetched.content.decode("utf-8", "replace")
                if kind == "listing":
                    found = extract_listing(html, fetched.url, profile)
                    verdict = listing_verdict(html, fetched.url, profile, len(found.products))
                else:
                    found = extract_product_image(html, fetched.url, profile)
                    marker = None if found else page_marker(html, fetched.url, profile)
                    verdict = ("captcha", marker) if marker else None
                if verdict is None:
                    self.blocks.pop(host, None)       # a real page: the host is fine again
                    return fetched, found
                (reason, seen), status = verdict, fetched.status
            self.manifest.finish_page(page["id"], "blocked", reason, status, 0)
            self.stats.blocked_pages += 1
            if not self.back_off(host, url, reason, seen):
                break
        return None

    def back_off(self, host: str, url: str, reason: str, seen: str) -> bool:
        """After a block page: pause the host (longer each time) and retry, or, past
        `block_retries`, stop the host. Polite by design: the cure is slower and later,
        never a solved captcha or another identity."""
        polite = self.config.politeness
        n = self.blocks[host] = self.blocks.get(host, 0) + 1
        if n > polite.block_retries:
            self.stopped[host] = (
                f"stopped crawling {host}: {n} block pages in a row ({reason}: {seen}), the "
                f"last at {url}. The collector does not solve captchas or change identity to "
                f"get past a block. Wait (an hour, a day), lower "
                f"politeness.requests_per_second_per_host (now "
                f"{polite.requests_per_second_per_host:g}) and concurrency_per_host (now "
                f"{polite.concurrency_per_host}), then run the same command again: it "
                f"resumes from this page.")
            self.console.print(f"[red]{escape(self.stopped[host])}", soft_wrap=True)
            return False
        pause = min(polite.block_pause_max, polite.block_pause * 2 ** (n - 1))
        self.fetcher.pause_host(url, pause)
        self.console.print(f"[yellow]{host}: block page ({reason}: {escape(seen)}) at "
                           f"{escape(url)}; pausing the host {pause:g} s, then retry {n} of "
                           f"{polite.block_retries}", soft_wrap=True)
        return True

    async def listing_page(self, page) -> None:
        url, label = page["url"], page["label"]
        got = await self.fetch_page(page)
        if got is None:
            return self._page_done(failed=True)
        fetched, listing = got
        limit = self.config.limits.max_images_per_label
        new: list[tuple[str, int]] = []
        with self.manifest.transaction():
            for product in listing.products:
                # Title rules: which label (label_rules) and whether it is on topic.
                decision = decide(self.config, label, product.title)
                target = decision.label
                if not decision.reject_reason and self.manifest.count_products(target) >= limit:
                    if target == label:
                        break
                    continue                 # a split label is full; others may not be
                shop = urlsplit(product.image_url or product.product_url or url).netloc
                if self.manifest.has_product(target, shop, product.product_id):
                    continue                 # the same product on another page: once
                if (self.config.follow_product_pages and product.product_url
                        and not decision.reject_reason):
                    page_id = self.manifest.add_page(
                        product.product_url, target, "product", page["page_no"], url,
                        product.product_id, product.title)
                    if page_id:
                        new.append(("product", page_id, product.product_url))
                elif product.image_url:
                    image_id = self.manifest.add_image(
                        product.image_url, target, product_id=product.product_id,
                        product_title=product.title, product_url=product.product_url,
                        page_url=url, shop=shop, position=product.position, found_under=label,
                        title_verdict=decision.title_verdict, title_rule=decision.title_rule,
                        extra=product.extra)
                    if image_id and decision.reject_reason:   # recorded, never downloaded
                        self.manifest.mark_unusable(image_id, "rejected",
                                                    decision.reject_reason,
                                                    decision.title_rule or "")
                    elif image_id:
                        new.append(("image", image_id, product.image_url))
            next_url = listing.next_url
            if (next_url and page["page_no"] < self.config.limits.max_pages
                    and self.manifest.count_products(label) < limit):
                self.manifest.add_page(next_url, label, "listing", page["page_no"] + 1, url)
            self.manifest.finish_page(page["id"], "done", None, fetched.status,
                                      len(listing.products), next_url)
        for kind, item_id, item_url in new:
            if kind == "image":
                self.submit_image(item_id, item_url)
            else:
                self.queue.put_nowait((kind, item_id, item_url))
        self._tick(discovered=len(new))
        self._page_done()

    def _page_done(self, failed: bool = False) -> None:
        self.stats.pages += 1
        self.stats.pages_failed += failed
        self._tick(pages=1)

    # -- workers -------------------------------------------------------------------------
    async def worker(self) -> None:
        while True:
            _kind, page_id, _url = await self.queue.get()
            try:
                await self.product_page(page_id)
            except Exception as exc:  # noqa: BLE001 (one bad item must not stop the crawl)
                if out_of_space(exc):
                    self.halt_no_space(exc)
                else:
                    self.manifest.finish_page(page_id, "failed", "internal_error")
            finally:
                self.queue.task_done()

    # -- a full disk: stop, commit what is finished, say so ------------------------------
    def halt_no_space(self, exc: BaseException) -> None:
        """The disk refused a write (ENOSPC / EDQUOT, from a file or from SQLite). Not a
        fault of any image: stop the whole crawl (once); `run` commits and raises DiskFull."""
        if self.no_space is not None:
            return
        self.no_space = exc
        reason = exc if isinstance(exc, OSError) else OSError(errno.ENOSPC, str(exc))
        self.store.stop_writes(reason, wait=False)   # no file written from now on
        if self._work is not None:
            self._work.cancel()

    def _where(self, exc: BaseException) -> Path:
        if isinstance(exc, OSError) and exc.filename:
            return Path(exc.filename)
        return self.manifest.path if isinstance(exc, sqlite3.Error) else self.store.root

    def _final_flush(self) -> None:
        """The last commit of a run. After a full disk, the reserve is given back first so
        that it has room; results it still cannot take stay pending (fetched again)."""
        if self.no_space is None:
            try:
                return self.flush()
            except Exception as exc:
                if not out_of_space(exc):
                    raise
                self.halt_no_space(exc)
        self.store.stop_writes(self.store.refused, wait=True)   # writes in progress end...
        if self.reserve is not None:
            self.reserve.release()       # ...before the reserve's room is given back
        try:
            self.flush()
        except Exception as exc:
            if not out_of_space(exc):
                raise
            self.unsaved = len(self._writes)
            self._writes.clear()

    def _disk_full(self) -> DiskFull:
        return DiskFull(disk_full_message(self.no_space, self._where(self.no_space),
                                          self.manifest, self.unsaved))

    def _write(self, method: Callable[..., None], *args: object, **kwargs: object) -> None:
        self._writes.append((method, args, kwargs))
        if self.no_space is None and (len(self._writes) >= 100
                                      or time.monotonic() - self._last_flush > 0.5):
            try:
                self.flush()
            except Exception as exc:
                if not out_of_space(exc):
                    raise
                self.halt_no_space(exc)  # the batch stays queued for the final flush

    def flush(self) -> None:
        if self._writes:
            with self.manifest.transaction():
                for method, args, kwargs in self._writes:
                    method(*args, **kwargs)
            self._writes.clear()
        self._last_flush = time.monotonic()

    async def product_page(self, page_id: int) -> None:
        page = self.manifest.page(page_id)
        if page["status"] != "pending" or urlsplit(page["url"]).netloc in self.stopped:
            return                       # done already, or its host stopped: next run
        url, label = page["url"], page["label"]
        got = await self.fetch_page(page)
        if got is None:
            status = self.manifest.page(page_id)["status"]
            if status != "pending":
                self._image_done("blocked" if status == "blocked" else "failed")
            return
        fetched, image_url = got
        image_id = None
        with self.manifest.transaction():
            if image_url:
                image_id = self.manifest.add_image(
                    image_url, label, product_id=page["product_id"],
                    product_title=page["product_title"], product_url=url,
                    page_url=page["parent_url"], shop=urlsplit(image_url).netloc)
            self.manifest.finish_page(page_id, "done", None if image_url else "no_image",
                                      fetched.status, int(bool(image_url)))
        if image_id:
            self.submit_image(image_id, image_url)
        else:
            self._image_done("failed")

    # -- images: download threads -> outcomes recorded on the event loop ------------------
    def submit_image(self, image_id: int, url: str) -> None:
        self._in_flight += 1
        self._downloads.put((image_id, url))

    def _download_loop(self) -> None:
        """One download thread: image after image, each outcome handed back to the loop."""
        while not self._closing:
            item = self._downloads.get()
            if item is None or self._closing:
                return
            image_id, url = item
            try:
                kind, facts = self._download(url)
            except Exception as exc:  # noqa: BLE001 (one bad item must not stop the crawl)
                kind, facts = ("no_space" if out_of_space(exc) else "error"), exc
            with self._outcomes_lock:
                self._outcomes.append((image_id, url, kind, facts))
                wake, self._wake_pending = not self._wake_pending, True
            if wake:
                try:
                    self._loop.call_soon_threadsafe(self._record_outcomes)
                except RuntimeError:          # the loop is gone (interrupted): row stays pending
                    return

    def _download(self, url: str) -> tuple[str, object]:
        """Runs in a download thread: fetch, decode, hash and write one image (the sync
        HTTP client and Pillow's decoder both release the GIL while they wait or work)."""
        copy = self._stored_by_url.get(url)
        if copy is not None:             # same URL under another label: bytes already here
            return "reused", copy
        if urlsplit(url).netloc in self.stopped or self.store.refused is not None:
            return "skipped", None       # left pending: the next run fetches it
        # robots.txt is the fetcher's to check, on this URL and on every redirect hop.
        try:
            fetched = self.fetcher.get_sync(url)
        except FetchError as exc:
            return "fetch_error", exc
        try:
            valid = validate_image(fetched.content, self.config.validation)
        except ImageDecodeError as exc:
            return "rejected", (exc, fetched.status, len(fetched.content))
        path = self.store.put(fetched.content, valid.sha256, valid.extension)
        return "stored", {"path": path, "bytes": len(fetched.content), "width": valid.width,
                          "height": valid.height, "format": valid.format,
                          "sha256": valid.sha256, "phash": valid.phash,
                          "http_status": fetched.status}

    def _record_outcomes(self) -> None:
        """On the event loop: every outcome the threads handed back since the last call."""
        with self._outcomes_lock:
            outcomes, self._outcomes = self._outcomes, []
            self._wake_pending = False
        if self._recorded_all:           # after the last flush (interrupted): stays pending
            return
        done = 0
        for image_id, url, kind, facts in outcomes:
            self._in_flight -= 1
            done += self._record(image_id, url, kind, facts)
        if done:
            self._tick(images=done)
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    def _record(self, image_id: int, url: str, kind: str, facts) -> int:
        """Queue one image's manifest write; 1 when it counts as done, 0 when left pending."""
        if kind == "skipped":
            return 0
        if kind == "no_space":           # the disk is full, the image is fine: stays pending
            self.halt_no_space(facts)
            return 0
        if kind in ("stored", "reused"):
            if kind == "reused":
                self.stats.reused += 1
            else:
                self._stored_by_url.setdefault(url, facts)
            self._write(self.manifest.mark_stored, image_id, path=facts["path"],
                        size=facts["bytes"], width=facts["width"], height=facts["height"],
                        fmt=facts["format"], sha256=facts["sha256"], phash=facts["phash"],
                        http_status=facts["http_status"])
            outcome = "stored"
        elif kind == "fetch_error":
            outcome = "blocked" if facts.blocked else "failed"
            self._write(self.manifest.mark_unusable, image_id, outcome, facts.reason,
                        facts.detail, facts.http_status)
        elif kind == "rejected":
            error, http_status, size = facts
            outcome = "rejected"
            self._write(self.manifest.mark_unusable, image_id, "rejected", error.reason,
                        error.detail, http_status, size)
        else:                            # an unexpected exception in the thread
            outcome = "failed"
            self._write(self.manifest.mark_unusable, image_id, "failed", "internal_error",
                        f"{type(facts).__name__}: {facts}")
        self._image_done(outcome, tick=False)
        return 1

    def _image_done(self, outcome: str, tick: bool = True) -> None:
        self.stats.images_done += 1
        if outcome == "stored":
            self.stats.stored += 1
        else:
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        if tick:
            self._tick(images=1)

    # -- the whole run -------------------------------------------------------------------
    async def _walk(self) -> None:
        await asyncio.gather(*(self.walk_label(label) for label in self.config.categories))
        await self.queue.join()          # product pages done: no more images will be found
        while self._in_flight:
            self._idle.clear()
            await self._idle.wait()

    async def run(self) -> CrawlResult:
        """The whole crawl; raises DiskFull (after committing what was finished) when the
        disk refuses a write."""
        self._loop, self._idle = asyncio.get_running_loop(), asyncio.Event()
        try:
            self.seed()
        except Exception as exc:
            if not out_of_space(exc):
                raise
            self.halt_no_space(exc)
            raise self._disk_full() from None
        n_workers = min(64, self.config.politeness.concurrency_per_host *
                        max(1, len(self.config.sites)) + 2)
        # Every page worker and every label's page walker may hold one thread (a request, a
        # backoff sleep): asyncio's default pool (cores + 4) would starve them.
        self._loop.set_default_executor(ThreadPoolExecutor(
            n_workers + len(self.config.categories) + 2, thread_name_prefix="collector"))
        threads = [threading.Thread(target=self._download_loop, daemon=True,
                                    name=f"collector-image-{i}") for i in range(n_workers)]
        for thread in threads:
            thread.start()
        workers = [asyncio.create_task(self.worker()) for _ in range(n_workers)]
        self._work = asyncio.ensure_future(self._walk())
        try:
            await self._work
        except asyncio.CancelledError:
            if self.no_space is None:    # Ctrl-C; halt_no_space cancels it otherwise
                raise
        except Exception as exc:
            if not out_of_space(exc):
                raise
            self.halt_no_space(exc)
        finally:
            # Threads finish the image in hand (an interrupted run's is redone next time,
            # its row still pending) and take no other.
            self._closing = True
            for _ in threads:
                self._downloads.put(None)
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            self._record_outcomes()
            self._final_flush()  # also on Ctrl-C: keep every finished image
            self._recorded_all = True
        if self.no_space is not None:
            raise self._disk_full()
        try:
            apply_rules(self.manifest, self.config)   # fills title columns of product pages
            dedup = run_dedup(self.manifest, self.config.dedup.hamming_threshold)
        except Exception as exc:     # rolled back: rows stay 'downloaded', the next run dedups
            if not out_of_space(exc):
                raise
            self.halt_no_space(exc)
            raise self._disk_full() from None
        return CrawlResult(self.stats, dedup, dict(self.fetcher.stats), dict(self.stopped))


def make_progress(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description:>6}"), BarColumn(),
                    MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                    TimeElapsedColumn(), console=console, transient=False,
                    disable=not console.is_terminal)


def start_urls(config: SourcesConfig) -> list[str]:
    """The URLs the user gave: start pages and listed image URLs (one per host is enough).
    Their own addresses may be non-public (a shop on 127.0.0.1 or an intranet); nothing a
    page or a redirect names later gets that allowance."""
    urls = [url for urls in config.categories.values() for url in urls]
    for url_file in config.url_lists.values():
        urls += [line.strip() for line in url_file.read_text().splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
    return list({urlsplit(url).netloc: url for url in urls}.values())


async def crawl(config: SourcesConfig, console: Console | None = None,
                retry_failed: bool = False) -> CrawlResult:
    """Crawl everything in `config` into `config.output_dir` (resuming what is there).

    Raises DiskFull (a SystemExit, status 4, its message printed on `console`) when the
    disk is full or over quota, at the start or midway; what was finished is committed."""
    console = console or Console(stderr=True)
    reserve = SpaceReserve(config.output_dir)
    manifest = None
    try:
        try:
            reserve.hold()               # room for the last commit if the disk fills
            manifest = open_manifest(config.output_dir)
            store = ImageStore(config.output_dir)
            store.sweep()
            if retry_failed:
                manifest.retry_failed()
        except (OSError, sqlite3.Error) as exc:
            if not out_of_space(exc):
                raise
            where = (Path(exc.filename) if isinstance(exc, OSError) and exc.filename
                     else Path(config.output_dir))
            raise DiskFull(disk_full_message(exc, where, manifest)) from None
        async with Fetcher(config.politeness, config.download, start_urls(config)) as fetcher:
            with make_progress(console) as progress:
                return await Crawler(config, manifest, store, fetcher, progress,
                                     reserve).run()
    except DiskFull as stop:
        console.print(f"[red]{escape(stop.message)}", soft_wrap=True)
        raise
    finally:
        if manifest is not None:
            manifest.close()
        reserve.release()
