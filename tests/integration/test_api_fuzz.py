"""No input makes the API answer 500: random JSON bodies, queries and ids, every answer a
2xx or a 4xx problem+json."""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Tenant

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
kinds = st.sampled_from(["chat", "structured", "", "x" * 100]) | st.text(max_size=8)
inputs = st.fixed_dictionaries(
    {},
    optional={
        "prompt": json_values,
        "messages": json_values,
        "schema": json_values,
        "max_tokens": json_values,
        "temperature": json_values,
        "system": json_values,
    },
)
bodies = json_values | st.fixed_dictionaries(
    {"kind": kinds, "input": inputs | json_values},
    optional={"priority": json_values, "max_attempts": json_values},
)
fuzz = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def assert_not_a_server_error(response: Any) -> None:
    assert response.status_code < 500, response.get_data(as_text=True)
    if response.status_code >= 400:
        assert response.headers["Content-Type"] == "application/problem+json"
        assert response.get_json()["status"] == response.status_code


@fuzz
@given(body=bodies)
def test_random_job_bodies_never_500(tenant: Tenant, body: Any) -> None:
    response = tenant.post("/api/v1/jobs", data=json.dumps(body), content_type="application/json")
    assert_not_a_server_error(response)
    if response.status_code == 202:
        tenant.post(f"/api/v1/jobs/{response.get_json()['id']}/cancel")


@fuzz
@given(
    query=st.dictionaries(
        st.sampled_from(["status", "kind", "limit", "cursor", "x"]),
        st.text(max_size=20),
        max_size=4,
    ),
    path=st.text(max_size=40),
)
def test_random_queries_and_paths_never_500(
    tenant: Tenant, query: dict[str, str], path: str
) -> None:
    segment = quote(path, safe="")  # a path segment, whatever its characters
    assert_not_a_server_error(tenant.get("/api/v1/jobs", query_string=query))
    assert_not_a_server_error(tenant.get(f"/api/v1/jobs/{segment}"))
    assert_not_a_server_error(tenant.get(f"/api/v1/jobs/{segment}/events", query_string=query))
