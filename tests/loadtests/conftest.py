"""Load-test fixtures: a real `bentoml serve` on a tiny ONNX CNN, a tiny trained run for the
baseline, and a misbehaving HTTP server on 127.0.0.1 for the failure checks."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import pytest

from loadtests.servers import start_bentoml
from service.local_server import free_port
from tests.conftest import DEMO_CATALOG
from tests.service.conftest import build_tiny_cnn, tiny_contract


@pytest.fixture(scope="session")
def tiny_onnx_model(tmp_path_factory) -> Path:
    return build_tiny_cnn(tmp_path_factory.mktemp("lt-model") / "tiny.onnx", tiny_contract())


@pytest.fixture(scope="session")
def tiny_service(tiny_onnx_model, tmp_path_factory):
    """The real service (`bentoml serve service.service:ProductClassifier`) on the tiny model."""
    server = start_bentoml(str(tiny_onnx_model), free_port(),
                           settings={"CLASSIFIER_ORT_THREADS": "1"},
                           log_dir=tmp_path_factory.mktemp("lt-serve"))
    with server:
        yield server


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A real trainer run folder (head-only, a few images): checkpoint for the baseline app."""
    from trainer.config import TrainConfig
    from trainer.train import train

    out = tmp_path_factory.mktemp("lt-run") / "run"
    train(TrainConfig(data=DEMO_CATALOG, out=out, epochs=0, head_epochs=2, max_train_images=50,
                      max_val_images=10))
    return out


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
