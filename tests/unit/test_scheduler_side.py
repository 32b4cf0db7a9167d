"""The connector's scheduler side: which finished turns it keeps, and the exact blocks it
hands the worker's save (a routed-stage row with released entries keeps its live tail)."""

from __future__ import annotations

from types import SimpleNamespace

from vllm_recroute import vllm_view
from vllm_recroute.config import RoutingConfig
from vllm_recroute.connector.scheduler import SchedulerSide
from vllm_recroute.kv.turn_index import TurnIndex
from vllm_recroute.requests.resolution import RoutingResolver


def _side() -> SchedulerSide:
    side = SchedulerSide.__new__(SchedulerSide)
    side.routings = RoutingResolver(RoutingConfig(), vllm_view.scheduler_request_options)
    side._turns = TurnIndex(capacity_bytes=1 << 20, block_size=4, bytes_per_token=10)
    side._kv_cache_manager = SimpleNamespace(
        block_pool=SimpleNamespace(null_block=SimpleNamespace(block_id=0))
    )
    side._stage_groups = {}
    side._released_unreported = 0
    side._released_after_forward = 0
    side._turn_matches = {}
    side._turn_deferred = {}
    from vllm_recroute.messages import RecrouteMetadata

    side._jobs = RecrouteMetadata()
    return side


def _request(status=None):
    from vllm.v1.request import RequestStatus

    tokens = list(range(10, 22))
    return SimpleNamespace(
        request_id="r",
        status=status or RequestStatus.FINISHED_STOPPED,
        num_computed_tokens=11,
        num_output_placeholders=0,
        num_prompt_tokens=8,
        all_token_ids=tokens,
        block_hashes=["h0", "h1"],  # two full blocks of 4 tokens
        mm_features=[
            SimpleNamespace(mm_position=SimpleNamespace(offset=2, length=5), identifier="img")
        ],
        sampling_params=SimpleNamespace(extra_args=None),
        cache_salt=None,
    )


def test_a_finished_turn_is_kept_and_saved():
    side = _side()
    assert side.request_finished(_request(), ([1, 2, 3],)) is True
    [job] = side.build_meta().turn_saves
    assert job.request_id == "r" and job.block_ids == ((1, 2, 3),)


def test_an_aborted_turn_is_not_kept():
    from vllm.v1.request import RequestStatus

    side = _side()
    assert side.request_finished(_request(RequestStatus.FINISHED_ABORTED), ([1],)) is False
    assert side.build_meta().turn_saves == []


def test_a_routed_stage_row_keeps_its_live_tail_block():
    """vLLM hands over the blocks covering num_computed_tokens counted uncompacted
    (get_block_ids_for_computed_tokens): for a stage row [7, 8, 9, null, null, 12] and 5
    blocks' worth of tokens that is [7, 8, 9, 0, 0], which loses block 12, where rows
    96.. of the compacted sequence live (the soak run's crash). The save gets the live
    blocks from the stage's manager."""
    side = _side()
    stage = SimpleNamespace(
        kv_cache_group_id=1,
        stage=1,
        get_deferred=lambda r: 40,
        live_block_ids=lambda r: [7, 8, 9, 12],
        take_released=list,
        take_never_allocated=lambda: 0,
    )
    side._stage_groups = {1: [stage]}
    truncated = ([1, 2, 3, 4, 5], [7, 8, 9, 0, 0])  # stage 0 has no holes
    assert side.request_finished(_request(), truncated) is True
    [job] = side.build_meta().turn_saves
    assert job.block_ids == ((1, 2, 3, 4, 5), (7, 8, 9, 12))


class _PlanLog:
    """A stage group's manager that records the scheduler side's plan calls."""

    kv_cache_group_id = 1
    stage = 1

    def __init__(self):
        self.calls = []

    def plan(self, req_id, plan):
        self.calls.append(("plan", req_id, plan))

    def expect_deferred(self, req_id, n):
        self.calls.append(("expect", req_id, n))

    def get_deferred(self, req_id):
        return 3

    def live_block_ids(self, req_id):
        return [7, 8, 9]


def _waiting(request_id, extra_tokens):
    """A new request: turn 1's tokens (``_request``) and ``extra_tokens`` more."""
    req = _request()
    req.request_id = request_id
    req.all_token_ids = [*req.all_token_ids, *range(100, 100 + extra_tokens)]
    req.num_tokens = len(req.all_token_ids)
    req.num_prompt_tokens = req.num_tokens
    req.num_computed_tokens = 0
    req.block_hashes = ["h0", "h1", "h2"]
    return req


def test_one_deferral_plan_per_consideration_and_none_for_a_loaded_turn():
    """kv_release: a waiting request is planned once per get_num_new_matched_tokens; one
    that loads a kept turn gets no plan (it arrives routed) and the turn's counts instead."""
    side = _side()
    manager = _PlanLog()
    side._stage_groups = {1: [manager]}
    side._plans_of = lambda request, n: {1: ("plan of", request.request_id, n)}
    assert side.get_num_new_matched_tokens(_waiting("a", 4), 0) == (0, False)  # none kept
    assert manager.calls == [("plan", "a", ("plan of", "a", 0))]
    manager.calls.clear()
    assert side.request_finished(_request(), ([1, 2, 3], [7, 8, 9])) is True  # turn 1 kept
    manager.calls.clear()
    assert side.get_num_new_matched_tokens(_waiting("b", 4), 0) == (11, False)
    assert manager.calls == [("plan", "b", None), ("expect", "b", 3)]
