"""The connector's scheduler side keeps a finished turn only when its KV is trustworthy:
stopped or length-capped (not aborted) and never preempted (recomputed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_recroute.connector.scheduler import SchedulerSide
from vllm_recroute.kv.turn_index import TurnIndex


def _side() -> SchedulerSide:
    side = SchedulerSide.__new__(SchedulerSide)
    side._turns = TurnIndex(capacity_bytes=1 << 20, block_size=4, bytes_per_token=10)
    side._kv_cache_manager = SimpleNamespace(
        block_pool=SimpleNamespace(null_block=SimpleNamespace(block_id=0))
    )
    side._stage_groups = {}
    side._released_unreported = 0
    side._turn_matches = {}
    side._turn_deferred = {}
    from vllm_recroute.connector.messages import RecrouteMetadata

    side._jobs = RecrouteMetadata()
    return side


def _request(preemptions: int, status=None):
    from vllm.v1.request import RequestStatus

    tokens = list(range(10, 22))
    return SimpleNamespace(
        request_id="r",
        status=status or RequestStatus.FINISHED_STOPPED,
        num_computed_tokens=11,
        num_prompt_tokens=8,
        num_preemptions=preemptions,
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
    assert side.request_finished(_request(0), ([1, 2, 3],)) is True
    assert [job.request_id for job in side.build_meta().turn_saves] == ["r"]


@pytest.mark.parametrize("preemptions", [1, 3])
def test_a_preempted_turn_is_not_kept(preemptions):
    side = _side()
    assert side.request_finished(_request(preemptions), ([1, 2, 3],)) is False
    assert side.build_meta().turn_saves == [] and len(side._turns) == 0


def test_an_aborted_turn_is_not_kept():
    from vllm.v1.request import RequestStatus

    side = _side()
    assert side.request_finished(_request(0, RequestStatus.FINISHED_ABORTED), ([1],)) is False
