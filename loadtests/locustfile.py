"""Locust scenarios for the product classifier service.

Headless, bounded run against a local service (what `make loadtest` does):

    locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:3000 \
        -u 16 -r 8 -t 30s --csv reports/loadtest --html reports/loadtest.html

Interactive: `locust -f loadtests/locustfile.py` and open http://localhost:8089.

Each simulated user posts real product photos (read once at start, in several sizes) to
/classify, and now and then a few at once to /classify_batch. A request fails when the status
is not 2xx or when the body is not a usable prediction (see loadtests/checks.py).
Scenario flags (`--batch-weight`, `--sizes`, `--think-time`, ...) are listed by `--help`.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from pathlib import Path

import gevent
import psutil
from locust import FastHttpUser, events, task

from loadtests.checks import batch_problem, classify_problem
from loadtests.payloads import DEFAULT_CATALOG, SIZE_CLASSES, Payload, load_payloads

log = logging.getLogger("loadtests")

_PAYLOADS: list[Payload] = []
# Request bodies, encoded once and shared by every user: (size class, body, content type).
_SINGLES: list[tuple[str, bytes, str]] = []
_BATCHES: list[tuple[bytes, str]] = []


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument("--catalog", default=str(DEFAULT_CATALOG), include_in_web_ui=False,
                       help="ImageFolder of real product photos to upload (CATALOG/<label>/*.jpg)")
    parser.add_argument("--photos-per-label", type=int, default=3, include_in_web_ui=False,
                       help="photos taken from each label folder (each in every size)")
    parser.add_argument("--sizes", default=",".join(SIZE_CLASSES), include_in_web_ui=False,
                       help="size classes to post, comma-separated: "
                            "thumb (224 px short side), original, large (1200 px short side)")
    parser.add_argument("--classify-weight", type=int, default=4,
                       help="relative weight of POST /classify (one photo); 0 disables it")
    parser.add_argument("--batch-weight", type=int, default=1,
                       help="relative weight of POST /classify_batch; 0 disables it")
    parser.add_argument("--batch-images", type=int, default=4,
                       help="photos per /classify_batch request")
    parser.add_argument("--image-field", default="image",
                       help="multipart field name of the photo in /classify")
    parser.add_argument("--batch-field", default="images",
                       help="multipart field name of the photos in /classify_batch")
    parser.add_argument("--think-time", type=float, default=0.0,
                       help="seconds each user waits between requests; 0 = closed loop, "
                            "as fast as the server answers")
    parser.add_argument("--cpu-report", default="", include_in_web_ui=False,
                        help="write this process's CPU use during the test to this JSON file "
                             "(the benchmark checks the load generator was not the bottleneck)")
    parser.add_argument("--max-run-time", type=float, default=300.0, include_in_web_ui=False,
                       help="headless runs without -t/--run-time stop after this many seconds")


@events.init.add_listener
def _on_init(environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options.headless and not options.run_time and not options.worker:
        options.run_time = int(options.max_run_time)
        log.warning("no --run-time given: stopping after %ss (--max-run-time)", options.run_time)
    weights = {ClassifyUser.classify: options.classify_weight,
               ClassifyUser.classify_batch: options.batch_weight}
    # After class creation Locust picks with random.choice, so weights become repetitions.
    ClassifyUser.tasks = [fn for fn, weight in weights.items() for _ in range(max(0, weight))]
    if not ClassifyUser.tasks:
        raise SystemExit("--classify-weight and --batch-weight are both 0: nothing to do")
    if not options.worker or not _PAYLOADS:
        sizes = tuple(s.strip() for s in options.sizes.split(",") if s.strip())
        _PAYLOADS[:] = load_payloads(Path(options.catalog), options.photos_per_label, sizes)
        log.info("loaded %d payloads (%s) from %s", len(_PAYLOADS), ",".join(sizes),
                 options.catalog)
        build_bodies(options.image_field, options.batch_field, options.batch_images)
        # Loading blocked the gevent loop for a second or more; its cached clock is stale, and
        # Locust's --run-time timer (armed next) would fire that much early.
        gevent.get_hub().loop.update_now()


_CPU_AT_START: list[float] = []


@events.test_start.add_listener
def _on_test_start(**_kwargs) -> None:
    times = psutil.Process().cpu_times()
    _CPU_AT_START[:] = [time.perf_counter(), times.user + times.system]


@events.test_stop.add_listener
def _on_test_stop(environment, **_kwargs) -> None:
    options = environment.parsed_options
    if not (options and options.cpu_report and _CPU_AT_START):
        return
    times = psutil.Process().cpu_times()
    wall = time.perf_counter() - _CPU_AT_START[0]
    cpu = times.user + times.system - _CPU_AT_START[1]
    Path(options.cpu_report).write_text(json.dumps(
        {"wall_s": wall, "cpu_s": cpu, "cpu_pct": 100.0 * cpu / max(wall, 1e-9)}))


def multipart(parts: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """(field, filename, bytes) parts -> (body, content type). Built once per request shape."""
    boundary = uuid.uuid4().hex
    chunks = []
    for field, filename, data in parts:
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                      f'filename="{filename}"\r\nContent-Type: image/jpeg\r\n\r\n'.encode())
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def build_bodies(image_field: str, batch_field: str, batch_images: int) -> None:
    payloads = list(_PAYLOADS)
    random.Random(0).shuffle(payloads)  # sizes and labels interleaved
    _SINGLES[:] = [(p.size_class, *multipart([(image_field, p.name, p.data)])) for p in payloads]
    _BATCHES[:] = [multipart([(batch_field, p.name, p.data)
                              for p in payloads[start:start + batch_images]])
                   for start in range(0, max(1, len(payloads) - batch_images + 1), batch_images)]


class ClassifyUser(FastHttpUser):
    """One client of the shop's backend classifying product photos."""

    # A slow answer is a slow answer, not a crash of the load generator.
    network_timeout = 60.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        options = self.environment.parsed_options
        think_time = options.think_time
        self.wait_time = lambda: think_time
        self.batch_images = options.batch_images
        self.turn = random.randrange(len(_SINGLES))  # users start at different photos

    @task
    def classify(self) -> None:
        size_class, body, content_type = _SINGLES[self.turn % len(_SINGLES)]
        self.turn += 1
        with self.client.post("/classify", data=body, headers={"Content-Type": content_type},
                              name=f"/classify [{size_class}]", catch_response=True) as resp:
            self._judge(resp, classify_problem(resp.content) if resp.status_code == 200 else None)

    @task
    def classify_batch(self) -> None:
        body, content_type = _BATCHES[self.turn % len(_BATCHES)]
        self.turn += 1
        with self.client.post("/classify_batch", data=body,
                              headers={"Content-Type": content_type},
                              name=f"/classify_batch [{self.batch_images}]",
                              catch_response=True) as resp:
            self._judge(resp, batch_problem(resp.content, self.batch_images)
                        if resp.status_code == 200 else None)

    @staticmethod
    def _judge(resp, body_problem: str | None) -> None:
        if not 200 <= resp.status_code < 300:
            # Status 0 is a connection error; Locust already holds the exception text.
            detail = (resp.text or "")[:120] if resp.status_code else str(resp.error)[:120]
            resp.failure(f"HTTP {resp.status_code}: {detail}")
        elif body_problem:
            resp.failure(f"malformed body: {body_problem}")
        else:
            resp.success()
