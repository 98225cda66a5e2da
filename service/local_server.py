"""Running a server on 127.0.0.1: a free port, and waiting until its readiness endpoint says 200.

Shared by everything that starts the service (or the baseline) and must know when it can take
traffic, or must not disturb another BentoML server: `make demo`, the tests, the benchmarks and
the container check.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx


class ServerNotReady(RuntimeError):
    """The server exited, or did not answer 200 in time."""


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(url: str, *, timeout_s: float, exited: Callable[[], str | None] = lambda: None,
                     started: float | None = None, interval_s: float = 0.05) -> float:
    """Poll GET `url` until it answers 200; returns the seconds since `started` (default: now).

    `exited` says why the server is gone (e.g. "exited with code 3") or None while it runs,
    so a crash fails at once instead of after the whole timeout.
    """
    started = time.perf_counter() if started is None else started
    deadline = started + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while time.perf_counter() < deadline:
            if (reason := exited()) is not None:
                raise ServerNotReady(f"{url}: the server {reason} before it was ready")
            try:
                if client.get(url).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(interval_s)
    raise ServerNotReady(f"{url} did not answer 200 within {timeout_s:.0f} s")


def exit_reason(process) -> Callable[[], str | None]:
    """`exited` for a subprocess.Popen: its exit code once it has ended."""
    return lambda: None if process.poll() is None else f"exited with code {process.returncode}"


def own_bentoml_home(model_ref: str, folder: Path) -> dict[str, str]:
    """Env that gives a `bentoml serve` of a model *file* a BentoML home of its own.

    `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir when it starts, which wipes
    the /metrics of every other BentoML server running under the same home (a user's own
    service, or another server of a benchmark or test). A model file needs no model store, so
    such a server gets its own home under `folder`; a store tag keeps the shared one.
    """
    if not Path(model_ref).is_file():
        return {}
    home = folder / "bentoml-home"
    home.mkdir(parents=True, exist_ok=True)
    return {"BENTOML_HOME": str(home)}
