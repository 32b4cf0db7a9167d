"""A request's routing is resolved once per process, dropped when it finishes, and a bad
request gets the same clear error (front end) or warning (engine, worker) as before."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from vllm_recroute import vllm_view
from vllm_recroute.config import RoutingConfig
from vllm_recroute.requests import resolution
from vllm_recroute.requests.resolution import RoutingResolver, resolve_options

BASE = RoutingConfig(mode="reroute", keep=0.5)


def _scheduler_request(req_id, extra=None):
    return SimpleNamespace(request_id=req_id, sampling_params=SimpleNamespace(extra_args=extra))


def _worker_state(req_id, extra=None):
    return SimpleNamespace(req_id=req_id, sampling_params=SimpleNamespace(extra_args=extra))


@pytest.mark.parametrize(
    ("make", "options_of"),
    [
        (_scheduler_request, vllm_view.scheduler_request_options),
        (_worker_state, vllm_view.worker_request_options),
    ],
    ids=["engine core", "worker"],
)
def test_each_request_is_resolved_once_until_forgotten(monkeypatch, make, options_of):
    calls = []
    real = resolution.resolve_options

    def counting(base, extra_args, req_id):
        calls.append(req_id)
        return real(base, extra_args, req_id)

    monkeypatch.setattr(resolution, "resolve_options", counting)
    resolver = RoutingResolver(BASE, options_of)
    a = make("a", {"recroute_keep": 0.25, "recroute_mode": "remove"})
    first = resolver.resolve(a)
    assert first.cfg.keep == 0.25 and first.cfg.mode == "remove"
    assert first.key == (("keep", "0.25"), ("mode", "'remove'"))
    assert resolver.resolve(a) is first and resolver.resolve(make("b")).cfg is BASE
    assert calls == ["a", "b"] and len(resolver) == 2 and "a" in resolver
    resolver.forget("a")
    resolver.forget("a")  # finished twice (connector and scheduler): harmless
    assert "a" not in resolver and len(resolver) == 1
    assert resolver.resolve(a) == first and calls == ["a", "b", "a"]


def test_a_bad_request_runs_with_the_server_config_and_one_warning(caplog):
    resolver = RoutingResolver(BASE, vllm_view.scheduler_request_options)
    bogus = _scheduler_request("r", {"recroute_bogus": 1})
    below = _scheduler_request("s", {"recroute_keep": 0})
    with caplog.at_level(logging.WARNING, logger="vllm_recroute"):
        for _ in range(3):
            assert resolver.resolve(bogus).cfg is BASE
            assert resolver.resolve(below).cfg is BASE
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert warnings[0].startswith("vllm-recroute: request r: vllm_xargs.recroute_bogus")
    assert "unknown option; allowed: recroute_mode" in warnings[0]
    assert warnings[0].endswith("; using server routing config")
    assert warnings[1].startswith("vllm-recroute: request s: recroute.keep: got 0.0")
    # unvalidated options key a kept turn by their raw value: they match only themselves
    assert resolver.resolve(bogus).key not in ((), resolver.resolve(below).key)


def test_the_front_end_still_refuses_a_bad_request_naming_the_option():
    from vllm.exceptions import VLLMValidationError

    from vllm_recroute.requests.validation import validate_request

    with pytest.raises(VLLMValidationError, match="unknown option; allowed") as err:
        validate_request(BASE, {"recroute_bogus": 1})
    assert err.value.parameter == "vllm_xargs.recroute_bogus"
    with pytest.raises(VLLMValidationError) as err:
        validate_request(BASE, {"recroute_keep": 0})
    assert err.value.parameter == "recroute.keep"  # the config's own check names it
    assert (
        validate_request(BASE, {"recroute_keep": 0.25})
        == resolve_options(BASE, {"recroute_keep": 0.25}, "r").cfg
    )


def test_the_connector_drops_a_resolution_when_its_request_finishes():
    from vllm.v1.request import RequestStatus

    from tests.unit.test_scheduler_side import _request, _side

    for status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_ABORTED):
        side = _side()
        side.routings.resolve(_request(status))
        assert "r" in side.routings
        side.request_finished(_request(status), ([1, 2, 3],))
        assert "r" not in side.routings


def test_the_worker_drops_a_resolution_when_its_request_finishes_not_when_preempted():
    from vllm_recroute.worker.runtime import WorkerRuntime
    from vllm_recroute.worker.state import RouteStore

    dec = WorkerRuntime.__new__(WorkerRuntime)  # the worker's routing state and its API
    dec.config = BASE
    dec.store = RouteStore()
    dec.routings = RoutingResolver(BASE, vllm_view.worker_request_options)
    runner = SimpleNamespace(requests={r: _worker_state(r) for r in "abc"})
    for r in "abc":
        assert dec.config_of(runner, r) is BASE
    assert dec.config_of(runner, "gone") is BASE  # no cached state: the server's config
    dec.requests_gone(finished={"a"}, preempted={"b"})
    assert "a" not in dec.routings and "b" in dec.routings and "c" in dec.routings
