"""The typed answers of the HTTP API (what clients and /docs.json see)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any, Self

import numpy as np
from pydantic import BaseModel, Field, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import PydanticCustomError, core_schema
from starlette.datastructures import UploadFile


class LabelScore(BaseModel):
    label: str
    score: float = Field(ge=0, le=1, description="softmax probability")


class ModelRef(BaseModel):
    name: str
    version: str


def _ranked(scores: np.ndarray, names: Sequence[str], top_k: int,
            min_score: float | None) -> dict:
    """The one top-k: best `top_k` names by score, best first; label None below min_score."""
    order = np.argsort(scores)[::-1][:top_k]
    ranked = [LabelScore(label=names[i], score=float(scores[i])) for i in order]
    best = ranked[0]
    label = best.label if min_score is None or best.score >= min_score else None
    return {"label": label, "score": best.score, "top_k": ranked}


class AttributePrediction(BaseModel):
    label: str | None = Field(description="the most likely value; null when its score is below "
                                          "the request's min_score for this attribute")
    score: float = Field(ge=0, le=1, description=(
        "calibrated probability of the most likely value: softmax(logits / T) with the head's "
        "own temperature from the model contract"))
    top_k: list[LabelScore] = Field(description="the most likely values, best first")

    @classmethod
    def from_scores(cls, scores: np.ndarray, values: Sequence[str], *, top_k: int,
                    min_score: float | None = None) -> AttributePrediction:
        return cls(**_ranked(scores, values, top_k, min_score))


# Absent, not null, for a single-head model: its answers stay exactly what they were.
_ABSENT_IF_NONE = {"exclude_if": lambda value: value is None}


class Prediction(BaseModel):
    label: str | None = Field(description="the most likely label; null when its score is below "
                                          "the request's min_score (the model is unsure)")
    score: float = Field(ge=0, le=1, description="probability of the most likely label")
    top_k: list[LabelScore] = Field(description="the most likely labels, best first")
    model: ModelRef
    attributes: dict[str, AttributePrediction] | None = Field(None, description=(
        "attribute -> its value, score and top-k (colour, pattern, ...); only from a model "
        "with attribute heads"), **_ABSENT_IF_NONE)


    @classmethod
    def from_scores(cls, scores: np.ndarray, labels: Sequence[str], *, top_k: int,
                    model: ModelRef, min_score: float | None = None) -> Prediction:
        """One image's softmax scores -> the answer: best `top_k` labels, best first."""
        return cls(**_ranked(scores, labels, top_k, min_score), model=model)


class BatchPrediction(BaseModel):
    predictions: list[Prediction] = Field(description="one per image, in request order")


class ModelCard(BaseModel):
    name: str
    version: str
    tag: str = Field(description="BentoML model tag, or the .onnx path it was loaded from")
    file: str = Field(description="the ONNX file served (model.onnx or model.int8.onnx)")
    runtime: str = Field(description="onnxruntime or openvino")
    precision: str = Field(description="fp32, bf16 or int8")
    device: str = Field(description="cpu or cuda")
    architecture: str
    labels: list[str]
    input_size: int
    metrics: dict = Field(description="evaluation metrics stored with the model, if any")
    accuracy_gate: dict | None = Field(description=(
        "this variant's validation accuracy and top-1 agreement with torch as `trainer export` "
        "measured them; null: not checked"))
    attributes: dict[str, list[str]] | None = Field(None, description=(
        "attribute -> its values, answered per image beside the label; absent: a single-head "
        "model"), **_ABSENT_IF_NONE)


class ErrorBody(BaseModel):
    """Every refusal (4xx, 429, 503) of the service answers this JSON body."""

    error: str = Field(description="what went wrong, for humans")
    reason: str = Field(description="short machine-readable code, e.g. too_many_pixels")


class UploadedImage(PurePosixPath):
    """One uploaded file of a multipart form, held in memory: `data` and the client's name.

    BentoML makes a form field of any `PurePath` subclass a multipart file field (the guard
    derives its routes from that), but a plain `Path` it first writes to a temporary file that
    the API then reads back: create, write, read and delete cost about a sixth of the API
    process's CPU per request (py-spy, 32 users; `docs/serve.md`). This type skips the file.
    """

    data: bytes

    def __new__(cls, data: bytes, filename: str | None = None) -> Self:
        self = super().__new__(cls, PurePosixPath(filename or "upload").name or "upload")
        self.data = data
        return self

    @classmethod
    def _validate(cls, value: Any) -> UploadedImage:
        if isinstance(value, cls):
            return value
        if isinstance(value, UploadFile):
            value.file.seek(0)
            return cls(value.file.read(), value.filename)
        if isinstance(value, bytes | bytearray):
            return cls(bytes(value))
        raise PydanticCustomError("file_type", "an uploaded file is expected")

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler):
        return core_schema.no_info_plain_validator_function(
            cls._validate, serialization=core_schema.plain_serializer_function_ser_schema(
                lambda upload: upload.data))

    @classmethod
    def __get_pydantic_json_schema__(cls, schema, handler: GetJsonSchemaHandler) -> dict:
        # As BentoML describes its own file fields, so /docs.json shows a file upload.
        if handler.mode == "validation":
            return {"type": "file", "format": "binary"}
        return {"type": "string", "format": "binary"}
