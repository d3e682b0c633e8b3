"""Schemathesis against the admin API's own OpenAPI schema, on every backend: generated
requests to every operation get no 5xx, and every response matches what the schema says
(status code, content type, headers, body)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.managed import ADMIN, managed_gateway, new_member

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def test_the_admin_api_keeps_to_its_schema(upstream: Any, history_dsn: str, tmp_path: Path) -> None:
    with managed_gateway(upstream, history_dsn, tmp_path) as gateway:
        new_member(gateway, "grace")  # something to list, and a user id in the audit log
        schema = schemathesis.openapi.from_url(gateway.url + "/admin/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 20
        tried: list[str] = []
        for operation in operations:

            @settings(
                max_examples=30,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy())
            def call(case: Any) -> None:
                case.call_and_validate(
                    base_url=gateway.url + "/admin", headers=ADMIN, checks=CHECKS
                )

            call()
            tried.append(operation.label)
        assert len(tried) == len(operations)
