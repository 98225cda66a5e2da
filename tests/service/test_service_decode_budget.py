"""The decode budget: pixels cheap to send cannot take the service's memory.

A one-colour PNG is tens of kB on the wire and 20 MP (80 MB) decoded. The request cap refuses a
request whose images decode to too many pixels together (400 too_many_pixels); the per-worker
budget bounds the pixels being decoded at once (503 decode_busy + Retry-After past it), so a
flood of near-limit batches keeps RSS bounded while ordinary photos keep being answered.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from service.guard import DecodeBusy, PixelBudget
from tests.service.conftest import SERVER_ENV, serve

MAX_PIXELS = int(SERVER_ENV["CLASSIFIER_MAX_PIXELS"])   # 20 MP per image
REQUEST_PIXELS = 2 * MAX_PIXELS                         # two near-limit images per request
BUDGET_PIXELS = MAX_PIXELS + 4_000_000                  # one near-limit decode at a time
BUDGET_ENV = {"CLASSIFIER_MAX_REQUEST_PIXELS": str(REQUEST_PIXELS),
              "CLASSIFIER_DECODE_BUDGET_PIXELS": str(BUDGET_PIXELS),
              "CLASSIFIER_DECODE_WAIT_S": "0.5", "CLASSIFIER_RETRY_AFTER_S": "2"}
# What the flood may add to the service's RSS: the budget at 8 bytes a pixel (RGB is stored as
# 32-bit, plus one copy), and room for buffered bodies, threads and allocator slack. Without the
# budget the 8 x 2 near-limit images in flight here held about 1 GB more.
RSS_BOUND_BYTES = BUDGET_PIXELS * 8 + 250 * 2**20


def one_colour_png(pixels: int) -> bytes:
    side = int(pixels ** 0.5)
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 40, 90)).save(buffer, "PNG")
    return buffer.getvalue()


# -- the budget itself, in process -------------------------------------------------------------

def _sleep_holding(seconds: float, log: list, budget: PixelBudget) -> None:
    log.append(budget.in_use)
    time.sleep(seconds)


def test_budget_never_holds_more_than_its_capacity_and_lets_small_ones_past():
    budget = PixelBudget(100, wait_s=5)
    seen: list[int] = []

    async def main():
        big = [budget.run(80, _sleep_holding, 0.2, seen, budget) for _ in range(3)]
        small = [budget.run(10, _sleep_holding, 0.01, seen, budget) for _ in range(4)]
        await asyncio.gather(*big, *small)

    asyncio.run(main())
    assert len(seen) == 7 and max(seen) <= 100 and budget.peak <= 100
    assert budget.in_use == 0


def test_budget_says_busy_after_its_wait_and_frees_only_when_the_thread_is_done():
    budget = PixelBudget(100, wait_s=0.05)

    async def main():
        holder = asyncio.ensure_future(budget.run(100, time.sleep, 0.4))
        await asyncio.sleep(0.05)
        with pytest.raises(DecodeBusy, match="retry shortly"):
            await budget.run(1, time.sleep, 0)
        holder.cancel()  # the request went away, but its decode thread is still running
        await asyncio.sleep(0.05)
        assert budget.in_use == 100
        while budget.in_use:
            await asyncio.sleep(0.05)

    asyncio.run(asyncio.wait_for(main(), 10))


# -- the served service under a flood ----------------------------------------------------------

@pytest.fixture(scope="module")
def budget_server(tiny_onnx, tmp_path_factory):
    with serve({**SERVER_ENV, **BUDGET_ENV, "MODEL_TAG": str(tiny_onnx)},
               tmp_path_factory.mktemp("budget")) as srv:
        yield srv


@pytest.fixture(scope="module")
def photo(demo_catalog) -> bytes:
    return min((demo_catalog / "shoes").iterdir()).read_bytes()


def test_request_over_the_pixel_cap_is_400_before_any_decode(budget_server, photo):
    near_limit = one_colour_png(MAX_PIXELS)
    response = httpx.post(f"{budget_server.url}/classify_batch", timeout=60,
                          files=[("images", (f"{i}.png", near_limit)) for i in range(3)])
    assert response.status_code == 400, response.text
    assert response.json()["reason"] == "too_many_pixels"
    assert str(REQUEST_PIXELS) in response.json()["error"]
    ok = httpx.post(f"{budget_server.url}/classify_batch", timeout=60,
                    files=[("images", ("a.png", near_limit)), ("images", ("b.jpg", photo))])
    assert ok.status_code == 200, ok.text


@pytest.mark.slow
def test_flood_of_near_limit_batches_keeps_rss_bounded_and_photos_answered(budget_server, photo):
    near_limit = one_colour_png(MAX_PIXELS - 10_000)
    assert len(near_limit) < 200_000  # cheap to send: that is the point
    url = budget_server.url
    baseline = budget_server.rss_bytes()
    peak, flooding = [baseline], threading.Event()
    flooding.set()

    def sample_rss():
        while flooding.is_set():
            peak.append(budget_server.rss_bytes())
            time.sleep(0.02)

    def flood(index: int) -> httpx.Response:
        images = 3 if index % 6 == 5 else 2  # every sixth is over the request cap
        return client.post("/classify_batch",
                           files=[("images", (f"{i}.png", near_limit)) for i in range(images)])

    ordinary = []

    def ordinary_photos():
        deadline = time.monotonic() + 120
        while flooding.is_set() and len(ordinary) < 200 and time.monotonic() < deadline:
            ordinary.append(client.post("/classify", files={"image": ("p.jpg", photo)}))

    with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(10) as pool:
        sampler, steady = pool.submit(sample_rss), pool.submit(ordinary_photos)
        try:
            responses = list(pool.map(flood, range(36)))
        finally:
            flooding.clear()
            sampler.result(), steady.result()
        metrics = client.get("/metrics").text

    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 400, 503}, [r.text for r in responses if r.status_code > 503]
    for index, response in enumerate(responses):
        if index % 6 == 5:
            assert response.status_code == 400 and response.json()["reason"] == "too_many_pixels"
        elif response.status_code == 503:
            assert response.json()["reason"] == "decode_busy"
            assert response.headers["retry-after"] == "2"
    # Whether one of them got in during the burst depends on how the decodes overlapped (on a
    # loaded machine every one can meet an ordinary photo mid-decode); once the flood is over a
    # near-limit batch must be decoded and answered: 503 meant "later", not "never".
    lone = httpx.post(f"{url}/classify_batch", timeout=60,
                      files=[("images", (f"{i}.png", near_limit)) for i in range(2)])
    assert lone.status_code == 200 and len(lone.json()["predictions"]) == 2, lone.text
    assert ordinary and all(r.status_code == 200 for r in ordinary), \
        {r.status_code for r in ordinary}
    rise = max(peak) - baseline
    assert rise < RSS_BOUND_BYTES, f"RSS rose {rise / 2**20:.0f} MiB under the flood"
    worker_peak = max(float(line.split()[-1]) for line in metrics.splitlines()
                      if line.startswith("classifier_decode_pixels_peak"))
    assert 0 < worker_peak <= BUDGET_PIXELS
    print(f"flood: {statuses.count(200)} x 200, {statuses.count(503)} x 503, "
          f"{statuses.count(400)} x 400; {len(ordinary)} photos answered meanwhile; "
          f"RSS {baseline / 2**20:.0f} -> peak {max(peak) / 2**20:.0f} MiB")
    assert httpx.get(f"{url}/readyz").status_code == 200
