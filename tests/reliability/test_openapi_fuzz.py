"""A bounded schemathesis run of Steady's HTTP API (``service/openapi.yaml``) against the live service.

Positive and negative examples for every operation, a fixed number per operation
(``STEADY_SCHEMATHESIS_EXAMPLES``, default 25), derandomised. The checks: no 5xx, every
status and Content-Type is documented, 2xx bodies match their schema, and every 4xx is a
JSON ``{"error": "..."}``. The same spec documents the API (``service/openapi.yaml``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.reliability.conftest import TALLY  # noqa: E402

SPEC = Path(__file__).resolve().parents[2] / "service" / "openapi.yaml"
EXAMPLES = int(os.environ.get("STEADY_SCHEMATHESIS_EXAMPLES", "25"))

schema = schemathesis.openapi.from_path(SPEC)
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], deterministic=True,
                                max_examples=EXAMPLES)

pytestmark = pytest.mark.e2e


def _error_shape(response: object) -> None:
    status = getattr(response, "status_code")
    if 400 <= status < 500:
        import json

        doc = json.loads(getattr(response, "content") or b"null")
        assert isinstance(doc, dict) and set(doc) == {"error"} and isinstance(doc["error"], str) and doc["error"], \
            f"{status} body is not a JSON error: {getattr(response, 'content')[:200]!r}"


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_and_never_fails(case, service) -> None:  # type: ignore[no-untyped-def]
    try:
        response = case.call(base_url=service.base, timeout=10)
    except Exception:
        TALLY.record("openapi-fuzz", expected=False, crash=True)
        raise
    ok = True
    try:
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                 content_type_conformance, response_schema_conformance])
        _error_shape(response)
    except BaseException:
        ok = False
        raise
    finally:
        TALLY.record("openapi-fuzz", expected=ok, status=response.status_code)
