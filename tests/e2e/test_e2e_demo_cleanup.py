"""`make demo` leaves no process behind when a step fails or the user presses Ctrl-C.

The demo is started as a user starts it (its own process group, as a terminal does); once its
first server, the demo shop, is up and the crawl runs, it is interrupted: SIGINT to the group
(what Ctrl-C sends), or the crawl step is killed (a failing step). Every process it started,
servers included (they run in process groups of their own), must be gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 120  # bounded: the shop starts in seconds, the crawl right after it


def start_demo(out: Path) -> subprocess.Popen:
    # A test suite run as a background job (`make test &`, nohup) has SIGINT ignored, and a
    # child would inherit that: the demo must get Ctrl-C as it does at a terminal (a handler
    # of ours is reset to the default in the child).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([sys.executable, "-m", "demo", "--small", "--out", str(out)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def wait_for_crawl(demo: subprocess.Popen) -> tuple[list[psutil.Process], psutil.Process]:
    """Every descendant once the shop serves and the crawl step runs; and the crawl process."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and demo.poll() is None:
        procs = descendants(demo.pid)
        crawl = [p for p in procs if "crawl" in " ".join(_cmdline(p))]
        shop = [p for p in procs if "collector.demo_shop" in " ".join(_cmdline(p))]
        if crawl and shop:
            return procs, crawl[0]
        time.sleep(0.1)
    demo.kill()
    pytest.fail(f"the demo did not reach its crawl in {WAIT_S} s: {demo.communicate()[0][-3000:]}")


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def assert_all_gone(procs: list[psutil.Process], demo: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    alive = procs
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    for proc in alive:  # do not leak them into the rest of the session
        proc.kill()
    assert not alive, f"left running after the demo exited: {[_cmdline(p) for p in alive]}"


@pytest.mark.slow
def test_ctrl_c_stops_every_server_the_demo_started(tmp_path):
    demo = start_demo(tmp_path / "demo")
    procs, _ = wait_for_crawl(demo)
    os.killpg(demo.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    output, _ = demo.communicate(timeout=60)
    assert demo.returncode == 130, output[-3000:]
    assert "interrupted; every server the demo started has been stopped" in output
    assert_all_gone(procs, demo)


@pytest.mark.slow
def test_a_failing_step_stops_every_server_the_demo_started(tmp_path):
    demo = start_demo(tmp_path / "demo")
    procs, crawl = wait_for_crawl(demo)
    crawl.kill()  # the step dies: the demo must fail cleanly, not leave the shop running
    output, _ = demo.communicate(timeout=60)
    assert demo.returncode == 1, output[-3000:]
    assert "demo failed" in output and "'2. crawl' failed" in output
    assert_all_gone(procs, demo)
