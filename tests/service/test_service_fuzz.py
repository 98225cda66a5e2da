"""Schemathesis fuzzes every operation in the service's OpenAPI document (/docs.json): no 500s."""

from __future__ import annotations

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

EXAMPLES_PER_OPERATION = 25  # bounded: ~10 operations x 25 requests


def test_no_operation_answers_500(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/docs.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5
    tried = []
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            response = case.call(base_url=server.url, timeout=30)
            case.validate_response(response, checks=[not_a_server_error])

        fuzz()
        tried.append(operation.label)
    assert any("/classify" in label for label in tried)
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_schema_documents_the_typed_api(server):
    spec = httpx.get(f"{server.url}/docs.json").json()
    assert {"/classify", "/classify_batch", "/model"} <= set(spec["paths"])
    body = spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body
