"""Polite HTTP: one async httpx client, per-host concurrency + rate limit, retries, robots.txt.

Retries (tenacity): connection errors, timeouts, 5xx, 408 and 429, with exponential backoff
and full jitter; a Retry-After header (seconds or HTTP date) is honoured instead, capped at
`backoff_max`, and pauses the whole host, not just the one request (a 429 is about the client,
not the URL). Other 4xx are final at once. robots.txt follows RFC 9309: missing (4xx) means
allow all, unreachable (5xx, connection failure) means disallow all.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
import urllib.robotparser
from dataclasses import dataclass, field
from typing import Self
from urllib.parse import urlsplit

import httpx
from aiolimiter import AsyncLimiter
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from collector.config import Download, Politeness

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504}) | frozenset(range(520, 530))


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


@dataclass
class _Host:
    semaphore: asyncio.Semaphore
    limiter: AsyncLimiter
    paused_until: float = 0.0
    robots: urllib.robotparser.RobotFileParser | None = None
    robots_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


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


def _limiter(rate: float) -> AsyncLimiter:
    # aiolimiter wants "max_rate per time_period"; keep bursts at >= 1 for rates under 1/s.
    burst = max(1.0, rate)
    return AsyncLimiter(burst, burst / rate)


class Fetcher:
    """Use as `async with Fetcher(politeness, download) as fetcher: await fetcher.get(url)`."""

    def __init__(self, politeness: Politeness, download: Download):
        self.politeness = politeness
        self.download = download
        self.hosts: dict[str, _Host] = {}
        self.stats = {"requests": 0, "retries": 0, "errors": 0, "bytes": 0}
        self.client = httpx.AsyncClient(
            headers={"User-Agent": politeness.user_agent, "Accept-Encoding": "gzip, deflate"},
            timeout=httpx.Timeout(download.read_timeout, connect=download.connect_timeout),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            follow_redirects=True, max_redirects=5)
        # base, 2x base, 4x base ... capped, plus up to `base` of random jitter
        self._backoff = wait_exponential_jitter(multiplier=download.backoff_base,
                                                max=download.backoff_max,
                                                jitter=download.backoff_base)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, FetchError) and exc.retry_after is not None:
            return min(exc.retry_after, self.download.backoff_max)
        return self._backoff(state)

    def _count_retry(self, state: RetryCallState) -> None:
        self.stats["retries"] += 1

    def _host(self, url: str) -> _Host:
        key = urlsplit(url).netloc
        host = self.hosts.get(key)
        if host is None:
            host = _Host(asyncio.Semaphore(self.politeness.concurrency_per_host),
                         _limiter(self.politeness.requests_per_second_per_host))
            self.hosts[key] = host
        return host

    # -- robots.txt ----------------------------------------------------------------------
    async def allowed(self, url: str) -> bool:
        if not self.politeness.obey_robots:
            return True
        host = self._host(url)
        async with host.robots_lock:
            if host.robots is None:
                host.robots = await self._load_robots(url)
        return host.robots.can_fetch(self.politeness.user_agent, url)

    async def _load_robots(self, url: str) -> urllib.robotparser.RobotFileParser:
        parts = urlsplit(url)
        robots_url = f"{parts.scheme}://{parts.netloc}/robots.txt"
        parser = urllib.robotparser.RobotFileParser(robots_url)
        try:
            fetched = await self.get(robots_url, max_bytes=512_000)
            parser.parse(fetched.content.decode("utf-8", "replace").splitlines())
        except FetchError as exc:
            if exc.http_status is not None and 400 <= exc.http_status < 500:
                parser.allow_all = True
            else:
                parser.disallow_all = True
        return parser

    # -- requests ------------------------------------------------------------------------
    async def get(self, url: str, max_bytes: int | None = None) -> Fetched:
        """GET with politeness and retries; raises FetchError with the last failure."""
        max_bytes = max_bytes or self.download.max_bytes
        attempts = 0

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.download.retries + 1),
            retry=retry_if_exception(lambda e: isinstance(e, FetchError) and e.retryable),
            wait=self._wait, reraise=True, before_sleep=self._count_retry)
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    result = await self._once(url, max_bytes)
                    result.attempts = attempts
                    return result
        except FetchError:
            self.stats["errors"] += 1
            raise
        raise AssertionError("unreachable")

    async def _once(self, url: str, max_bytes: int) -> Fetched:
        host = self._host(url)
        async with host.semaphore:
            pause = host.paused_until - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            await host.limiter.acquire()
            self.stats["requests"] += 1
            try:
                async with asyncio.timeout(self.download.total_timeout):
                    return await self._stream(url, max_bytes, host)
            except TimeoutError:
                raise FetchError("timeout", f"no full answer in {self.download.total_timeout}s",
                                 retryable=True) from None
            except httpx.TimeoutException as exc:
                raise FetchError("timeout", type(exc).__name__, retryable=True) from None
            except httpx.TooManyRedirects as exc:
                raise FetchError("too_many_redirects", str(exc)) from None
            except (httpx.TransportError, httpx.DecodingError) as exc:
                raise FetchError("connection_error", f"{type(exc).__name__}: {exc}",
                                 retryable=True) from None

    async def _stream(self, url: str, max_bytes: int, host: _Host) -> Fetched:
        from collector.download import read_capped  # the byte cap lives with downloading

        async with self.client.stream("GET", url) as response:
            status = response.status_code
            if status >= 400:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if retry_after is not None and status in (429, 503):
                    host.paused_until = max(host.paused_until, time.monotonic() +
                                            min(retry_after, self.download.backoff_max))
                raise FetchError(f"http_{status}", response.reason_phrase, http_status=status,
                                 retryable=status in RETRY_STATUSES, retry_after=retry_after)
            content = await read_capped(response, max_bytes)
            self.stats["bytes"] += len(content)
            return Fetched(str(response.url), status, content,
                           response.headers.get("Content-Type", ""), attempts=1)
