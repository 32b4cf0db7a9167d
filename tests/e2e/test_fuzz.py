"""Property-based fuzz of the HTTP surface: per-request routing options (hypothesis) and
the plugin's own OpenAPI routes (schemathesis), with and without --api-key. Bounded
example counts, on the session servers."""

from __future__ import annotations

import re

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.helpers import API_KEY, error_message, messages, post_chat
from vllm_recroute.requests.options import PREFIX, REQUEST_FIELDS

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# every per-request option, server-only fields (refused per request) and unknown keys
KEYS = [PREFIX + f for f in REQUEST_FIELDS] + [
    "recroute_kv_release",
    "recroute_parked_bytes",
    "recroute_request_min_keep",
    "recroute_bogus",
    "recroute_",
]
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["off", "reroute", "remove", "fastv", "pdrop", "custom", "key_norm"]),
    st.sampled_from(["[[1, 0.5]]", "[[2, 0.25], [1, 0.5]]", "[1, 2, 3]", "[[1, 0.5", "{}"]),
    st.text(max_size=12),
)
_values = st.one_of(
    _scalars, st.lists(_scalars, max_size=3), st.dictionaries(st.text(max_size=4), _scalars)
)
XARGS = st.dictionaries(st.sampled_from(KEYS), _values, min_size=1, max_size=4)
# a field named as the config does (recroute.keep) or as the request wrote it
NAMES_A_FIELD = re.compile(r"recroute\.[a-z_]+|vllm_xargs\.recroute_[a-z_]*|vllm_xargs")


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples on every run: a CI failure reproduces
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(xargs=XARGS)
def test_any_routing_options_get_200_or_a_400_naming_the_field(server, xargs):
    body = {"messages": messages(), "max_tokens": 2, "vllm_xargs": xargs}
    r = post_chat(server["base"], body, AUTH)
    assert r.status_code in (200, 400), (xargs, r.status_code, r.text[:300])
    if r.status_code == 400:
        assert NAMES_A_FIELD.search(error_message(r)), (xargs, r.text[:300])
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("length", "stop"), xargs


def test_the_engine_is_unharmed_by_the_fuzz(server):
    """Runs after the fuzz (file order): health, and a routed request still completes."""
    assert requests.get(server["base"] + "/health", timeout=10).status_code == 200
    r = post_chat(server["base"], {"messages": messages(), "max_tokens": 4}, AUTH)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# ------------------------------------------------------------------ schemathesis

PLUGIN_ROUTES = ("/v1/recroute/config", "/v1/recroute/stats")


def _check_plugin_routes(base: str, headers: dict, status: int) -> None:
    """Schemathesis cases of each plugin route from the server's own OpenAPI document,
    sent with ``headers``: every check passes (no 5xx, the status and content type are
    documented, the body matches its schema) and the status is ``status``.

    (schemathesis' pytest plugin does not run under pytest 9: its strategies are driven
    by hypothesis here.)"""
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    for path in PLUGIN_ROUTES:
        _check_route(base, schema[path]["GET"], headers, status)


def _check_route(base: str, operation, headers: dict, status: int) -> None:
    @settings(max_examples=5, deadline=None, derandomize=True)
    @given(case=operation.as_strategy())
    def run(case):
        response = case.call_and_validate(base_url=base, headers=headers)
        assert response.status_code == status, (operation.path, response.text[:200])

    run()


def test_plugin_routes_conform_with_the_api_key(server):
    _check_plugin_routes(server["base"], AUTH, 200)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["none", "wrong"])
def test_plugin_routes_refuse_a_missing_or_wrong_key_with_401(server, headers):
    _check_plugin_routes(server["base"], headers, 401)


def test_plugin_routes_conform_without_an_api_key(soak_server):
    _check_plugin_routes(soak_server["base"], {}, 200)
