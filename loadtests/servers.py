"""Start, time and stop the servers under test: `bentoml serve` and the baseline app.

Each server runs in its own process group so that stopping it also stops the workers it forks
(BentoML starts an API process and model processes). `cpus` pins the whole group with
taskset, which is how the benchmark keeps the server off the load generator's core.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import psutil

from service.local_server import ServerNotReady, exit_reason, own_bentoml_home, wait_until_ready

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class ServerStartError(RuntimeError):
    pass


@dataclass
class ServerProcess:
    name: str
    url: str
    process: subprocess.Popen
    log_path: Path
    cold_start_s: float = float("nan")  # process start -> first 200 from the ready endpoint
    extra: dict = field(default_factory=dict)

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

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()


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


def pinned(command: list[str], cpus: str | None) -> list[str]:
    """Prefix `command` with taskset when `cpus` (e.g. "1" or "0-1") is given."""
    return ["taskset", "-c", cpus, *command] if cpus else command


def wait_ready(server: ServerProcess, path: str, timeout: float, started: float) -> float:
    """Poll `path` until it answers 200; returns seconds since `started`."""
    try:
        return wait_until_ready(server.url + path, timeout_s=timeout, started=started,
                                exited=exit_reason(server.process))
    except ServerNotReady as exc:
        server.stop()
        raise ServerStartError(f"{server.name}: {exc}; last log lines:\n{server.log_tail()}") \
            from None


def _launch(name: str, command: list[str], env: dict[str, str], port: int, log_dir: Path,
            ready_path: str, timeout: float, cwd: Path = REPO) -> ServerProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("wb")
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **env}, stdout=log_file,
                               stderr=subprocess.STDOUT, start_new_session=True)
    log_file.close()
    server = ServerProcess(name, f"http://127.0.0.1:{port}", process, log_path)
    try:
        server.cold_start_s = wait_ready(server, ready_path, timeout, started)
    except BaseException:
        server.stop()
        raise
    return server


def start_bentoml(model_ref: str, port: int, *, cpus: str | None = None,
                  settings: dict[str, str] | None = None, log_dir: Path = REPO / "reports",
                  name: str = "service", timeout: float = 120.0,
                  cwd: Path = REPO) -> ServerProcess:
    """`bentoml serve service.service:ProductClassifier` on 127.0.0.1:port with MODEL_TAG.

    `cwd` is the checkout whose `service/` is served (another commit's worktree in an A/B)."""
    env = {"MODEL_TAG": model_ref, "BENTOML_DO_NOT_TRACK": "True",
           **own_bentoml_home(model_ref, log_dir / name), **(settings or {})}
    command = [str(BIN / "bentoml"), "serve", "service.service:ProductClassifier",
               "--host", "127.0.0.1", "--port", str(port)]
    return _launch(name, pinned(command, cpus), env, port, log_dir, "/readyz", timeout, cwd)


def start_baseline(run_dir: Path, port: int, *, cpus: str | None = None, threads: int = 1,
                   log_dir: Path = REPO / "reports", name: str = "baseline",
                   timeout: float = 120.0) -> ServerProcess:
    """The plain FastAPI/uvicorn + PyTorch-eager app (loadtests/baseline_app.py)."""
    env = {"BASELINE_RUN_DIR": str(run_dir), "BASELINE_THREADS": str(threads)}
    command = [sys.executable, "-m", "uvicorn", "loadtests.baseline_app:app",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return _launch(name, pinned(command, cpus), env, port, log_dir, "/readyz", timeout)
