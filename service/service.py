"""The BentoML service: `POST /classify`, `POST /classify_batch`, `GET /model`.

Two services, as measured in BENCHMARKS.md (service section):
- `ProductClassifier` (the API, `api_workers` processes) checks the request, decodes and
  crops the photo with `service.contract` and turns logits into labels;
- `OnnxModel` (`model_workers` processes) normalises and runs ONNX Runtime on batches that
  BentoML's adaptive batcher forms from the API workers' calls.
Crops cross the hop between them as uint8 (150 kB per 224 px image; float32 would be 602 kB).
Serve with `bentoml serve` in the repository root (bentofile.yaml names `ProductClassifier`).
"""

from __future__ import annotations

import asyncio
import typing
from pathlib import Path

import bentoml
import numpy as np
from bentoml.exceptions import ServiceUnavailable
from fastapi import FastAPI
from pydantic import Field
from starlette.responses import JSONResponse

from service import metrics
from service.batching import install_batch_window
from service.contract import ContractError, ImageDecodeError, load_pixels, normalize, softmax
from service.guard import ImageRoute, RequestGuard
from service.model_store import int8_variant, resolve_model
from service.runtime import check_model_file, create_session, run_logits
from service.schemas import BatchPrediction, ErrorBody, ModelCard, ModelRef, Prediction
from service.settings import ServiceSettings

settings = ServiceSettings()

# Checked at import, i.e. in `bentoml serve` itself before any worker starts: a model without a
# usable contract stops start-up with this message (raised in a worker, BentoML would respawn it
# forever).
try:
    MODEL = resolve_model(settings.model_tag)
    if settings.precision == "int8":
        MODEL = int8_variant(MODEL)
    check_model_file(MODEL.onnx_path, MODEL.contract)
except ContractError as error:
    raise SystemExit(f"cannot serve MODEL_TAG={settings.model_tag!r}: {error}") from None

def error_response(status: int, reason: str, message: str) -> JSONResponse:
    metrics.rejections.labels(reason=reason).inc()
    return JSONResponse(ErrorBody(error=message, reason=reason).model_dump(), status_code=status)


UNREADABLE = "not a readable image (JPEG, PNG, WebP, GIF, BMP or TIFF expected)"
MIN_SCORE = Field(None, ge=0.0, le=1.0,
                  description="answer label null when the best score is below this")

install_batch_window(None if settings.learnt_batch_window else settings.batch_wait_ms,
                     observer=metrics.batch_window.set)


# BentoML 1.4 recycles the API->model client session every 100 requests (or 300 s) by closing
# it under the requests still in flight on it: under load they failed with 500 (aiohttp
# ServerDisconnectedError). The connection is local and long-lived; never recycle it.
NEVER_RECYCLE = {"max_requests": 2**31 - 1, "max_age": 1e9}
# The model service answers one internal call per image; its access-log line and trace span
# repeat the API's own and cost throughput (BENCHMARKS.md), so they are off by default.
QUIET_HOP = {"logging": {"access": {"enabled": False}}, "tracing": {"excluded_urls": ["/logits"]}}


@bentoml.service(name="onnx-model", workers=settings.model_workers,
                 **({"resources": {"gpu": settings.gpus}} if settings.gpus else {}),
                 traffic={"timeout": settings.timeout_s}, runner_connection=NEVER_RECYCLE,
                 **({} if settings.trace_model_calls else QUIET_HOP))
class OnnxModel:
    """ONNX Runtime on batches of cropped uint8 images; loaded once per worker."""

    def __init__(self) -> None:
        self.session = create_session(MODEL.onnx_path, threads=settings.ort_threads,
                                      device=settings.device, spin_wait=settings.ort_spin_wait)
        size = MODEL.contract.input_size
        run_logits(self.session, np.zeros((1, 3, size, size), np.float32))  # first run is slow

    @bentoml.api(batchable=settings.batching, max_batch_size=settings.max_batch_size,
                 max_latency_ms=settings.max_latency_ms)
    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] crops (`contract.load_pixels`) -> float32 [N, classes] logits."""
        metrics.batch_images.observe(len(pixels))
        return run_logits(self.session, normalize(pixels, MODEL.contract))


model_app = FastAPI(title="model card", docs_url=None, redoc_url=None, openapi_url=None)


@bentoml.service(name="product-classifier", workers=settings.api_workers,
                 traffic={"timeout": settings.timeout_s})
@bentoml.asgi_app(model_app, path="/")
class ProductClassifier:
    """Product photo -> label, score and top-k, with the model's own preprocessing."""

    model = bentoml.depends(OnnxModel)

    def __init__(self) -> None:
        self.contract = MODEL.contract
        self.model_ref = ModelRef(name=self.contract.name, version=self.contract.version)
        self.top_k = min(settings.top_k, len(self.contract.labels))

    @bentoml.api
    async def classify(self, image: Path, min_score: float | None = MIN_SCORE) -> Prediction:
        """Classify one product photo (multipart field `image`)."""
        result = await self._classify([image], min_score)
        return result if isinstance(result, JSONResponse) else result[0]

    @bentoml.api
    async def classify_batch(self, images: list[Path],
                             min_score: float | None = MIN_SCORE) -> BatchPrediction:
        """Classify several photos in one request (repeat the multipart field `images`)."""
        result = await self._classify(images, min_score)
        return result if isinstance(result, JSONResponse) else BatchPrediction(predictions=result)

    @model_app.get("/model", response_model=ModelCard)
    def model_card(self) -> ModelCard:
        """Labels, version and evaluation metrics of the served model."""
        contract = self.contract
        return ModelCard(name=contract.name, version=contract.version, tag=MODEL.tag,
                         file=MODEL.onnx_path.name, precision=settings.precision,
                         architecture=contract.architecture or "unknown", labels=contract.labels,
                         input_size=contract.input_size, metrics=MODEL.metrics)

    async def _classify(self, paths: list[Path],
                        min_score: float | None) -> list[Prediction] | JSONResponse:
        try:
            crops = await asyncio.gather(
                *(asyncio.to_thread(self._load, index, path) for index, path in enumerate(paths)))
        except ImageDecodeError as error:
            return error_response(400, error.reason, error.detail)
        try:
            logits = await self.model.to_async.logits(np.stack(crops))
        except ServiceUnavailable:
            return error_response(503, "overloaded", "the model is overloaded, retry shortly")
        return [self._prediction(row, min_score) for row in softmax(np.asarray(logits))]

    def _load(self, index: int, path: Path) -> np.ndarray:
        try:
            return load_pixels(path.read_bytes(), self.contract, max_pixels=settings.max_pixels)
        except ImageDecodeError as error:
            # Say which image: in a batch the client must know which one was refused.
            detail = UNREADABLE if error.reason == "not_an_image" else error.detail
            raise ImageDecodeError(error.reason, f"image #{index}: {detail}") from error

    def _prediction(self, scores: np.ndarray, min_score: float | None) -> Prediction:
        prediction = Prediction.from_scores(scores, self.contract.labels, top_k=self.top_k,
                                            model=self.model_ref, min_score=min_score)
        metrics.predictions.labels(label=prediction.label or "none").inc()
        return prediction


def _image_routes(service) -> dict[str, ImageRoute]:
    """Guard settings derived from the API signatures, so the two cannot drift apart."""
    routes = {}
    for api in service.apis.values():
        spec = api.input_spec
        if not spec.multipart_fields:
            continue
        (file_field,) = spec.multipart_fields
        many = typing.get_origin(spec.model_fields[file_field].annotation) is list
        routes[api.route] = ImageRoute(
            file_field=file_field, max_files=settings.max_images_per_request if many else 1,
            other_fields=frozenset(spec.model_fields) - {file_field})
    return routes


ProductClassifier.add_asgi_middleware(
    RequestGuard, routes=_image_routes(ProductClassifier),
    max_image_bytes=settings.max_image_bytes, max_concurrency=settings.max_concurrency,
    retry_after_s=settings.retry_after_s,
    on_reject=lambda reason: metrics.rejections.labels(reason=reason).inc())
