"""Service settings: one pydantic model, read from environment variables.

Every field is an env var with the `CLASSIFIER_` prefix (e.g. `CLASSIFIER_MAX_BATCH_SIZE=16`),
except the model reference, which is plain `MODEL_TAG` as in BentoML's examples.
The batching fields are read when `service/service.py` is imported, because BentoML fixes
`max_batch_size` / `max_latency_ms` when the API is declared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.contract import DEFAULT_MAX_PIXELS


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLASSIFIER_", extra="ignore")

    model_tag: str = Field(
        "product-classifier:latest",
        validation_alias=AliasChoices("MODEL_TAG", "CLASSIFIER_MODEL_TAG"),
        description="BentoML model tag, or a path to an exported .onnx file")
    runtime: Literal["auto", "onnxruntime", "openvino"] = Field(
        "auto", description="auto: ONNX Runtime CUDA when onnxruntime-gpu is installed, else "
        "OpenVINO on an x86-64 CPU where it is installed, else ONNX Runtime CPU")
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto", description="auto: the fastest variant of the runtime that passed the export's "
        "accuracy gate (fp32 without one); fp32/bf16: model.onnx (bf16 on OpenVINO only); "
        "int8: model.int8.onnx (`trainer export --int8`); a variant the gate failed is refused")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when onnxruntime-gpu sees a GPU, else CPU")
    gpus: int = Field(0, ge=0, description="GPUs the model service asks BentoML for "
                      "(resources: gpu); bentofile.gpu.yaml sets 1")
    ort_threads: int = Field(
        2, ge=1, description="inference threads per model worker, ONNX Runtime or OpenVINO (they "
        "would otherwise size their pool to the whole host and fight the other workers)")
    ort_spin_wait: bool = Field(
        False, description="let idle ONNX Runtime threads spin for work: lower latency on cores "
        "of their own, but it steals CPU from the API process when they share cores")
    trace_model_calls: bool = Field(
        False, description="access-log, trace and count (BentoML's request metrics) the "
        "internal API -> model call, one per image; they repeat what the API records")
    access_log: bool = Field(
        True, description="BentoML's access-log line per API request")
    trace_requests: bool = Field(
        False, description="OpenTelemetry spans for /classify and /classify_batch (BentoML makes "
        "them even without an exporter; they cost CPU per request); other paths are traced")
    model_workers: int = Field(1, ge=1, description="processes running the batched model")
    api_workers: int = Field(1, ge=1, description="processes decoding images and answering HTTP")
    batching: bool = Field(True, description="adaptive batching of model calls (false: one "
                           "request's images per ONNX Runtime run, for comparison)")
    max_batch_size: int = Field(32, ge=2, description="largest batch the model runs at once")
    max_latency_ms: int = Field(
        1000, ge=10, description="a request queued longer than this for the model gets 503")
    batch_wait_ms: float = Field(
        0.0, ge=0, description="how long an idle model waits for a fuller batch; 0 = run at "
        "once (batches still form from requests that arrive while a batch runs)")
    learnt_batch_window: bool = Field(
        False, description="use BentoML's own learnt cork window instead of batch_wait_ms "
        "(only to measure the difference: it holds lone requests back after a burst)")
    max_concurrency: int = Field(
        64, ge=1, description="requests in flight per API worker before answering 429")
    timeout_s: float = Field(30.0, gt=0, description="per-request timeout (504 after it)")
    max_image_bytes: int = Field(10 * 2**20, ge=1024, description="largest accepted image file")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="largest width*height decoded")
    max_request_pixels: int = Field(
        200_000_000, ge=1, description="most decoded pixels in one request, all its images "
        "together (JPEGs count at their reduced decode size); over it: 400 too_many_pixels")
    decode_budget_pixels: int = Field(
        100_000_000, ge=1, description="pixels being decoded at once per API worker: decode "
        "memory stays under ~4 bytes a pixel of it (~13 for transparent palette PNGs); an image "
        "that does not fit within decode_wait_s gets 503 decode_busy")
    decode_wait_s: float = Field(
        5.0, gt=0, description="how long an image may wait for room in the decode budget")
    max_images_per_request: int = Field(32, ge=1, description="cap for /classify_batch")
    top_k: int = Field(3, ge=1, description="how many labels each answer lists")
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 429/503 answers")
    api_keys: SecretStr | None = Field(
        None, description="comma-separated keys; when set (or api_key_file), every path but "
        "open_paths needs 'Authorization: Bearer <key>', else 401")
    api_key_file: Path | None = Field(
        None, description="file of API keys, one a line ('#' comments); read at start, joins "
        "api_keys (a secret mount keeps them out of the environment)")
    open_paths: str = Field(
        "/livez,/readyz,/healthz,/metrics", description="comma-separated paths that need no API "
        "key (health checks and Prometheus scrapes); empty: every path needs one")

    def api_key_list(self) -> list[str]:
        """The configured keys (env and file), stripped; [] = no access control."""
        keys = self.api_keys.get_secret_value().split(",") if self.api_keys else []
        if self.api_key_file is not None:
            try:
                lines = self.api_key_file.read_text().splitlines()
            except OSError as error:
                raise ValueError(f"CLASSIFIER_API_KEY_FILE={self.api_key_file} cannot be read "
                                 f"({error.strerror}); mount the key file there or unset it") \
                    from None
            keys += [line for line in lines if not line.lstrip().startswith("#")]
        return [key.strip() for key in keys if key.strip()]

    def open_path_set(self) -> frozenset[str]:
        return frozenset(p.strip().rstrip("/") for p in self.open_paths.split(",") if p.strip())

    @model_validator(mode="after")
    def _budgets_hold_one_image(self) -> ServiceSettings:
        # Otherwise an image within max_pixels could never be decoded.
        for name in ("max_request_pixels", "decode_budget_pixels"):
            if getattr(self, name) < self.max_pixels:
                raise ValueError(
                    f"CLASSIFIER_{name.upper()}={getattr(self, name)} is below "
                    f"CLASSIFIER_MAX_PIXELS={self.max_pixels}: an allowed image could never be "
                    f"decoded; raise CLASSIFIER_{name.upper()} or lower CLASSIFIER_MAX_PIXELS")
        return self
