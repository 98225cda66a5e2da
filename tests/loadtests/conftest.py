"""Load-test fixtures: a misbehaving HTTP server on 127.0.0.1 for the failure checks (the
tiny served model and trained run are in tests/conftest.py, shared with the benchmarks' tests)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

from loadtests.servers import free_port

GOOD_PREDICTION = {"label": "dress", "score": 0.7,
                   "top_k": [{"label": "dress", "score": 0.7}, {"label": "hat", "score": 0.2}],
                   "model": {"name": "product-classifier", "version": "test"}}


class FakeServer:
    """An HTTP server on 127.0.0.1 answering POSTs with what `answer(path)` returns."""

    def __init__(self, answer):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, body = answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args):
                pass

            def handle(self):
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # Locust hangs up when its run time ends

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def json_bytes(obj) -> bytes:
    return json.dumps(obj).encode()
