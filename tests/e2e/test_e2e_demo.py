"""`make demo` at CI size: shop -> crawl -> export -> train -> ONNX -> BentoML -> /classify -> Locust.

It runs the real demo script as a user's `make demo` does, only with --small sizes, and then
checks what it left behind: a dataset, a verified model in the (test session's) BentoML store,
Locust reports with zero failures, and no server still running.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import bentoml
import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "demo.py", "--small", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=1200, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    stats = json.loads((out / "dataset" / "stats.json").read_text())
    assert stats, "the export wrote no stats"
    assert any((out / "dataset" / "test").rglob("*.jpg")), "no held-out test photos were exported"
    crawl_log = (out / "logs" / "2._crawl.log").read_text()
    assert "retries" in crawl_log and "corrupt" in crawl_log, "the faults did not show in the crawl"

    metrics = json.loads((out / "runs" / "demo" / "report" / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    stored = bentoml.models.get("product-classifier:latest")
    assert Path(stored.path_of("model.onnx")).is_file()
    assert stored.info.metadata["contract"]["labels"]

    with open(out / "reports" / "locust_stats.csv", newline="") as handle:
        total = next(row for row in csv.DictReader(handle) if row["Name"] == "Aggregated")
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0
    assert "/classify" in result.stdout and "demo finished" in result.stdout

    # Every server the demo started (shop, bentoml serve) must be gone: its port refuses.
    urls = set(re.findall(r"http://127\.0\.0\.1:\d+", result.stdout))
    assert len(urls) >= 2, f"expected the shop's and the service's URLs in the output: {urls}"
    for url in urls:
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=2)
