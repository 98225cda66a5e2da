"""What counts as a correct answer from /classify and /classify_batch.

A 200 with a body the client cannot use is a failure too: load tests that only look at status
codes miss servers that answer fast and wrong. Each check returns None when the body is
good, or a short reason that Locust groups failures by.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any


def _prediction_problem(prediction: Any) -> str | None:
    if not isinstance(prediction, dict):
        return f"prediction is {type(prediction).__name__}, not an object"
    if "label" not in prediction:
        return "missing 'label'"
    label, score = prediction["label"], prediction.get("score")
    # null is a valid label: the service says "unsure" when a request sets min_score.
    if label is not None and (not isinstance(label, str) or not label):
        return "missing or empty 'label'"
    if not isinstance(score, (int, float)) or not (0.0 <= score <= 1.0) or math.isnan(score):
        return f"'score' is not a probability: {score!r}"
    top_k = prediction.get("top_k")
    if not isinstance(top_k, list) or not top_k:
        return "missing or empty 'top_k'"
    for entry in top_k:
        if (not isinstance(entry, dict) or not isinstance(entry.get("label"), str)
                or not isinstance(entry.get("score"), (int, float))):
            return "'top_k' entries must be {label, score}"
    if label is not None and top_k[0]["label"] != label:
        return "'label' is not the first of 'top_k'"
    if any(a["score"] < b["score"] for a, b in itertools.pairwise(top_k)):
        return "'top_k' is not sorted by score"
    model = prediction.get("model")
    if not isinstance(model, dict) or not model.get("name") or not model.get("version"):
        return "missing 'model' {name, version}"
    return None


def parse_json(text: str | bytes | None) -> tuple[Any, str | None]:
    if not text:
        return None, "empty body"
    try:
        return json.loads(text), None
    except ValueError as exc:
        return None, f"body is not JSON ({exc.__class__.__name__})"


def classify_problem(text: str | bytes | None) -> str | None:
    """None if the body is a valid /classify answer, else why not."""
    body, problem = parse_json(text)
    return problem or _prediction_problem(body)


def batch_problem(text: str | bytes | None, expected: int) -> str | None:
    """None if the body is a valid /classify_batch answer for `expected` images, else why not."""
    body, problem = parse_json(text)
    if problem:
        return problem
    results = body.get("predictions") if isinstance(body, dict) else None
    if not isinstance(results, list):
        return "batch answer has no 'predictions' list"
    if len(results) != expected:
        return f"batch answer has {len(results)} results for {expected} images"
    for item in results:
        item_problem = _prediction_problem(item)
        if item_problem:
            return f"batch item: {item_problem}"
    return None
