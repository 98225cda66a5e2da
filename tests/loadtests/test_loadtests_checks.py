"""The body checks that decide whether a 200 answer counts as a success, and the payloads."""

from __future__ import annotations

import copy
import io
import json

import pytest
from PIL import Image

from loadtests.checks import batch_problem, classify_problem
from loadtests.payloads import SIZE_CLASSES, load_payloads
from loadtests.prom import mean_batch_size, parse_samples
from tests.loadtests.conftest import GOOD_PREDICTION


def test_a_well_formed_prediction_passes():
    assert classify_problem(json.dumps(GOOD_PREDICTION)) is None
    unsure = dict(GOOD_PREDICTION, label=None)  # min_score said "unsure": still well formed
    assert classify_problem(json.dumps(unsure)) is None


def _broken(mutate):
    body = copy.deepcopy(GOOD_PREDICTION)
    mutate(body)
    return json.dumps(body)


@pytest.mark.parametrize("text, reason", [
    ("", "empty body"),
    ('{"label": "dress", "sco', "not JSON"),
    ("[1, 2]", "not an object"),
    (_broken(lambda b: b.pop("label")), "missing 'label'"),
    (_broken(lambda b: b.update(label="")), "'label'"),
    (_broken(lambda b: b.update(score=1.5)), "probability"),
    (_broken(lambda b: b.update(score="high")), "probability"),
    (_broken(lambda b: b.update(top_k=[])), "top_k"),
    (_broken(lambda b: b["top_k"].reverse()), "first of 'top_k'"),
    (_broken(lambda b: b.update(label="hat", top_k=[{"label": "hat", "score": 0.1},
                                                      {"label": "dress", "score": 0.7}])),
     "not sorted"),
    (_broken(lambda b: b.pop("model")), "model"),
])
def test_malformed_predictions_are_named(text, reason):
    problem = classify_problem(text)
    assert problem is not None and reason in problem


def test_batch_answers_must_match_the_number_of_images():
    body = json.dumps({"predictions": [GOOD_PREDICTION] * 3})
    assert batch_problem(body, 3) is None
    assert "2 results for 3 images" in batch_problem(json.dumps(
        {"predictions": [GOOD_PREDICTION] * 2}), 3)
    assert "'predictions'" in batch_problem(json.dumps([GOOD_PREDICTION] * 3), 3)
    bad_item = dict(GOOD_PREDICTION, score=-0.1)
    assert "batch item" in batch_problem(json.dumps({"predictions": [bad_item]}), 1)


def test_payloads_are_real_jpegs_in_every_size_class(demo_catalog):
    payloads = load_payloads(demo_catalog, per_label=1)
    labels = {p.label for p in payloads}
    assert len(labels) == 10 and len(payloads) == 10 * len(SIZE_CLASSES)
    for payload in payloads:
        with Image.open(io.BytesIO(payload.data)) as image:
            assert image.format == "JPEG"
            short_side = min(image.size)
        wanted = SIZE_CLASSES[payload.size_class]
        if wanted is not None:
            assert short_side == wanted
    with pytest.raises(ValueError, match="unknown size classes"):
        load_payloads(demo_catalog, sizes=("huge",))
    with pytest.raises(FileNotFoundError):
        load_payloads(demo_catalog / "no-such-folder")


def test_mean_batch_size_is_the_increase_of_sum_over_count():
    before = parse_samples('# HELP x\nclassifier_model_batch_images_sum{a="1"} 10\n'
                           'classifier_model_batch_images_count{a="1"} 5\n')
    after = parse_samples('classifier_model_batch_images_sum{a="1"} 70\n'
                          'classifier_model_batch_images_sum{a="2"} 30\n'
                          'classifier_model_batch_images_count{a="1"} 15\n'
                          'classifier_model_batch_images_count{a="2"} 5\n')
    assert mean_batch_size(before, after) == (90 / 15, 15)
