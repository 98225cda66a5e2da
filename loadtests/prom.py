"""Read the few Prometheus figures the benchmark needs from a service's /metrics.

Mean batch size = increase of a histogram's `_sum` / increase of its `_count` between two
scrapes: the batches the model actually ran during one load step. The service's own
`classifier_model_batch_images` counts images per ONNX Runtime run; BentoML's
`bentoml_service_adaptive_batch_size` counts calls per batch (a /classify_batch call is one
call of several images), so it is only the fallback.
"""

from __future__ import annotations

import math
import re

import httpx

BATCH_HISTOGRAMS = ("classifier_model_batch_images", "bentoml_service_adaptive_batch_size")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_samples(text: str) -> dict[str, float]:
    """Metric name -> value summed over all label sets (comments skipped)."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match:
            try:
                value = float(match.group(3))
            except ValueError:
                continue
            totals[match.group(1)] = totals.get(match.group(1), 0.0) + value
    return totals


def scrape(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Summed samples from URL/metrics, or {} when the endpoint is missing."""
    try:
        response = httpx.get(url.rstrip("/") + "/metrics", timeout=timeout)
    except httpx.HTTPError:
        return {}
    return parse_samples(response.text) if response.status_code == 200 else {}


def mean_batch_size(before: dict[str, float], after: dict[str, float]) -> tuple[float, int]:
    """(mean batch size, number of batches) run between two scrapes; nan when none."""
    for name in BATCH_HISTOGRAMS:
        if f"{name}_count" in after:
            batches = after[f"{name}_count"] - before.get(f"{name}_count", 0.0)
            items = after[f"{name}_sum"] - before.get(f"{name}_sum", 0.0)
            return (items / batches if batches > 0 else math.nan), int(batches)
    return math.nan, 0
