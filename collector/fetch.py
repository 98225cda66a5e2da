"""Polite HTTP: one pooled httpx client, per-host concurrency + rate limit, retries, robots.txt.

Retries (tenacity): connection errors, timeouts, 5xx, 408 and 429, with exponential backoff
and jitter; a Retry-After header (seconds or HTTP date) is honoured instead, capped at
`backoff_max`, and pauses the whole host, not just the one request (a 429 is about the client,
not the URL). Other 4xx are final at once. robots.txt follows RFC 9309: missing (4xx) means
allow all, unreachable (5xx, connection failure) means disallow all; rules are matched by
Protego (the parser Scrapy uses): `*` and `$` wildcards, the longest matching rule wins, Allow
wins a tie (urllib.robotparser applies the first match and ignores both wildcards, so
`Disallow: /*.png$` let `/img/a.png` through). A Crawl-delay slower than our own rate lowers
the host's rate to it.

The crawl is asyncio; each request runs `httpx.Client` (connection reuse, keep-alive) in a
worker thread. Measured here on 1,000 photos from the demo shop: httpx's AsyncClient cost
1.7-1.9 ms of CPU per request (its anyio layer), the same client in threads 1.0 ms and
served 1.3x the requests per second. So `get_sync` is the work and `get` its awaitable door;
the per-host limits are thread-safe and shared by pages and images. Bodies are read with a
byte cap (`read_capped`, also checked up front against Content-Length), so a 2 GB "image"
costs at most `max_bytes` of memory.
"""

from __future__ import annotations

import asyncio
import email.utils
import threading
import time
from dataclasses import dataclass, field
from typing import Self
from urllib.parse import urlsplit

import httpx
from protego import Protego
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from collector.config import Download, Politeness

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504}) | frozenset(range(520, 530))
ROBOTS_MAX_BYTES = 512_000       # RFC 9309 asks parsers to read at least 500 KiB
ALLOW_ALL = Protego.parse("")
DISALLOW_ALL = Protego.parse("User-agent: *\nDisallow: /\n")


class FetchError(Exception):
    """A request that did not give a usable response. `reason` is short: http_404, timeout..."""

    def __init__(self, reason: str, detail: str = "", http_status: int | None = None,
                 retryable: bool = False, retry_after: float | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.http_status = http_status
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass
class Fetched:
    url: str                 # final URL after redirects
    status: int
    content: bytes
    content_type: str
    attempts: int


class RateLimit:
    """Leaky bucket shared by threads: `rate` requests per second, bursts of up to `burst`."""

    def __init__(self, rate: float, burst: float | None = None):
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self.tokens = self.burst
        self.updated = time.monotonic()
        self.lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self.lock:
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                wait = (1 - self.tokens) / self.rate
            time.sleep(wait)


@dataclass
class _Host:
    semaphore: threading.BoundedSemaphore
    limiter: RateLimit
    paused_until: float = 0.0
    robots: Protego | None = None
    robots_lock: threading.Lock = field(default_factory=threading.Lock)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def read_capped(response: httpx.Response, max_bytes: int, deadline: float | None = None) -> bytes:
    """The body, or FetchError too_large past `max_bytes`, or timeout past `deadline` (a
    server that trickles bytes defeats a per-read timeout, not this)."""
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise FetchError("too_large", f"Content-Length {declared} > {max_bytes} bytes",
                         http_status=response.status_code)
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise FetchError("too_large", f"more than {max_bytes} bytes",
                             http_status=response.status_code)
        if deadline is not None and time.monotonic() > deadline:
            raise FetchError("timeout", "the whole answer took too long", retryable=True)
        chunks.append(chunk)
    return b"".join(chunks)


class Fetcher:
    """`with Fetcher(politeness, download) as f: f.get_sync(url)`; `await f.get(url)` in async
    code (`async with` works too)."""

    def __init__(self, politeness: Politeness, download: Download):
        self.politeness = politeness
        self.download = download
        self.hosts: dict[str, _Host] = {}
        self._hosts_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "errors": 0, "bytes": 0}
        self.client = httpx.Client(
            headers={"User-Agent": politeness.user_agent, "Accept-Encoding": "gzip, deflate"},
            timeout=httpx.Timeout(download.read_timeout, connect=download.connect_timeout),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            follow_redirects=True, max_redirects=5)
        # base, 2x base, 4x base ... capped, plus up to `base` of random jitter
        self._backoff = wait_exponential_jitter(multiplier=download.backoff_base,
                                                max=download.backoff_max,
                                                jitter=download.backoff_base)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.client.close()

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def _host(self, url: str) -> _Host:
        key = urlsplit(url).netloc
        with self._hosts_lock:
            host = self.hosts.get(key)
            if host is None:
                host = _Host(threading.BoundedSemaphore(self.politeness.concurrency_per_host),
                             RateLimit(self.politeness.requests_per_second_per_host))
                self.hosts[key] = host
            return host

    # -- robots.txt ----------------------------------------------------------------------
    async def allowed(self, url: str) -> bool:
        host = self._host(url)
        if not self.politeness.obey_robots:
            return True
        if host.robots is None:
            return await asyncio.to_thread(self.allowed_sync, url)
        return host.robots.can_fetch(url, self.politeness.user_agent)

    def allowed_sync(self, url: str) -> bool:
        if not self.politeness.obey_robots:
            return True
        host = self._host(url)
        with host.robots_lock:
            if host.robots is None:
                host.robots = self._load_robots(url)
                delay = host.robots.crawl_delay(self.politeness.user_agent)
                if delay and float(delay) > 0 and 1 / float(delay) < host.limiter.rate:
                    # The site asked for a slower pace than ours: its wish wins.
                    host.limiter = RateLimit(1 / float(delay), burst=1)
        return host.robots.can_fetch(url, self.politeness.user_agent)

    def _load_robots(self, url: str) -> Protego:
        parts = urlsplit(url)
        robots_url = f"{parts.scheme}://{parts.netloc}/robots.txt"
        try:
            fetched = self.get_sync(robots_url, max_bytes=ROBOTS_MAX_BYTES)
        except FetchError as exc:
            if exc.http_status is not None and 400 <= exc.http_status < 500:
                return ALLOW_ALL           # RFC 9309 2.3.1.3: "unavailable"
            return DISALLOW_ALL            # 2.3.1.4: "unreachable" (or past 500 KiB: be safe)
        return Protego.parse(fetched.content.decode("utf-8", "replace"))

    # -- requests ------------------------------------------------------------------------
    async def get(self, url: str, max_bytes: int | None = None) -> Fetched:
        return await asyncio.to_thread(self.get_sync, url, max_bytes)

    def get_sync(self, url: str, max_bytes: int | None = None) -> Fetched:
        """GET with politeness and retries; raises FetchError with the last failure."""
        max_bytes = max_bytes or self.download.max_bytes
        attempts = 0
        retrying = Retrying(
            stop=stop_after_attempt(self.download.retries + 1),
            retry=retry_if_exception(lambda e: isinstance(e, FetchError) and e.retryable),
            wait=self._wait, reraise=True, before_sleep=lambda _: self._count("retries"))
        try:
            for attempt in retrying:
                with attempt:
                    attempts += 1
                    result = self._once(url, max_bytes)
                    result.attempts = attempts
                    return result
        except FetchError:
            self._count("errors")
            raise
        raise AssertionError("unreachable")

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, FetchError) and exc.retry_after is not None:
            return min(exc.retry_after, self.download.backoff_max)
        return self._backoff(state)

    def _once(self, url: str, max_bytes: int) -> Fetched:
        host = self._host(url)
        with host.semaphore:
            pause = host.paused_until - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            host.limiter.acquire()
            self._count("requests")
            try:
                return self._stream(url, max_bytes, host)
            except httpx.TimeoutException as exc:
                raise FetchError("timeout", type(exc).__name__, retryable=True) from None
            except httpx.TooManyRedirects as exc:
                raise FetchError("too_many_redirects", str(exc)) from None
            except (httpx.TransportError, httpx.DecodingError) as exc:
                raise FetchError("connection_error", f"{type(exc).__name__}: {exc}",
                                 retryable=True) from None

    def _stream(self, url: str, max_bytes: int, host: _Host) -> Fetched:
        deadline = time.monotonic() + self.download.total_timeout
        with self.client.stream("GET", url) as response:
            status = response.status_code
            if status >= 400:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if retry_after is not None and status in (429, 503):
                    host.paused_until = max(host.paused_until, time.monotonic() +
                                            min(retry_after, self.download.backoff_max))
                raise FetchError(f"http_{status}", response.reason_phrase, http_status=status,
                                 retryable=status in RETRY_STATUSES, retry_after=retry_after)
            content = read_capped(response, max_bytes, deadline)
            self._count("bytes", len(content))
            return Fetched(str(response.url), status, content,
                           response.headers.get("Content-Type", ""), attempts=1)
