"""The model contract: what a classifier file must say about itself, and the one preprocessing.

The trainer writes the contract into the ONNX file's metadata (and the BentoML model's);
the service reads it back from there. `preprocess` is the only place an image becomes a
tensor for evaluation or serving (as `crop_pixels` then `normalize`: the service runs the
first in its API process and the second on the batch in its model process), so trainer
evaluation and the service give the same tensor by construction (tests/test_contract.py
proves it). numpy + Pillow only: no torch.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

ONNX_INPUT = "input"     # float32 [batch, 3, input_size, input_size], normalised
ONNX_OUTPUT = "logits"   # float32 [batch, len(labels)]
ATTRIBUTE_OUTPUT = "attr_{}"  # float32 [batch, len(attributes[name])], one per attribute
CONTRACT_KEY = "product_classifier.contract"  # one JSON document in ONNX metadata_props

# A 12000 x 12000 photo is plausible from a camera; beyond 50 MP it is a bomb or an error.
DEFAULT_MAX_PIXELS = 50_000_000


class ContractError(ValueError):
    """The model file does not carry a usable contract."""


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image. `reason` is short and machine-readable."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ModelContract(BaseModel):
    """Everything needed to turn a photo into the model's input and its output into labels."""

    name: str = "product-classifier"
    version: str = Field(description="model version, e.g. a run name or timestamp")
    labels: list[str] = Field(min_length=2)
    input_size: int = Field(224, ge=32, le=1024, description="square crop fed to the network")
    crop_pct: float = Field(0.875, gt=0.3, le=1.0, description="centre crop / resized short side")
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    architecture: str = ""
    temperature: float = Field(1.0, gt=0, description=(
        "calibrated scores are softmax(logits / temperature); fitted on validation by the "
        "trainer, 1.0 = uncalibrated"))
    attributes: dict[str, list[str]] | None = Field(None, description=(
        "attribute -> its values, one ONNX output `attr_NAME` each; absent: a single-head "
        "model"))
    attribute_temperatures: dict[str, float] | None = Field(None, description=(
        "attribute -> the temperature of its head, fitted on the validation photos whose "
        "value is known: its scores are softmax(attr_NAME / T); an attribute not named (or a "
        "model from before calibrated heads) has T = 1"))

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, labels: list[str]) -> list[str]:
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be unique, got {labels}")
        if any(not label for label in labels):
            raise ValueError("labels must be non-empty strings")
        return labels

    @field_validator("attributes")
    @classmethod
    def _attribute_values(cls, attributes: dict[str, list[str]] | None):
        for name, values in (attributes or {}).items():
            if not name.replace("_", "").isalnum():
                raise ValueError(f"attribute name {name!r}: use letters, digits and '_'")
            if len(values) < 2 or len(set(values)) != len(values) or not all(values):
                raise ValueError(f"attribute {name!r} needs 2 or more unique values, got "
                                 f"{values}")
        return attributes or None

    @field_validator("attribute_temperatures")
    @classmethod
    def _no_empty_temperatures(cls, temperatures: dict[str, float] | None):
        return temperatures or None

    @model_validator(mode="after")
    def _temperatures_of_known_heads(self) -> ModelContract:
        temperatures = self.attribute_temperatures or {}
        unknown = sorted(set(temperatures) - set(self.attributes or {}))
        if unknown:
            raise ValueError(f"attribute_temperatures names {unknown}, which are not among the "
                             f"attributes {sorted(self.attributes or {})}")
        bad = {name: t for name, t in temperatures.items() if not (math.isfinite(t) and t > 0)}
        if bad:
            raise ValueError(f"attribute temperatures must be positive and finite, got {bad}")
        return self

    def attribute_temperature(self, name: str) -> float:
        """The temperature of an attribute head's scores (1.0 when none was fitted)."""
        return (self.attribute_temperatures or {}).get(name, 1.0)

    def outputs(self) -> list[str]:
        """The ONNX outputs the model has: `logits`, then one per attribute."""
        return [ONNX_OUTPUT, *(ATTRIBUTE_OUTPUT.format(name) for name in self.attributes or {})]

    def attribute_columns(self) -> dict[str, slice]:
        """Where each attribute's scores lie when the outputs are put side by side."""
        columns, start = {}, len(self.labels)
        for name, values in (self.attributes or {}).items():
            columns[name] = slice(start, start + len(values))
            start += len(values)
        return columns

    @model_validator(mode="after")
    def _positive_std(self) -> ModelContract:
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        return self

    def to_metadata(self) -> dict[str, str]:
        """Key/value strings for ONNX `metadata_props` (and readable keys for humans)."""
        # A single-head model writes exactly what it wrote before attributes existed, and a
        # model without fitted attribute temperatures what it wrote before those.
        absent = {name for name in ("attributes", "attribute_temperatures")
                  if not getattr(self, name)}
        return {
            CONTRACT_KEY: self.model_dump_json(exclude=absent or None),
            "labels": json.dumps(self.labels),
            "version": self.version,
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> ModelContract:
        raw = metadata.get(CONTRACT_KEY)
        if raw is None:
            raise ContractError(
                f"model metadata has no '{CONTRACT_KEY}' entry; export the model with "
                "`trainer export RUN_DIR`, which writes labels, input size, mean/std and version"
            )
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise ContractError(f"model metadata '{CONTRACT_KEY}' is invalid: {exc}") from exc


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               draft_size: int | None = None) -> Image.Image:
    """Bytes -> PIL image with only its header read: `.size` is what `finish_decode` will hold
    in memory (a JPEG already at its reduced draft scale), so callers can budget on it first.

    Trust the bytes, not a file name or Content-Type. `draft_size` lets JPEG decode at a
    reduced DCT scale whose short side is still >= draft_size (3x faster on 800x600 photos).
    """
    if not data:
        raise ImageDecodeError("empty", "no bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_many_pixels", str(exc)) from exc
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
        raise ImageDecodeError("not_an_image", str(exc) or type(exc).__name__) from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError("too_many_pixels",
                               f"{width}x{height} is over the limit of {max_pixels} pixels")
    try:
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
    except Exception as exc:
        raise ImageDecodeError("corrupt", str(exc) or type(exc).__name__) from exc
    return image


def finish_decode(image: Image.Image) -> Image.Image:
    """An `open_image` result -> RGB PIL image, fully decoded, EXIF orientation applied.

    Peak memory is about 4 bytes a pixel of `image.size` (RGB is stored as 32-bit), about 13
    for a transparent palette image (RGBA copy, white background, composite).
    """
    try:
        image.load()  # forces a full decode: truncated files fail here, not later
        ImageOps.exif_transpose(image, in_place=True)  # a copy would double the peak
        if image.mode != "RGB":
            # Transparent product shots become white-background, as shops show them.
            if image.mode in ("RGBA", "LA", "P"):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, rgba)
                del rgba, background
            image = image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_many_pixels", str(exc)) from exc
    except Exception as exc:
        raise ImageDecodeError("corrupt", str(exc) or type(exc).__name__) from exc
    return image


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_size: int | None = None) -> Image.Image:
    """Bytes -> RGB PIL image, fully decoded, EXIF orientation applied (`open_image` then
    `finish_decode`)."""
    return finish_decode(open_image(data, max_pixels=max_pixels, draft_size=draft_size))


def resize_short_side(contract: ModelContract) -> int:
    return round(contract.input_size / contract.crop_pct)


def crop_pixels(image: Image.Image, contract: ModelContract) -> np.ndarray:
    """RGB image -> uint8 [S, S, 3]: the centre crop of crop_pct, resized to S.

    Crop-then-resize in one Pillow call equals resize-short-side-then-centre-crop, but
    resamples only the pixels that are kept. uint8 is 4x smaller than the float input, which is
    what crosses the service's API -> model hop.
    """
    size = contract.input_size
    width, height = image.size
    side = min(width, height) * contract.crop_pct
    left, top = (width - side) / 2, (height - side) / 2
    image = image.resize((size, size), Image.Resampling.BILINEAR,
                         box=(left, top, left + side, top + side))
    return np.asarray(image, dtype=np.uint8)


def normalize(pixels: np.ndarray, contract: ModelContract) -> np.ndarray:
    """uint8 [N, S, S, 3] (or one [S, S, 3]) -> float32 [N, 3, S, S] (or [3, S, S]) model input.

    (pixel / 255 - mean) / std, folded into one multiply-add per channel: one strided pass
    that also moves the channels first, then one in-place add (10x faster than step by step).
    """
    mean = np.asarray(contract.mean, dtype=np.float64)
    std = np.asarray(contract.std, dtype=np.float64)
    scale = (1.0 / (255.0 * std)).astype(np.float32)[:, None, None]
    offset = (-mean / std).astype(np.float32)[:, None, None]
    channels_first = np.moveaxis(pixels, -1, -3)
    tensor = np.empty(channels_first.shape, dtype=np.float32)
    np.multiply(channels_first, scale, out=tensor)
    tensor += offset
    return tensor


def preprocess(image: Image.Image, contract: ModelContract) -> np.ndarray:
    """RGB image -> float32 [3, S, S]: `crop_pixels` then `normalize`."""
    return normalize(crop_pixels(image, contract), contract)


def load_pixels(data: bytes, contract: ModelContract,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> uint8 [S, S, 3] crop (the service's half of preprocessing, before the hop)."""
    return crop_opened(open_for(data, contract, max_pixels), contract)


def open_for(data: bytes, contract: ModelContract,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`open_image` at the draft size this contract's crop allows (what `load_pixels` decodes)."""
    return open_image(data, max_pixels=max_pixels, draft_size=resize_short_side(contract))


def crop_opened(image: Image.Image, contract: ModelContract) -> np.ndarray:
    """An `open_for` result -> uint8 [S, S, 3] crop: the decode, then `crop_pixels`."""
    return crop_pixels(finish_decode(image), contract)


def load_and_preprocess(data: bytes, contract: ModelContract,
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> model input, the path both evaluation and the service take."""
    return normalize(load_pixels(data, contract, max_pixels), contract)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def calibrated_scores(logits: np.ndarray, contract: ModelContract) -> np.ndarray:
    """The main label's scores as served: softmax(logits / T), T fitted on validation by the
    trainer, so a score of 0.8 is right about 80 % of the time (T = 1 for older models)."""
    return softmax(logits / contract.temperature)


def calibrated_attribute_scores(logits: np.ndarray, contract: ModelContract,
                                name: str) -> np.ndarray:
    """An attribute head's scores as served: softmax(attr_NAME / T) with the head's own
    temperature, fitted by the trainer on the validation photos whose value is known (T = 1
    for a head without one)."""
    return softmax(logits / contract.attribute_temperature(name))
