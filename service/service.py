"""The BentoML service: `POST /classify`, `POST /classify_batch`, `GET /model`.

Two services, as measured in BENCHMARKS.md (service section):
- `ProductClassifier` (the API, `api_workers` processes) checks the request, decodes and
  crops the photo with `service.contract` and turns logits into labels;
- `OnnxModel` (`model_workers` processes) normalises and runs the model (OpenVINO or ONNX
  Runtime, `service.runtime`) on batches that BentoML's adaptive batcher forms from the API
  workers' calls.
Crops cross the hop between them as uint8 (150 kB per 224 px image; float32 would be 602 kB).
Serve with `bentoml serve` in the repository root (bentofile.yaml names `ProductClassifier`).
"""

from __future__ import annotations

import asyncio
import contextlib
import typing

import aiohttp
import bentoml
import numpy as np
from bentoml.exceptions import ServiceUnavailable
from fastapi import FastAPI
from pydantic import Field, ValidationError
from starlette.responses import JSONResponse

from service import metrics
from service.batching import install_batch_window
from service.contract import (
    ContractError,
    ImageDecodeError,
    calibrated_attribute_scores,
    calibrated_scores,
    crop_opened,
    normalize,
    open_for,
)
from service.guard import ApiKeys, DecodeBusy, ImageRoute, PixelBudget, RequestGuard
from service.model_store import resolve_model, serve_choice
from service.runtime import check_model_file, choose_runtime, open_runtime, variant_name
from service.schemas import (
    AttributePrediction,
    BatchPrediction,
    ErrorBody,
    ModelCard,
    ModelRef,
    Prediction,
    UploadedImage,
)
from service.settings import ServiceSettings

try:
    settings = ServiceSettings()
except ValidationError as error:  # e.g. a budget below max_pixels: say which and why
    raise SystemExit(f"invalid service settings: {error}") from None

# Checked at import, i.e. in `bentoml serve` itself before any worker starts: a model without a
# usable contract stops start-up with this message (raised in a worker, BentoML would respawn it
# forever).
# The runtime and precision are chosen here too, so that a variant the export's accuracy gate
# refused never starts.
try:
    RUNTIME, DEVICE = choose_runtime(settings.runtime, settings.device)
    RUNTIME, MODEL, PRECISION = serve_choice(resolve_model(settings.model_tag), RUNTIME,
                                             settings.precision, device=DEVICE,
                                             runtime_was_auto=settings.runtime == "auto")
    check_model_file(MODEL.onnx_path, MODEL.contract)
except (ContractError, RuntimeError) as error:
    raise SystemExit(f"cannot serve MODEL_TAG={settings.model_tag!r}: {error}") from None
VARIANT = variant_name(RUNTIME, PRECISION)
GATE = (MODEL.gate or {}).get("variants", {}).get(VARIANT)


def error_response(status: int, reason: str, message: str) -> JSONResponse:
    metrics.rejections.labels(reason=reason).inc()
    return JSONResponse(ErrorBody(error=message, reason=reason).model_dump(), status_code=status)


UNREADABLE = "not a readable image (JPEG, PNG, WebP, GIF, BMP or TIFF expected)"
MIN_SCORE = Field(None, ge=0.0, le=1.0,
                  description="answer label null when the best score is below this")
ATTRIBUTE_MIN_SCORE = Field(None, max_length=64, description=(
    'per attribute, a JSON object: {"colour": 0.6} answers that attribute\'s label null when '
    "its best score is below 0.6 (attributes not named: no threshold)"))
# The model's outputs in order (logits, then attr_NAME per attribute) and where each head's
# columns lie in what OnnxModel.logits returns.
OUTPUTS = MODEL.contract.outputs()
HEAD_COLUMNS = MODEL.contract.attribute_columns()

try:  # a missing key file stops start-up with its cure, not a traceback
    API_KEYS = ApiKeys(settings.api_key_list(), settings.open_path_set())
except ValueError as error:
    raise SystemExit(f"cannot start the service: {error}") from None

# One per API worker process (each imports this module): the memory bound is per worker.
DECODE_BUDGET = PixelBudget(settings.decode_budget_pixels, settings.decode_wait_s)

install_batch_window(None if settings.learnt_batch_window else settings.batch_wait_ms,
                     observer=metrics.batch_window.set)


# BentoML 1.4 recycles the API->model client session every 100 requests (or 300 s) by closing
# it under the requests still in flight on it: under load they failed with 500 (aiohttp
# ServerDisconnectedError). The connection is local and long-lived; never recycle it.
NEVER_RECYCLE = {"max_requests": 2**31 - 1, "max_age": 1e9}
# The model service answers one internal call per image; its access-log line, trace span and
# request metrics repeat the API's own and cost throughput (BENCHMARKS.md), so they are off by
# default (the batch-size histogram is the service's own and stays).
QUIET_HOP = {"logging": {"access": {"enabled": False}}, "tracing": {"excluded_urls": ["/logits"]},
             "metrics": {"enabled": False}}
# The API's spans for the image routes: BentoML builds them even with no exporter configured.
API_OBSERVABILITY = {
    "logging": {"access": {"enabled": settings.access_log}},
    **({} if settings.trace_requests else {"tracing": {"excluded_urls": ["/classify"]}})}


@bentoml.service(name="onnx-model", workers=settings.model_workers,
                 **({"resources": {"gpu": settings.gpus}} if settings.gpus else {}),
                 traffic={"timeout": settings.timeout_s}, runner_connection=NEVER_RECYCLE,
                 **({} if settings.trace_model_calls else QUIET_HOP))
class OnnxModel:
    """The model (OpenVINO or ONNX Runtime) on batches of cropped uint8 images; loaded once per
    worker."""

    def __init__(self) -> None:
        self.runtime = open_runtime(MODEL.onnx_path, runtime=RUNTIME, precision=PRECISION,
                                    threads=settings.ort_threads, device=DEVICE,
                                    spin_wait=settings.ort_spin_wait)
        size = MODEL.contract.input_size
        self.runtime.run(np.zeros((1, 3, size, size), np.float32))  # first run is slow
        metrics.runtime_info.labels(runtime=RUNTIME, precision=PRECISION,
                                    device=self.runtime.device).set(1)

    @bentoml.api(batchable=settings.batching, max_batch_size=settings.max_batch_size,
                 max_latency_ms=settings.max_latency_ms)
    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] crops (`contract.load_pixels`) -> float32 [N, classes] logits."""
        metrics.batch_images.observe(len(pixels))
        if MODEL.contract.attributes:  # every head from the same run, side by side
            return self.runtime.run_outputs(normalize(pixels, MODEL.contract), OUTPUTS)
        return self.runtime.run(normalize(pixels, MODEL.contract))


model_app = FastAPI(title="model card", docs_url=None, redoc_url=None, openapi_url=None)


@bentoml.service(name="product-classifier", workers=settings.api_workers,
                 traffic={"timeout": settings.timeout_s}, **API_OBSERVABILITY)
@bentoml.asgi_app(model_app, path="/")
class ProductClassifier:
    """Product photo -> label, score and top-k, with the model's own preprocessing."""

    model = bentoml.depends(OnnxModel)

    def __init__(self) -> None:
        self.contract = MODEL.contract
        self.model_ref = ModelRef(name=self.contract.name, version=self.contract.version)
        self.top_k = min(settings.top_k, len(self.contract.labels))

    @bentoml.api
    async def classify(self, image: UploadedImage, min_score: float | None = MIN_SCORE,
                       attribute_min_score: dict[str, float] | None = ATTRIBUTE_MIN_SCORE) -> Prediction:
        """Classify one product photo (multipart field `image`)."""
        result = await self._classify([image], min_score, attribute_min_score)
        return result if isinstance(result, JSONResponse) else result[0]

    @bentoml.api
    async def classify_batch(self, images: list[UploadedImage],
                             min_score: float | None = MIN_SCORE,
                             attribute_min_score: dict[str, float] | None = ATTRIBUTE_MIN_SCORE
                             ) -> BatchPrediction:
        """Classify several photos in one request (repeat the multipart field `images`)."""
        result = await self._classify(images, min_score, attribute_min_score)
        return result if isinstance(result, JSONResponse) else BatchPrediction(predictions=result)

    @model_app.get("/model", response_model=ModelCard)
    def model_card(self) -> ModelCard:
        """Labels, version, evaluation metrics and runtime of the served model."""
        contract = self.contract
        return ModelCard(name=contract.name, version=contract.version, tag=MODEL.tag,
                               file=MODEL.onnx_path.name, precision=PRECISION,
                               architecture=contract.architecture or "unknown",
                               labels=contract.labels, input_size=contract.input_size,
                               metrics=MODEL.metrics, runtime=RUNTIME, device=DEVICE,
                               accuracy_gate=GATE, attributes=contract.attributes)

    async def _classify(self, uploads: list[UploadedImage], min_score: float | None,
                        attribute_min_score: dict[str, float] | None = None
                        ) -> list[Prediction] | JSONResponse:
        try:
            thresholds = self._attribute_thresholds(attribute_min_score)
        except ValueError as error:
            return error_response(400, "bad_attribute_min_score", str(error))
        try:
            # Headers only: the pixels a decode would hold are known before any is decoded.
            opened = await asyncio.to_thread(self._open_all, uploads)
        except ImageDecodeError as error:
            return error_response(400, error.reason, error.detail)
        pixels = [image.width * image.height for image in opened]
        if sum(pixels) > settings.max_request_pixels:
            return error_response(
                400, "too_many_pixels",
                f"the {len(uploads)} image(s) decode to {sum(pixels)} pixels together, the limit "
                f"per request is {settings.max_request_pixels}; send fewer or smaller images")
        results = await asyncio.gather(
            *(DECODE_BUDGET.run(n, self._crop, index, image)
              for index, (n, image) in enumerate(zip(pixels, opened))), return_exceptions=True)
        metrics.decode_pixels_peak.set(DECODE_BUDGET.peak)
        for result in results:
            if isinstance(result, ImageDecodeError):
                return error_response(400, result.reason, result.detail)
        for result in results:
            if isinstance(result, DecodeBusy):
                return error_response(503, "decode_busy", str(result))
            if isinstance(result, BaseException):
                raise result
        crops = results
        try:
            logits = await self.model.to_async.logits(np.stack(crops))
        except ServiceUnavailable:
            return error_response(503, "overloaded", "the model is overloaded, retry shortly")
        except (aiohttp.ClientError, ConnectionError) as error:
            # The model worker died mid-call (BentoML respawns it): the client may retry.
            return error_response(503, "model_unavailable",
                                  f"the model worker is restarting ({type(error).__name__}); "
                                  "retry shortly")
        logits = np.asarray(logits)
        if not HEAD_COLUMNS:
            return [self._prediction(row, min_score)
                    for row in calibrated_scores(logits, self.contract)]
        main = calibrated_scores(logits[:, :len(self.contract.labels)], self.contract)
        # Each head's calibrated scores (its own temperature from the contract; T = 1 for a
        # model exported before heads were calibrated), so min_score per attribute is a
        # calibrated probability too.
        heads = {name: calibrated_attribute_scores(logits[:, columns], self.contract, name)
                 for name, columns in HEAD_COLUMNS.items()}
        predictions = []
        for i, row in enumerate(main):
            prediction = self._prediction(row, min_score)
            prediction.attributes = {
                name: AttributePrediction.from_scores(
                    scores[i], self.contract.attributes[name],
                    top_k=min(settings.top_k, len(self.contract.attributes[name])),
                    min_score=thresholds.get(name))
                for name, scores in heads.items()}
            predictions.append(prediction)
        return predictions

    def _attribute_thresholds(self, given: dict[str, float] | None) -> dict[str, float]:
        """The attribute_min_score field (BentoML has parsed the JSON object): names this
        model has, scores in [0, 1]."""
        known = self.contract.attributes or {}
        for name, score in (given or {}).items():
            if name not in known:
                raise ValueError(f"attribute_min_score names {name!r}; this model's attributes "
                                 f"are {sorted(known) or 'none'}")
            if not 0 <= score <= 1:
                raise ValueError(f"attribute_min_score[{name!r}] must be in [0, 1], not {score}")
        return dict(given or {})

    def _open_all(self, uploads: list[UploadedImage]) -> list:
        opened = []
        for index, upload in enumerate(uploads):
            with _naming_image(index):
                opened.append(open_for(upload.data, self.contract,
                                       max_pixels=settings.max_pixels))
        return opened

    def _crop(self, index: int, image) -> np.ndarray:
        with _naming_image(index):
            return crop_opened(image, self.contract)

    def _prediction(self, scores: np.ndarray, min_score: float | None) -> Prediction:
        prediction = Prediction.from_scores(scores, self.contract.labels, top_k=self.top_k,
                                            model=self.model_ref, min_score=min_score)
        metrics.predictions.labels(label=prediction.label or "none").inc()
        return prediction


@contextlib.contextmanager
def _naming_image(index: int):
    """Say which image: in a batch the client must know which one was refused."""
    try:
        yield
    except ImageDecodeError as error:
        detail = UNREADABLE if error.reason == "not_an_image" else error.detail
        raise ImageDecodeError(error.reason, f"image #{index}: {detail}") from error


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
    retry_after_s=settings.retry_after_s, api_keys=API_KEYS,
    on_reject=lambda reason: metrics.rejections.labels(reason=reason).inc())
