"""`make demo` at CI size: shop -> crawl -> export -> train -> ONNX -> BentoML -> /classify -> Locust.

It runs the real demo script as a user's `make demo` does, only with --small sizes, and then
checks what it left behind: a dataset whose counts add up stage to stage, a model in the (test
session's) BentoML store that, served again, labels the held-out photos far better than a broken
model could, Locust reports with zero failures, and no server still running.
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

from loadtests.servers import start_bentoml

REPO = Path(__file__).resolve().parents[2]
DEMO_TIMEOUT_S = 1200
LABELS = 10          # demo_data/catalog
PER_LABEL = 16       # the demo shop's --per-label under --small
# Served accuracy on the held-out split must clear this; guessing (or a model whose
# preprocessing is off) scores about 1/LABELS.
ACCURACY_FLOOR = 0.3
# The report's accuracy (out-of-fold under cross-validation: models that saw 2/3 of the
# photos) must clear twice what guessing scores.
REPORT_ACCURACY_FLOOR = 2 / LABELS


@pytest.mark.slow
@pytest.mark.timeout(DEMO_TIMEOUT_S + 300)  # above the inner timeout, so that one fires first
def test_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "demo.py", "--small", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=DEMO_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    # The export's counts add up and match the folders it wrote.
    dataset = out / "dataset"
    stats = json.loads((dataset / "stats.json").read_text())
    on_disk = {split: sorted(p for p in (dataset / split).rglob("*") if p.is_file())
               for split in ("train", "val", "test")}
    assert {split: len(files) for split, files in on_disk.items()} == stats["per_split"]
    per_label = {label: sum(splits.values()) for label, splits in stats["per_label"].items()}
    assert sum(stats["per_split"].values()) == stats["images"] == sum(per_label.values())
    assert len(stats["labels"]) == LABELS
    # The shop served PER_LABEL photos a label with faults on: most survive, none is invented.
    assert 0.6 * LABELS * PER_LABEL <= stats["images"] <= LABELS * PER_LABEL
    assert all(on_disk[split] for split in on_disk), "a split is empty"
    crawl_log = (out / "logs" / "2._crawl.log").read_text()
    assert "retries" in crawl_log and "corrupt" in crawl_log, "the faults did not show in the crawl"

    # The run's report: its accuracy is its confusion matrix's, is the figure the demo printed
    # (the evaluation table's title, as rich wrapped it) and clears what guessing scores.
    report = out / "runs" / "demo" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    matrix = json.loads((report / "confusion_matrix.json").read_text())["rows_true_cols_predicted"]
    assert metrics["images"] == sum(map(sum, matrix)) > 0
    assert metrics["accuracy"] == pytest.approx(
        sum(matrix[i][i] for i in range(len(matrix))) / metrics["images"])
    shown = " ".join(result.stdout.split())
    assert (f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
            f"({metrics['images']} images)") in shown
    assert metrics["accuracy"] >= REPORT_ACCURACY_FLOOR, metrics["evaluated_on"]
    stored = bentoml.models.get("product-classifier:latest")
    assert Path(stored.path_of("model.onnx")).is_file()
    assert stored.info.metadata["contract"]["labels"] == stats["labels"]

    # The stored model, served again, labels the held-out photos.
    test_photos = [(p.parent.name, p) for p in on_disk["test"]]
    with start_bentoml("product-classifier:latest", log_dir=tmp_path, name="reserve",
                       timeout_s=180) as server, httpx.Client(base_url=server.url,
                                                              timeout=60) as client:
        answers = [client.post("/classify", files={"image": (p.name, p.read_bytes())})
                   for _, p in test_photos]
    assert [a.status_code for a in answers] == [200] * len(answers)
    right = sum(a.json()["label"] == label for a, (label, _) in zip(answers, test_photos))
    assert right / len(answers) >= ACCURACY_FLOOR, \
        f"{right} of {len(answers)} held-out photos labelled right through /classify"

    with open(out / "reports" / "locust_stats.csv", newline="") as handle:
        total = next(row for row in csv.DictReader(handle) if row["Name"] == "Aggregated")
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0
    assert "held-out photos through POST /classify" in result.stdout
    assert "demo finished" in result.stdout

    # Every server the demo started (shop, bentoml serve) must be gone: its port refuses.
    urls = set(re.findall(r"http://127\.0\.0\.1:\d+", result.stdout))
    assert len(urls) >= 2, f"expected the shop's and the service's URLs in the output: {urls}"
    for url in urls:
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=2)
