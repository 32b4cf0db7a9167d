"""kv_release and kept turns under async scheduling (vLLM's AsyncScheduler: two schedule()
calls before each update_from_output), on the functions that decide them.

Not a full vLLM scheduler: a faithful simulation of its one-step-late order drives the
exact deciding code, `RoutedStageManager` (allocate_new_blocks / remove_skipped_blocks /
set_deferred / free, as `KVCacheManager.allocate_slots` and `SchedulerSide` call them) and
`SchedulerSide.request_finished`, with vLLM's async counters (`AsyncScheduler.
_update_after_schedule` adds a placeholder per scheduled decode-producing step,
`_update_request_with_output` takes it back; `num_computed_tokens` advances at schedule
time; preemption zeroes both). The worker writes each step's compacted positions into the
live rows it holds when the step runs (worker/compaction.py); a step is *in flight* from
its schedule() until its update_from_output().
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.kv_cache_interface import FullAttentionSpec

from tests.unit.test_scheduler_side import _request as finished_request
from tests.unit.test_scheduler_side import _side
from vllm_recroute.kv.manager import DeferralPlan, RoutedStageManager, register_stage_spec
from vllm_recroute.kv.spec import stage_spec_from

BLOCK = 4
PROMPT = 16
FIRST_IMAGE = 2
PLANNED = 4  # block granularity: the plan is a floor
ROUTED = 6  # what the worker defers


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_stage_spec()


@dataclass
class Step:
    index: int
    writes: set[int]  # row indices of the stage row this step writes
    tokens: int  # tokens it computes (their KV is written when it completes)
    report: int | None  # deferred count the worker reports with its output (prefill)


@dataclass
class Request:
    id: str = "r"
    num_computed_tokens: int = 0
    num_output_placeholders: int = 0
    kv_done: int = 0  # tokens whose KV completed steps wrote
    outputs: int = 0


@dataclass
class OneStepLate:
    """AsyncScheduler's order for one request on one routed stage group."""

    m: RoutedStageManager
    req: Request = field(default_factory=Request)
    in_flight: list[Step] = field(default_factory=list)
    released_rows: list[int] = field(default_factory=list)
    count: int = 0

    def schedule(self) -> Step:
        """schedule(): plan (connector, before a waiting request's allocation), then
        allocate_slots (remove_skipped_blocks -> release, then new blocks)."""
        req, m = self.req, self.m
        prefill = req.num_computed_tokens == 0
        if prefill:
            m.plan(req.id, DeferralPlan(PLANNED, FIRST_IMAGE, PROMPT))
        num_new = PROMPT if prefill else 1
        m.remove_skipped_blocks(req.id, req.num_computed_tokens)
        for event in m.take_released():
            self._check_release(event.row_indices)
            self.released_rows.extend(event.row_indices)
        total = req.num_computed_tokens + num_new
        if req.id not in m.req_to_blocks:
            m.req_to_blocks[req.id] = []  # as allocate_slots' first allocation
        m.allocate_new_blocks(req.id, total, total)
        step = Step(self.count, self._worker_writes(prefill), num_new, ROUTED if prefill else None)
        self.count += 1
        req.num_computed_tokens = total
        req.num_output_placeholders += 1  # AsyncScheduler._update_after_schedule
        self.in_flight.append(step)
        self._check_release(())  # the new step never writes a released row either
        return step

    def _worker_writes(self, prefill: bool) -> set[int]:
        """Rows the worker writes: compacted positions with the deferred count it routed
        (worker/compaction.py), in the live rows it holds now."""
        req = self.req
        if prefill:
            positions = range(PROMPT - ROUTED)
        else:
            last = req.num_computed_tokens - ROUTED
            positions = range(last, last + 1)
        live = [i for i, b in enumerate(self.m.req_to_blocks[req.id]) if not b.is_null]
        assert max(positions) // BLOCK < len(live), "a write past the live blocks"
        return {live[p // BLOCK] for p in positions}

    def _check_release(self, rows) -> None:
        written = set().union(*(s.writes for s in self.in_flight)) if self.in_flight else set()
        assert not written & (set(rows) | set(self.released_rows)), (
            f"released rows {sorted(set(rows) | set(self.released_rows))} are written by "
            f"in-flight steps {[s.index for s in self.in_flight]}"
        )

    def update(self) -> None:
        """update_from_output() of the oldest in-flight step."""
        step = self.in_flight.pop(0)
        req = self.req
        req.kv_done += step.tokens
        req.num_output_placeholders -= 1
        req.outputs += 1
        if step.report is not None:
            self.m.set_deferred(req.id, step.report)  # SchedulerSide.apply_worker_meta

    def preempt(self) -> None:
        """Scheduler._preempt_request: blocks freed, counters zeroed, in-flight output
        of the request becomes stale."""
        self.m.free(self.req.id)
        self.req.num_computed_tokens = 0
        self.req.num_output_placeholders = 0
        self.req.kv_done = 0


def _driver() -> OneStepLate:
    pool = BlockPool(num_gpu_blocks=32, enable_caching=False, hash_block_size=BLOCK)
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=1, dtype=torch.float32)
    m = RoutedStageManager(
        stage_spec_from(spec, 1),
        block_pool=pool,
        enable_caching=False,
        kv_cache_group_id=1,
        scheduler_block_size=BLOCK,
    )
    return OneStepLate(m)


def _run(d: OneStepLate, steps: int) -> None:
    """Async order: schedule(k + 1) happens before update_from_output(k)."""
    d.schedule()
    for _ in range(steps - 1):
        d.schedule()
        d.update()


def test_released_blocks_are_never_written_by_an_in_flight_step():
    d = _driver()
    _run(d, 8)
    # the report (6 > planned 4) arrived one step late; the surplus block went back
    assert d.released_rows, "block granularity released nothing"
    assert d.m.get_deferred("r") == ROUTED


def test_preemption_with_a_step_in_flight_releases_nothing_it_writes():
    d = _driver()
    d.schedule()  # prefill in flight
    d.schedule()  # first decode in flight, prefill's report not back yet
    d.preempt()  # the scheduler frees the request while both steps are in flight
    d.update()  # the prefill's stale report: ignored (the request holds no blocks)
    assert d.m.get_deferred("r") == 0
    d.update()
    d.in_flight.clear()  # stale outputs of the preempted request
    _run(d, 6)  # recomputed prefill, routed again, one step late again
    assert d.m.get_deferred("r") == ROUTED


def test_a_kept_turn_holds_only_kv_already_written():
    """The request stops at the output of step k; step k + 1 is already scheduled and
    writes its input token's KV. The turn kept is what completed steps wrote."""
    d = _driver()
    _run(d, 5)
    req = d.req
    assert req.num_output_placeholders == 1  # one step in flight when the stop arrives
    assert req.num_computed_tokens == req.kv_done + 1
    # the same counters on a finished request SchedulerSide keeps: 8 prompt tokens and 3
    # sampled; the last one is the input of the step in flight
    fake = finished_request()
    fake.all_token_ids = fake.all_token_ids[:11]
    fake.num_computed_tokens = 11
    fake.num_output_placeholders = 1
    written = fake.num_computed_tokens - fake.num_output_placeholders
    side = _side()
    assert side.request_finished(fake, ([1, 2, 3],)) is True
    [job] = side.build_meta().turn_saves
    assert job.num_tokens == written == 10  # bd74ee7: 11, one row not yet written
