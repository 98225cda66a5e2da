"""The locustfile, run headless by the real `locust` CLI against servers on 127.0.0.1."""

from __future__ import annotations

import csv

from loadtests.locust_run import run_locust
from loadtests.prom import mean_batch_size, scrape
from tests.loadtests.conftest import GOOD_PREDICTION, FakeServer, json_bytes

RUN_S = 4
FEW_PHOTOS = ["--photos-per-label", "1"]  # 30 uploads: enough variety, quicker start


def _names(csv_prefix) -> set[str]:
    with open(f"{csv_prefix}_stats.csv", newline="") as handle:
        return {row["Name"] for row in csv.DictReader(handle)}


def test_locust_against_the_service_writes_reports_with_zero_failures(tiny_service, tmp_path):
    assert tiny_service.cold_start_s > 0
    before = scrape(tiny_service.url)
    result = run_locust(tiny_service.url, users=4, run_time_s=RUN_S, csv_prefix=tmp_path / "lt",
                        html=tmp_path / "lt.html", timeout_s=120, extra=FEW_PHOTOS)
    assert result.requests > 0, result
    assert result.failures == 0, result.failure_reasons
    assert result.exit_code == 0
    assert (tmp_path / "lt.html").stat().st_size > 0
    names = _names(tmp_path / "lt")
    # Both endpoints and every photo size were exercised.
    assert {"/classify [thumb]", "/classify [original]", "/classify [large]",
            "/classify_batch [4]"} <= names
    batch, batches = mean_batch_size(before, scrape(tiny_service.url))
    assert batches > 0 and batch >= 1.0


def test_a_200_with_a_malformed_body_is_a_failure(tmp_path):
    answers = {"/classify": (200, b'{"label": "dress", "sco'),                       # cut JSON
               "/classify_batch": (200, json_bytes({"predictions": [GOOD_PREDICTION]}))}  # 1 of 4
    with FakeServer(lambda path: answers[path]) as fake:
        result = run_locust(fake.url, users=2, run_time_s=RUN_S, csv_prefix=tmp_path / "bad",
                            timeout_s=120, extra=FEW_PHOTOS)
    assert result.requests > 0
    assert result.failures == result.requests
    assert result.exit_code == 1
    reasons = " ".join(result.failure_reasons)
    assert "malformed body: body is not JSON" in reasons
    assert "malformed body: batch answer has 1 results for 4 images" in reasons


def test_a_non_2xx_answer_is_a_failure_even_with_a_good_body(tmp_path):
    with FakeServer(lambda path: (503, json_bytes(GOOD_PREDICTION))) as fake:
        result = run_locust(fake.url, users=2, run_time_s=RUN_S, csv_prefix=tmp_path / "503",
                            extra=["--batch-weight", "0", *FEW_PHOTOS], timeout_s=120)
    assert result.requests > 0 and result.failures == result.requests
    assert all("HTTP 503" in reason for reason in result.failure_reasons)
    assert not any("classify_batch" in name for name in _names(tmp_path / "503"))
