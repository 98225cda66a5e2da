"""Benchmark: the service's memory under floods of pixels that are cheap to send.

Each scenario serves the model with its settings, sends `concurrency` simultaneous
/classify_batch requests of one-colour PNGs (tens to hundreds of kB each on the wire, up to
49 MP decoded), `rounds` times, and reports the answers by status and reason, the peak RSS of
the whole service (API + model processes) over its idle RSS, and the wall time.

  bomb-batch 3 requests x 32 PNGs of 7000 x 7000 at the default limits (the case that
             started the decode budget: 0.48 -> 3.35 GB, 17 s before it)
  flood      8 x 2 near-limit PNGs (20 MP) against a 24 MP budget
  no-budget  the same flood with a budget far above it (what the budget saves)

    python -m benchmarks.bench_hardening --model runs/x/export/model.onnx [--scenarios flood]
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image
from pydantic import Field
from pydantic_settings import BaseSettings, CliApp

from loadtests.servers import start_bentoml

REPO = Path(__file__).resolve().parents[1]
NEAR_LIMIT = {"CLASSIFIER_MAX_PIXELS": "20000000", "CLASSIFIER_MAX_REQUEST_PIXELS": "40000000",
              "CLASSIFIER_MAX_IMAGE_BYTES": str(2 * 2**20), "CLASSIFIER_DECODE_WAIT_S": "0.5"}
SCENARIOS = {
    # name: (settings, PNG side, images per request, concurrency)
    "bomb-batch": ({}, 7000, 32, 3),
    "flood": ({**NEAR_LIMIT, "CLASSIFIER_DECODE_BUDGET_PIXELS": "24000000"}, 4472, 2, 8),
    "no-budget": ({**NEAR_LIMIT, "CLASSIFIER_DECODE_BUDGET_PIXELS": "2000000000"}, 4472, 2, 8),
}


class HardeningBench(BaseSettings):
    """Peak RSS and answers of the service under pixel floods; prints and saves JSON."""

    model: Path = Field(description="exported .onnx to serve (any: decoding is what is measured)")
    scenarios: list[str] = Field(list(SCENARIOS), description=f"of {list(SCENARIOS)}")
    rounds: int = Field(3, ge=1, description="waves of `concurrency` requests per scenario")
    out: Path = Field(REPO / "bench_out/hardening.json", description="JSON results")

    def cli_cmd(self) -> None:
        results = {name: run_scenario(self.model, name, self.rounds, self.out.parent)
                   for name in self.scenarios}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(results, indent=2))
        print(f"saved {self.out}")


def one_colour_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 40, 90)).save(buffer, "PNG")
    return buffer.getvalue()


def run_scenario(model: Path, name: str, rounds: int, log_dir: Path) -> dict:
    settings, side, images, concurrency = SCENARIOS[name]
    png = one_colour_png(side)
    files = [("images", (f"{i}.png", png)) for i in range(images)]
    with start_bentoml(str(model), settings={"CLASSIFIER_ORT_THREADS": "1", **settings},
                       log_dir=log_dir, name=f"hardening-{name}") as server:
        time.sleep(1.0)
        idle = server.rss_bytes()
        peak, running = [idle], threading.Event()
        running.set()

        def sample():
            while running.is_set():
                peak.append(server.rss_bytes())
                time.sleep(0.02)

        def post(_):
            response = client.post("/classify_batch", files=files)
            reason = response.json().get("reason", "") if response.status_code != 200 else ""
            return f"{response.status_code} {reason}".strip()

        started = time.perf_counter()
        with httpx.Client(base_url=server.url, timeout=120) as client, \
                ThreadPoolExecutor(concurrency + 1) as pool:
            sampler = pool.submit(sample)
            answers = list(pool.map(post, range(concurrency * rounds)))
            running.clear()
            sampler.result()
        wall = time.perf_counter() - started
    result = {"png_bytes": len(png), "pixels_per_image": side * side, "images": images,
              "concurrency": concurrency, "requests": len(answers),
              "answers": dict(Counter(answers)), "idle_rss_mib": round(idle / 2**20),
              "peak_rss_mib": round(max(peak) / 2**20),
              "rise_mib": round((max(peak) - idle) / 2**20), "wall_s": round(wall, 1)}
    print(f"{name}: {result}")
    return result


if __name__ == "__main__":
    CliApp.run(HardeningBench)
