"""The service's own Prometheus metrics (beside BentoML's), served on /metrics."""

from __future__ import annotations

import bentoml

batch_images = bentoml.metrics.Histogram(
    name="classifier_model_batch_images", documentation="images per ONNX Runtime run",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
predictions = bentoml.metrics.Counter(
    name="classifier_predictions", documentation="answered images by returned label "
    "('none' when below min_score)", labelnames=["label"])
batch_window = bentoml.metrics.Gauge(
    name="classifier_batch_window_seconds", documentation="how long the batcher holds a lone "
    "request back hoping for a fuller batch (as of its latest refresh)",
    multiprocess_mode="livemax")
rejections = bentoml.metrics.Counter(
    name="classifier_rejected_requests", documentation="requests refused with a 4xx/429/503, "
    "by reason", labelnames=["reason"])
decode_pixels_peak = bentoml.metrics.Gauge(
    name="classifier_decode_pixels_peak", documentation="most pixels one API worker has been "
    "decoding at once since it started (bounded by CLASSIFIER_DECODE_BUDGET_PIXELS)",
    multiprocess_mode="livemax")
runtime_info = bentoml.metrics.Gauge(
    name="classifier_runtime_info", documentation="1 for the runtime, precision and device that "
    "serve the model", labelnames=["runtime", "precision", "device"], multiprocess_mode="livemax")
