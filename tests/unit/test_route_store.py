"""RouteStore's lifecycle with kept turns: finished requests are held for the step's turn
save, preempted ones are forgotten at once, and a recomputed decision is never dropped by
a pending release (the soak run's crash: a resumed request lost its state, and its turn
save then read past its compacted pages)."""

from __future__ import annotations

from vllm_recroute.routing import Stage
from vllm_recroute.worker.state import RouteState, RouteStore

STATE = RouteState((Stage(1, 4, 0.5),), (8,), 2)
RECOMPUTED = RouteState((Stage(1, 4, 0.5),), (6,), 2)


def _store():
    gone: list[set[str]] = []
    store = RouteStore(hold_finished=True)
    store.on_forget(gone.append)
    return store, gone


def test_a_finished_request_is_held_until_the_turn_jobs_ran():
    store, gone = _store()
    store.put("r", STATE)
    store.finish(["r"])
    assert store.get("r") == STATE and gone == []
    store.release_held()
    assert store.get("r") is None and gone == [{"r"}]


def test_a_preempted_request_is_forgotten_at_once_and_its_recomputation_kept():
    store, gone = _store()
    store.put("r", STATE)
    store.forget(["r"])  # preempted
    assert store.get("r") is None and gone == [{"r"}]
    store.put("r", RECOMPUTED)  # resumed: routed again
    store.release_held()  # this step's turn jobs
    assert store.get("r") == RECOMPUTED


def test_a_new_decision_supersedes_a_pending_hold():
    store, _ = _store()
    store.put("r", STATE)
    store.finish(["r"])
    store.forget(["r"])  # starts afresh (recomputed prefill)
    store.put("r", RECOMPUTED)
    store.release_held()
    assert store.get("r") == RECOMPUTED
    assert not store.wants_reroute("r")


def test_without_kept_turns_finish_forgets_at_once():
    store = RouteStore(hold_finished=False)
    store.put("r", STATE)
    store.request_reroute("r")
    store.finish(["r"])
    assert store.get("r") is None and store.take_reroutes(["r"]) == set()
