"""Benchmark: one BentoML service, or an API service calling a batched model service?

Serves the same ONNX model three ways, one after the other, each `rounds` times in alternating
order, and drives each with the same real photos from the same client:
  split          service.service:ProductClassifier (API decodes; OnnxModel batches), the design
  split-nobatch  the same with CLASSIFIER_BATCHING=false (one request per ONNX Runtime run)
  one-service    benchmarks.one_service:OneService (decode + ONNX Runtime inside one batched API)
Reports, per variant, the median over rounds of: a lone client's p50/p95 latency, and with
`users` concurrent clients the throughput and p50/p95. Ratios are against `split`.
Then, burst recovery: a lone client's p50 before and after a `users`-client burst, with the
fixed batching window (service/batching.py) and with BentoML's learnt one.

    make bench-service    (or: python -m benchmarks.bench_service --help)
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, CliApp
from rich.console import Console
from rich.table import Table

from benchmarks.results import percentile
from loadtests.servers import start_bentoml

REPO = Path(__file__).resolve().parents[1]
console = Console(width=140)

VARIANTS = {
    "split": ("service.service:ProductClassifier", "image", {}),
    "split-nobatch": ("service.service:ProductClassifier", "image",
                      {"CLASSIFIER_BATCHING": "false"}),
    "one-service": ("benchmarks.one_service:OneService", "images", {}),
}


class TopologyBench(BaseSettings):
    """Measure the service topologies side by side in one run; print ratios, save JSON."""

    model: Path = Field(REPO / "runs/bench-serve/export/model.onnx",
                        description="exported .onnx (`make bench-service` makes one first)")
    photos: Path = Field(REPO / "demo_data/catalog", description="folder of real photos")
    users: int = Field(16, ge=2, description="concurrent clients in the loaded step")
    loaded_requests: int = Field(320, ge=16, description="requests in the loaded step")
    lone_requests: int = Field(40, ge=5, description="sequential requests in the lone step")
    rounds: int = Field(2, ge=1, description="repeats per variant (medians are reported)")
    ort_threads: int = Field(2, ge=1, description="ONNX Runtime threads in every variant")
    out: Path = Field(REPO / "bench_out/service_topology.json", description="JSON results")
    guard_only: bool = Field(False, description="only time the request guard's form parse")
    burst_only: bool = Field(False, description="only run the burst-recovery step")
    burst_s: float = Field(8.0, gt=0, description="length of the burst in the recovery step")

    def cli_cmd(self) -> None:
        photo = min(self.photos.rglob("*.jpg")).read_bytes()
        console.print(f"request guard: form parse of a {len(photo)} B photo body takes "
                      f"{guard_parse_ms(photo):.3f} ms (median of 300)")
        if self.burst_only:
            burst_recovery(self)
        elif not self.guard_only:
            run(self)
            burst_recovery(self)


def guard_parse_ms(photo: bytes, repeats: int = 300) -> float:
    """What the guard adds per request: one Starlette multipart parse of the body."""
    import asyncio

    from starlette.requests import Request

    from service.guard import _replay

    request = httpx.Request("POST", "http://x/classify", files={"image": ("p.jpg", photo)})
    body = request.read()
    scope = {"type": "http", "method": "POST", "path": "/classify", "query_string": b"",
             "headers": [(b"content-type", request.headers["content-type"].encode())]}

    async def timings() -> list[float]:
        times = []
        for _ in range(repeats + 20):
            start = time.perf_counter()
            form = await Request(scope, _replay(body, None)).form(max_files=1)
            await form.close()
            times.append(time.perf_counter() - start)
        return times[20:]

    return statistics.median(asyncio.run(timings())) * 1e3


class Figures(BaseModel):
    loaded_shed: float = Field(description="loaded requests answered 429/503 (load shedding)")
    lone_p50_ms: float
    lone_p95_ms: float
    loaded_images_per_s: float
    loaded_p50_ms: float
    loaded_p95_ms: float


def _measure(url: str, field: str, photos: list[bytes], config: TopologyBench) -> Figures:
    with httpx.Client(base_url=url, timeout=60,
                      limits=httpx.Limits(max_connections=config.users)) as client:
        def post(i: int) -> float | None:
            """Latency of a 200; None for a 429/503 (shed); anything else stops the bench."""
            start = time.perf_counter()
            response = client.post("/classify", files={field: ("p.jpg", photos[i % len(photos)])})
            if response.status_code in (429, 503):
                return None
            response.raise_for_status()
            return time.perf_counter() - start

        for i in range(24):  # past BentoML's batcher warm-up and ONNX Runtime's first runs
            post(i)
        lone = [t for t in (post(i) for i in range(config.lone_requests)) if t is not None]
        with ThreadPoolExecutor(config.users) as pool:
            start = time.perf_counter()
            answers = list(pool.map(post, range(config.loaded_requests)))
            elapsed = time.perf_counter() - start
        loaded = [t for t in answers if t is not None]
    return Figures(loaded_shed=len(answers) - len(loaded),
                   lone_p50_ms=statistics.median(lone) * 1e3,
                   lone_p95_ms=percentile(lone, 0.95) * 1e3,
                   loaded_images_per_s=len(loaded) / elapsed,
                   loaded_p50_ms=statistics.median(loaded) * 1e3,
                   loaded_p95_ms=percentile(loaded, 0.95) * 1e3)


def run(config: TopologyBench) -> dict[str, Figures]:
    if not config.model.is_file():
        raise SystemExit(f"{config.model} is missing: run `make bench-service` or give "
                         "--model PATH.onnx")
    photos = [p.read_bytes() for p in sorted(config.photos.rglob("*.jpg"))[:60]]
    config.out.parent.mkdir(parents=True, exist_ok=True)
    env = {"MODEL_TAG": str(config.model), "CLASSIFIER_ORT_THREADS": str(config.ort_threads)}
    samples: dict[str, list[Figures]] = {name: [] for name in VARIANTS}
    for round_index in range(config.rounds):
        order = list(VARIANTS) if round_index % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            target, field, extra = VARIANTS[name]
            console.print(f"round {round_index + 1}/{config.rounds}: {name}")
            with start_bentoml(str(config.model), target=target, settings={**env, **extra},
                               log_dir=config.out.parent, name=f"serve-{name}",
                               timeout_s=180) as server:
                samples[name].append(_measure(server.url, field, photos, config))
    medians = {name: Figures(**{key: statistics.median(getattr(s, key) for s in runs)
                                for key in Figures.model_fields})
               for name, runs in samples.items()}
    _report(medians, config)
    config.out.write_text(json.dumps({
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": str(config.model), "config": config.model_dump(mode="json"),
        "medians": {k: v.model_dump() for k, v in medians.items()},
        "rounds": {k: [s.model_dump() for s in v] for k, v in samples.items()}}, indent=2))
    console.print(f"saved {config.out}")
    return medians


def burst_recovery(config: TopologyBench) -> dict[str, dict[str, float]]:
    """Lone p50 before and after a burst, fixed window vs BentoML's learnt window."""
    photos = [p.read_bytes() for p in sorted(config.photos.rglob("*.jpg"))[:60]]
    env = {"MODEL_TAG": str(config.model), "CLASSIFIER_ORT_THREADS": str(config.ort_threads),
           "CLASSIFIER_MAX_LATENCY_MS": "10000"}  # measure waiting, not shedding
    results = {}
    for name, extra in (("fixed window (served)", {}),
                        ("BentoML learnt window", {"CLASSIFIER_LEARNT_BATCH_WINDOW": "true"})):
        console.print(f"burst recovery: {name}")
        with start_bentoml(str(config.model), settings={**env, **extra},
                           log_dir=config.out.parent, name="serve-burst", timeout_s=180) as server, \
                httpx.Client(base_url=server.url, timeout=60,
                              limits=httpx.Limits(max_connections=config.users)) as client:
                def post(i: int) -> float:
                    start = time.perf_counter()
                    client.post("/classify", files={"image": ("p.jpg", photos[i % len(photos)])}
                                ).raise_for_status()
                    return time.perf_counter() - start

                def lone() -> float:
                    times = []
                    for i in range(config.lone_requests):
                        times.append(post(i))
                        time.sleep(0.05)  # a trickle: each request finds the queue empty
                    return statistics.median(times) * 1e3

                def window_ms() -> float:
                    text = client.get("/metrics").text
                    values = [float(line.split()[-1]) for line in text.splitlines()
                              if line.startswith("classifier_batch_window_seconds")]
                    return max(values, default=float("nan")) * 1e3

                for i in range(24):
                    post(i)
                before = lone()
                deadline = time.monotonic() + config.burst_s  # > BentoML's 5 s refresh period
                with ThreadPoolExecutor(config.users) as pool:
                    while time.monotonic() < deadline:
                        list(pool.map(post, range(config.users * 4)))
                time.sleep(5.5)  # let BentoML refresh its window from the burst's queue waits
                window = window_ms()
                after = lone()
        results[name] = {"before_p50_ms": before, "after_p50_ms": after,
                         "window_after_burst_ms": window}
    table = Table(title=f"lone p50 before/after a {config.users}-user, {config.burst_s:.0f} s "
                        "burst")
    for column in ("batching window", "window after burst ms", "before ms", "after ms",
                   "after / before"):
        table.add_column(column, justify="right")
    for name, r in results.items():
        table.add_row(name, f"{r['window_after_burst_ms']:.1f}", f"{r['before_p50_ms']:.1f}",
                      f"{r['after_p50_ms']:.1f}", f"{r['after_p50_ms'] / r['before_p50_ms']:.2f}x")
    console.print(table)
    out = config.out.with_name("service_burst_recovery.json")
    out.write_text(json.dumps({"date": datetime.now(UTC).isoformat(timespec="seconds"),
                               "model": str(config.model), "results": results}, indent=2))
    console.print(f"saved {out}")
    return results


def _report(medians: dict[str, Figures], config: TopologyBench) -> None:
    base = medians["split"]
    table = Table(title=f"service topology, median of {config.rounds} rounds "
                        f"({config.users} users, {config.loaded_requests} requests)")
    for column in ("variant", "lone p50 ms", "lone p95 ms", "loaded img/s", "loaded p50 ms",
                   "loaded p95 ms", "shed", "img/s vs split", "lone p50 vs split"):
        table.add_column(column, justify="right")
    for name, f in medians.items():
        table.add_row(name, f"{f.lone_p50_ms:.1f}", f"{f.lone_p95_ms:.1f}",
                      f"{f.loaded_images_per_s:.1f}", f"{f.loaded_p50_ms:.1f}",
                      f"{f.loaded_p95_ms:.1f}", f"{f.loaded_shed:.0f}",
                      f"{f.loaded_images_per_s / base.loaded_images_per_s:.2f}x",
                      f"{f.lone_p50_ms / base.lone_p50_ms:.2f}x")
    console.print(table)


def main() -> None:
    CliApp.run(TopologyBench)


if __name__ == "__main__":
    main()
