"""The one launcher for servers on 127.0.0.1: start, wait until ready, measure, stop.

`make demo`, the benchmarks and the tests all start their servers here (the BentoML service,
the review page, the demo shop, the baseline app): each runs in its own process group, so
stopping it also stops every worker it forked (BentoML starts an API process and model
processes); its output goes to a log file whose tail is shown when it fails to start; `cpus`
pins the whole group with taskset, which is how a benchmark keeps the server off the load
generator's core.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVICE_TARGET = "service.service:ProductClassifier"


class ServerNotReady(RuntimeError):
    """The server exited, or did not answer 200 in time; the message carries its log tail."""


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


@dataclass
class ServerProcess:
    name: str
    url: str
    process: subprocess.Popen
    log_path: Path
    cold_start_s: float = float("nan")  # process start -> first 200 from the ready endpoint
    extra: dict = field(default_factory=dict)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def exit_reason(self) -> str | None:
        code = self.process.poll()
        return None if code is None else f"exited with code {code}"

    def tree(self) -> list[psutil.Process]:
        """The server process and every process it forked, alive now."""
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_bytes(self) -> int:
        total = 0
        for proc in self.tree():
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.tree():
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        """Send `sig` to the whole process group (e.g. SIGKILL to test a crash)."""
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.signal(signal.SIGKILL)  # workers that outlived their parent
        if self.process.poll() is None:
            self.process.wait(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()


def pinned(command: list[str], cpus: str | None) -> list[str]:
    """Prefix `command` with taskset when `cpus` (e.g. "1" or "0-1") is given."""
    return ["taskset", "-c", cpus, *command] if cpus else command


def launch(name: str, command: list[str], *, port: int, log_dir: Path,
           ready_path: str | None = "/readyz", env: dict[str, str] | None = None,
           cwd: Path = REPO, cpus: str | None = None, timeout_s: float = 120.0,
           interval_s: float = 0.05) -> ServerProcess:
    """Start `command` (which listens on 127.0.0.1:`port`) and wait for GET `ready_path` -> 200.

    The log is `log_dir/<name>.log`. On failure the group is stopped and ServerNotReady says
    why, with the log's last lines. `ready_path=None` returns at once (the caller waits).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    started = time.perf_counter()
    with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(pinned(command, cpus), cwd=cwd, env={**os.environ, **(env or {})},
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = ServerProcess(name, f"http://127.0.0.1:{port}", process, log_path)
    if ready_path is None:
        return server
    try:
        server.cold_start_s = wait_until_ready(server.url + ready_path, timeout_s=timeout_s,
                                               started=started, exited=server.exit_reason,
                                               interval_s=interval_s)
    except ServerNotReady as exc:
        server.stop()
        raise ServerNotReady(f"{name}: {exc}; last lines of {log_path}:\n{server.log_tail()}") \
            from None
    except BaseException:
        server.stop()
        raise
    return server


def start_bentoml(model_ref: str | None, port: int | None = None, *,
                  target: str = SERVICE_TARGET,
                  cpus: str | None = None, settings: dict[str, str] | None = None,
                  log_dir: Path = REPO / "reports", name: str = "service",
                  timeout_s: float = 120.0, cwd: Path = REPO) -> ServerProcess:
    """`bentoml serve <target>` on 127.0.0.1 with MODEL_TAG=`model_ref` (tag or .onnx path;
    None: the service's default, the store's latest model).

    A model file gets a BentoML home of its own (see `own_bentoml_home`). `cwd` is the
    checkout whose `service/` is served (another commit's worktree in an A/B). Without a
    `port`, a free one is picked, and picked again if BentoML's own sockets took it first.
    """
    env = {"BENTOML_DO_NOT_TRACK": "True", **(settings or {})}
    if model_ref is not None:
        env = {"MODEL_TAG": model_ref, **own_bentoml_home(model_ref, log_dir / name), **env}
    attempts = 1 if port else 3
    for attempt in range(1, attempts + 1):
        chosen = port or free_port()
        command = [str(BIN / "bentoml"), "serve", target, "--host", "127.0.0.1",
                   "--port", str(chosen)]
        try:
            return launch(name, command, port=chosen, log_dir=log_dir, env=env, cwd=cwd,
                          cpus=cpus, timeout_s=timeout_s)
        except ServerNotReady as exc:
            # A free port is only free until someone binds it: BentoML's process manager binds
            # control sockets of its own on random ports, and can take ours before it serves.
            if attempt == attempts or "Address already in use" not in str(exc):
                raise
    raise ServerNotReady(f"{name}: no port")  # not reached: the last attempt raises


def start_review(data: Path, port: int | None = None, *, log_dir: Path,
                 name: str = "review", timeout_s: float = 60.0) -> ServerProcess:
    """The review page (`collector review --data DIR`) over a collection, on 127.0.0.1.

    `data` is the collection folder, or its manifest.sqlite (the folder is what is passed).
    """
    port = port or free_port()
    folder = Path(data).parent if Path(data).is_file() else Path(data)
    command = [sys.executable, "-m", "collector", "review", "--data", str(folder),
               "--port", str(port), "--no-browser"]
    return launch(name, command, port=port, log_dir=log_dir, ready_path="/api/summary",
                  timeout_s=timeout_s)


def process_role(proc: psutil.Process) -> str:
    """model / api / supervisor for BentoML's processes (by command line), else the name."""
    try:
        command = " ".join(proc.cmdline())
    except psutil.Error:
        return "gone"
    if "onnx-model" in command:
        return "model"
    if "--service-name" in command:
        return "api"
    return "supervisor" if "bentoml" in command else proc.name()
