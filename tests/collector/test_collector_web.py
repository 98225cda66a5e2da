"""The real web's manners against small servers on 127.0.0.0/8: robots.txt patterns, redirects
followed hop by hop, refused addresses, trickling servers, Retry-After as an HTTP date."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

from collector.config import Download, Politeness
from collector.fetch import Fetcher, FetchError

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


def run(use, politeness: Politeness | None = None, **download):
    async def go():
        async with Fetcher(politeness or Politeness(requests_per_second_per_host=100),
                           Download(**{"backoff_base": 0.05, **download})) as fetcher:
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
        assert run(verdicts) == [False, True, False, True, False, True]
        assert site.hits["/robots.txt"] == 1               # read once per host
