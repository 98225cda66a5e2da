"""The real web's manners against small servers on 127.0.0.0/8: robots.txt patterns, redirects
followed hop by hop, refused addresses, trickling servers, Retry-After as an HTTP date,
compressed bodies (and bombs), non-ASCII URLs."""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import ipaddress
import threading
import time
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

import pytest

from collector.config import Download, Politeness
from collector.fetch import Fetcher, FetchError, parse_retry_after, wire_url
from collector.network import AddressPolicy, AddressRefused, kind_of, refusal

Route = Callable[[BaseHTTPRequestHandler], None]


class Stub:
    """An HTTP server on `host` whose paths answer with the given functions; it counts
    every TCP connection it accepts, so a test can prove that nothing connected."""

    def __init__(self, routes: dict[str, Route], host: str = "127.0.0.1"):
        stub = self
        self.routes = routes
        self.connections = 0
        self.hits: dict[str, int] = {}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                stub.hits[self.path] = stub.hits.get(self.path, 0) + 1
                route = stub.routes.get(self.path.split("?")[0])
                if route is None:
                    return answer(self, 404, b"not here")
                route(self)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request, client_address) -> bool:
                stub.connections += 1
                return True

        self.server = Server((host, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def answer(handler: BaseHTTPRequestHandler, status: int, body: bytes = b"",
           headers: dict[str, str] | None = None, content_type: str = "text/html") -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(body)


def text(body: str, status: int = 200, **headers: str) -> Route:
    return lambda h: answer(h, status, body.encode(), headers, "text/plain")


def redirect(location: str, status: int = 302) -> Route:
    return lambda h: answer(h, status, b"", {"Location": location})


def run(use, start: str, politeness: Politeness | None = None, **download):
    """`await use(fetcher)` with a Fetcher whose crawl starts at `start`."""
    async def go():
        async with Fetcher(politeness or Politeness(requests_per_second_per_host=100),
                           Download(**{"backoff_base": 0.05, **download}),
                           start_urls=[start]) as fetcher:
            try:
                return await use(fetcher)
            except FetchError as exc:
                return exc
    return asyncio.run(go())


# -- robots.txt ----------------------------------------------------------------------------
def test_collector_robots_patterns_from_a_real_robots_file():
    robots = ("User-agent: *\nDisallow: /*.png$\nDisallow: */s?k=*&rh=n*p_*p_*p_\n"
              "Disallow: /gp/\nAllow: /gp/bestsellers/\n")
    with Stub({"/robots.txt": text(robots)}) as site:
        urls = ["/img/a.png", "/img/a.png?w=2", "/s?k=hat&rh=n%3A1%2Cp_1%2Cp_2%2Cp_3",
                "/s?k=hat&rh=n%3A1", "/gp/cart", "/gp/bestsellers/shoes"]

        async def verdicts(fetcher):
            return [await fetcher.allowed(site.url + u) for u in urls]
        assert run(verdicts, site.url) == [False, True, False, True, False, True]
        assert site.hits["/robots.txt"] == 1               # read once per host


# -- the SSRF guard ------------------------------------------------------------------------
@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("127.0.0.2", "loopback"), ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"), ("169.254.169.254", "link-local"),
    ("fe80::1", "link-local"), ("10.1.2.3", "private"), ("172.16.0.1", "private"),
    ("192.168.1.1", "private"), ("fd00::1", "private"), ("224.0.0.251", "multicast"),
    ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved"),
    ("100.64.0.1", "not public"), ("93.184.216.34", None), ("2606:4700::1111", None),
])
def test_collector_address_kinds(address, kind):
    assert kind_of(ipaddress.ip_address(address)) == kind


def test_collector_refusal_is_a_pure_function_of_the_addresses():
    ip = ipaddress.ip_address
    assert refusal([ip("93.184.216.34")]) is None
    assert refusal([ip("169.254.169.254")]) == "169.254.169.254 is a link-local address"
    # one bad answer among good ones refuses the host (the resolver must not get to choose)
    assert "10.0.0.7" in refusal([ip("93.184.216.34"), ip("10.0.0.7")])
    allowed = [ipaddress.ip_network("10.0.0.0/8")]
    assert refusal([ip("10.0.0.7")], allowed) is None
    assert refusal([ip("::ffff:10.0.0.7")], allowed) is None
    assert refusal([ip("192.168.0.7")], allowed) is not None


def test_collector_start_urls_allow_their_own_addresses_only():
    policy = AddressPolicy.for_crawl(["http://127.0.0.1:8765/search?q=hat"])
    assert policy.allowed == (ipaddress.ip_network("127.0.0.1/32"),)
    assert policy.addresses("127.0.0.1", 80) == [ipaddress.ip_address("127.0.0.1")]
    with pytest.raises(AddressRefused, match="127.0.0.2 is a loopback address"):
        policy.addresses("127.0.0.2", 80)
    with pytest.raises(AddressRefused):      # a name is resolved, then checked
        AddressPolicy.for_crawl(["https://shop.example/"]).addresses("localhost", 80)
    assert AddressPolicy.for_crawl([], allow_all=True).addresses("127.0.0.2", 80)


def test_collector_redirect_to_another_address_is_refused_before_connecting():
    """Start URL on 127.0.0.1, so only 127.0.0.1 may be reached; its redirect to a listener
    on 127.0.0.2 is refused before a connection is opened (the listener counts them)."""
    inside = Stub({"/": text("inside")}, host="127.0.0.2")
    with inside, Stub({"/robots.txt": text("", 404), "/go": redirect(inside.url + "/")}) as shop:
        error = run(lambda f: f.get(shop.url + "/go"), shop.url)
        assert isinstance(error, FetchError) and error.reason == "refused_address"
        assert "127.0.0.2 is a loopback address" in error.detail
        assert not error.retryable
        direct = run(lambda f: f.get(inside.url + "/"), shop.url)    # a URL from a page
        assert isinstance(direct, FetchError) and direct.reason == "refused_address"
        assert inside.connections == 0 and not inside.hits
        # the listener does count: allowed explicitly, the same redirect connects
        allowed = Politeness(requests_per_second_per_host=100, obey_robots=False,
                             allowed_networks=["127.0.0.2/32"])
        ok = run(lambda f: f.get(shop.url + "/go"), shop.url, allowed)
        assert ok.content == b"inside" and ok.redirects == [shop.url + "/go"]
        assert inside.connections == 1


# -- redirects, hop by hop -------------------------------------------------------------------
def test_collector_redirects_are_followed_hop_by_hop():
    other = Stub({"/robots.txt": text("User-agent: *\nDisallow: /secret\n")})
    with other, Stub({"/robots.txt": text("", 404), "/a": redirect("/b", 301),
                      "/b": redirect("/c", 307), "/c": text("photo"),
                      "/loop": redirect("/loop"), "/away": redirect(other.url + "/secret/x"),
                      "/ftp": redirect("ftp://files.example/x")}) as shop:
        fetched = run(lambda f: f.get(shop.url + "/a"), shop.url)
        assert fetched.content == b"photo" and fetched.url == shop.url + "/c"
        assert fetched.redirects == [shop.url + "/a", shop.url + "/b"]

        loop = run(lambda f: f.get(shop.url + "/loop"), shop.url, max_redirects=3)
        assert isinstance(loop, FetchError) and loop.reason == "too_many_redirects"
        assert shop.hits["/loop"] == 4                 # the first request + 3 hops

        # robots.txt of the hop's own host decides, before the hop is requested
        async def away(fetcher):
            try:
                await fetcher.get(shop.url + "/away")
            except FetchError as exc:
                return exc, set(fetcher.hosts)
        error, hosts = run(away, shop.url)
        assert error.reason == "robots" and error.blocked
        assert "/secret/x" not in other.hits and other.hits["/robots.txt"] == 1
        assert hosts == {urlsplit(shop.url).netloc, urlsplit(other.url).netloc}

        scheme = run(lambda f: f.get(shop.url + "/ftp"), shop.url)
        assert isinstance(scheme, FetchError) and scheme.reason == "bad_redirect"


# -- slow and busy servers -------------------------------------------------------------------
def trickle(handler: BaseHTTPRequestHandler) -> None:
    """Headers at once, then one byte every 50 ms: never silent long enough for a read
    timeout, and never done."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/jpeg")
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    try:
        for _ in range(400):               # bounded: 20 s at most if nobody hangs up
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.05)
    except OSError:
        pass                               # the collector hung up: as it should


def test_collector_total_timeout_stops_a_trickling_server():
    with Stub({"/robots.txt": text("", 404), "/slow.jpg": trickle}) as shop:
        error = run(lambda f: f.get(shop.url + "/slow.jpg"), shop.url, read_timeout=2,
                    total_timeout=0.5, retries=0)
    assert isinstance(error, FetchError) and error.reason == "timeout"
    assert error.detail == "the whole answer took too long"


def test_collector_retry_after_as_an_http_date():
    assert parse_retry_after("120") == 120
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= parse_retry_after(soon) <= 31
    assert parse_retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0
    assert parse_retry_after("next tuesday") is None

    calls = []

    def busy(handler):
        calls.append(time.monotonic())
        if len(calls) == 1:
            when = email.utils.formatdate(time.time() + 2, usegmt=True)
            return answer(handler, 503, b"busy", {"Retry-After": when})
        answer(handler, 200, b"photo")

    with Stub({"/robots.txt": text("", 404), "/p.jpg": busy}) as shop:
        async def go(fetcher):
            fetched = await fetcher.get(shop.url + "/p.jpg")
            return fetched, fetcher.hosts[urlsplit(shop.url).netloc].paused_until
        fetched, paused_until = run(go, shop.url)
    assert fetched.content == b"photo" and fetched.attempts == 2
    # the date paused the whole host (not the 0.05 s backoff), and the retry came after it
    assert paused_until > calls[0] + 0.5 and calls[1] >= paused_until - 0.01


# -- block pages behind redirects and error answers ----------------------------------------------
def test_collector_block_pages_behind_a_503_or_a_redirect_are_not_retried_at_once():
    from collector.blocks import block_check
    from collector.config import SiteProfile

    captcha = b"<html><title>Robot Check</title><h4>Enter the characters you see below</h4>"
    with Stub({"/robots.txt": text("", 404),
               "/s": lambda h: answer(h, 503, captcha),
               "/busy": lambda h: answer(h, 503, b"<h1>Service Unavailable</h1>"),
               "/k": redirect("/errors/validateCaptcha?amzn=1")}) as shop:
        check = block_check(SiteProfile(card="div.s-result-item"))
        error = run(lambda f: f.get(shop.url + "/s", block_check=check), shop.url)
        assert (error.reason, error.blocked, error.http_status) == ("captcha", True, 503)
        assert shop.hits["/s"] == 1                       # a block: no immediate retries
        busy = run(lambda f: f.get(shop.url + "/busy", block_check=check), shop.url,
                   retries=1)
        assert busy.reason == "http_503" and shop.hits["/busy"] == 2   # an outage: retried
        hop = run(lambda f: f.get(shop.url + "/k", block_check=check), shop.url)
        assert (hop.reason, hop.blocked) == ("captcha", True)
        assert not any(k.startswith("/errors/") for k in shop.hits)   # not followed


# -- what bodies and URLs look like on the wire -------------------------------------------------
def gzipped(body: bytes, encoding: str = "gzip") -> Route:
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    return lambda h: answer(h, 200, packed, {"Content-Encoding": encoding})


def test_collector_decodes_gzip_and_deflate_bodies():
    page = b"<html>" + b"<li>saree</li>" * 500 + b"</html>"
    with Stub({"/robots.txt": text("", 404), "/g": gzipped(page),
               "/d": gzipped(page, "deflate")}) as shop:
        for path in ("/g", "/d"):
            fetched = run(lambda f, p=path: f.get(shop.url + p), shop.url)
            assert fetched.content == page


def test_collector_caps_a_gzip_bomb_after_decompression():
    # 20 MB of zeros is 20 kB gzipped: the Content-Length check alone would let it in.
    with Stub({"/robots.txt": text("", 404), "/bomb.jpg": gzipped(bytes(20_000_000))}) as shop:
        error = run(lambda f: f.get(shop.url + "/bomb.jpg"), shop.url, max_bytes=1_000_000)
    assert isinstance(error, FetchError) and error.reason == "too_large"


def test_collector_sends_non_ascii_urls_percent_encoded():
    with Stub({"/robots.txt": text("", 404),
               "/img/r%C3%B6d%20saree.jpg": text("found")}) as shop:
        fetched = run(lambda f: f.get(shop.url + "/img/röd saree.jpg"), shop.url)
    assert fetched.content == b"found"
    assert wire_url("http://shop.example/a%20b?q=x y") == "http://shop.example/a%20b?q=x%20y"
