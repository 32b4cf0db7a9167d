"""The decode-time re-routing policy (routing/rerouting.py)."""

from __future__ import annotations

import torch

from vllm_recroute.routing.rerouting import Swap, chunk_units, plan_swaps, unit_scores


def test_chunks_keep_order_and_the_short_tail():
    units = chunk_units(torch.tensor([3, 5, 6, 9, 11]), 2)
    assert [u.tolist() for u in units] == [[3, 5], [6, 9], [11]]
    assert chunk_units(torch.tensor([], dtype=torch.long), 4) == []


def test_unit_scores_share_kv_heads_across_query_heads():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])  # 4 heads
    digests = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[0.0, 0.0], [1.0, 0.0]]])  # 2 kv heads
    # unit 0: heads 0,1 use kv head 0 -> 1, 0; heads 2,3 use kv head 1 -> 2, 0; mean 0.75
    # unit 1: 0, 0, 1, 2 -> mean 0.75
    assert unit_scores(q, digests, 2.0).tolist() == [1.5, 1.5]
    assert unit_scores(q, torch.zeros(0, 2, 2), 1.0).numel() == 0


def test_plan_keeps_the_budget_and_pairs_best_restore_with_worst_evict():
    active = {0: 0.1, 1: 0.9, 2: 0.3}
    parked = {3: 0.8, 4: 0.05, 5: 0.5}
    plan = plan_swaps(active, parked)
    # best three: 1 (0.9), 3 (0.8), 5 (0.5) -> evict 0 (worst) for 3 (best), 2 for 5
    assert plan == [Swap(evict=0, restore=3), Swap(evict=2, restore=5)]
    now = (set(active) - {s.evict for s in plan}) | {s.restore for s in plan}
    assert len(now) == len(active)


def test_a_capped_plan_keeps_the_swaps_that_gain_most():
    active = {0: 0.1, 1: 0.9, 2: 0.3}
    parked = {3: 0.8, 4: 0.05, 5: 0.5}
    assert len(plan_swaps(active, parked)) == 2  # guard: the cap below binds
    assert plan_swaps(active, parked, 1) == [Swap(evict=0, restore=3)]  # best for worst
    assert plan_swaps(active, parked, 0) == []
    assert plan_swaps(active, parked, 5) == plan_swaps(active, parked)


def test_plan_is_empty_when_the_active_set_is_already_best_and_ties_go_to_lower_ids():
    assert plan_swaps({0: 1.0, 1: 2.0}, {2: 0.5}) == []
    assert plan_swaps({5: 1.0}, {2: 1.0}) == [Swap(evict=5, restore=2)]
    assert plan_swaps({}, {1: 3.0}) == []
