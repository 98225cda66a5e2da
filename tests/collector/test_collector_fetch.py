"""The HTTP layer against the demo shop on 127.0.0.1: retries, Retry-After, no retry on 4xx,
byte cap, timeouts, robots.txt (present, disallowing, unreachable)."""

from __future__ import annotations

import asyncio
import time

import pytest

from collector.config import Download, Politeness
from collector.fetch import Fetcher, FetchError
from loadtests.servers import free_port
from tests.collector.conftest import start_shop


@pytest.fixture(scope="module")
def shop():
    shop = start_shop()
    yield shop
    shop.stop()


def product_with(shop, fault: str):
    return next(p for p in shop.plan.products.values() if fault in p.faults)


def fetch(url: str, *, politeness: Politeness | None = None, **download):
    async def go():
        async with Fetcher(politeness or Politeness(requests_per_second_per_host=100),
                           Download(**{"backoff_base": 0.05, **download}),
                           start_urls=[url]) as fetcher:
            try:
                return await fetcher.get(url), fetcher
            except FetchError as exc:
                return exc, fetcher
    return asyncio.run(go())


def test_collector_retries_a_burst_of_500(shop):
    path = shop.image_url(product_with(shop, "500"))
    result, fetcher = fetch(shop.url + path)
    assert result.status == 200 and result.attempts == 3 and fetcher.stats["retries"] == 2
    assert result.content[:2] == b"\xff\xd8"


def test_collector_honours_retry_after(shop):
    path = shop.image_url(product_with(shop, "429"))
    started = time.monotonic()
    result, _ = fetch(shop.url + path)
    assert result.status == 200 and result.attempts == 2
    assert time.monotonic() - started >= 0.95      # waited the server's 1 s, not 0.05 s


def test_collector_gives_up_after_retries(shop):
    path = shop.image_url(product_with(shop, "500")).replace("full", "w200")
    error, fetcher = fetch(shop.url + path, retries=1)
    assert isinstance(error, FetchError) and error.reason == "http_500"
    assert shop.hits["GET " + path] == 2 and fetcher.stats["errors"] == 1


def test_collector_no_retry_on_404(shop):
    path = shop.image_url(product_with(shop, "missing"))
    error, _ = fetch(shop.url + path)
    assert isinstance(error, FetchError) and error.http_status == 404
    assert not error.retryable and shop.hits["GET " + path] == 1


def test_collector_byte_cap_aborts_the_stream(shop):
    path = shop.image_url(next(p for p in shop.plan.products.values() if not p.faults))
    error, _ = fetch(shop.url + path, max_bytes=2048)
    assert isinstance(error, FetchError) and error.reason == "too_large"
    assert shop.hits["GET " + path] == 1


def test_collector_read_timeout_is_retried_then_reported(shop):
    path = shop.image_url(product_with(shop, "slow")).replace("full", "w300")
    error, _ = fetch(shop.url + path, read_timeout=0.2, retries=1)
    assert isinstance(error, FetchError) and error.reason == "timeout"
    assert shop.hits["GET " + path] == 2


def test_collector_robots_txt(shop):
    async def go(politeness, url):
        async with Fetcher(politeness, Download(retries=0), start_urls=[url]) as fetcher:
            return await fetcher.allowed(url)

    polite = Politeness()
    assert asyncio.run(go(polite, shop.url + "/img/X/full.jpg"))
    assert not asyncio.run(go(polite, shop.url + "/private/img/X/full.jpg"))
    assert asyncio.run(go(Politeness(obey_robots=False), shop.url + "/private/img/X/full.jpg"))
    # RFC 9309: robots.txt unreachable -> assume everything is disallowed
    assert not asyncio.run(go(polite, f"http://127.0.0.1:{free_port()}/search?q=x"))


def test_collector_robots_crawl_delay_slows_the_host():
    slow_site = start_shop(faults=(), per_label=1, crawl_delay=2)
    try:
        async def go():
            async with Fetcher(Politeness(requests_per_second_per_host=50),
                               Download(retries=0), start_urls=[slow_site.url]) as fetcher:
                assert await fetcher.allowed(slow_site.url + "/search?q=hat")
                host = fetcher.hosts[slow_site.url.split("//")[1]]
                return host.limiter.rate
        assert asyncio.run(go()) == 0.5                    # 1 / 2 s, not our 50/s
    finally:
        slow_site.stop()


def robots_rules(text: str):
    from protego import Protego

    return Protego.parse(text)


def test_collector_robots_wildcards_and_end_anchor():
    """RFC 9309 patterns as real sites write them (urllib.robotparser ignores `*` and `$`)."""
    agent = Politeness().user_agent
    rules = robots_rules("User-agent: *\nDisallow: /*.png$\n"
                         "Disallow: */s?k=*&rh=n*p_*p_*p_\n")
    assert not rules.can_fetch("https://shop.example/img/a.png", agent)
    assert rules.can_fetch("https://shop.example/img/a.png?w=200", agent)   # $ ends the URL
    assert rules.can_fetch("https://shop.example/img/a.pngx", agent)
    # Amazon.in's rule: a search refined by three or more filters is off limits
    assert not rules.can_fetch(
        "https://www.amazon.in/s?k=shoes&rh=n%3A1983518031%2Cp_36%3A1%2Cp_72%3A2%2Cp_n_3", agent)
    assert rules.can_fetch("https://www.amazon.in/s?k=shoes&rh=n%3A1983518031", agent)
    assert rules.can_fetch("https://www.amazon.in/s?k=shoes", agent)


def test_collector_robots_longest_match_wins_and_allow_wins_ties():
    agent = Politeness().user_agent
    rules = robots_rules("User-agent: *\nDisallow: /\nAllow: /$\nAllow: /shop/\n"
                         "Disallow: /shop/private\nAllow: /tie\nDisallow: /tie\n")
    assert rules.can_fetch("https://s.example/", agent)                 # Allow: /$
    assert not rules.can_fetch("https://s.example/about", agent)        # Disallow: /
    assert rules.can_fetch("https://s.example/shop/hats", agent)        # longer Allow
    assert not rules.can_fetch("https://s.example/shop/private/x", agent)  # longer Disallow
    assert rules.can_fetch("https://s.example/tie", agent)              # equal length: Allow
    # a group for our agent replaces the * group (RFC 9309 2.2.1)
    ours = robots_rules("User-agent: *\nDisallow: /\n\n"
                        "User-agent: product-classifier-collector\nAllow: /\n")
    assert ours.can_fetch("https://s.example/a", agent)
