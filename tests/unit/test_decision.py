"""Routing decisions: exact masks for token and block granularity, ties, remove mode."""

from __future__ import annotations

import pytest
import torch

from vllm_recroute.routing.decision import route_request, select_active


def _mask(*bits: int) -> list[bool]:
    return [bool(b) for b in bits]


SCORES = torch.tensor([0.1, 0.9, 0.3, 0.7, 0.5, 0.2])


def test_token_top_k() -> None:
    assert select_active(SCORES, 3).tolist() == _mask(0, 1, 0, 1, 1, 0)
    assert select_active(SCORES, 1).tolist() == _mask(0, 1, 0, 0, 0, 0)


def test_token_ties_lower_index_first() -> None:
    scores = torch.tensor([0.5, 0.8, 0.5, 0.5, 0.8])
    assert select_active(scores, 3).tolist() == _mask(1, 1, 0, 0, 1)
    assert select_active(torch.zeros(6), 2).tolist() == _mask(1, 1, 0, 0, 0, 0)


def test_token_candidates() -> None:
    cand = torch.tensor(_mask(1, 0, 1, 1, 0, 1))
    assert select_active(SCORES, 2, candidates=cand).tolist() == _mask(0, 0, 1, 1, 0, 0)
    # k_keep larger than the candidates: only the candidates, never a non-candidate
    assert select_active(SCORES, 5, candidates=cand).tolist() == cand.tolist()
    assert not select_active(SCORES, 3, candidates=torch.zeros(6, dtype=torch.bool)).any()


def test_k_keep_all_and_zero() -> None:
    assert select_active(SCORES, 6).all()
    assert select_active(SCORES, 100).all()
    assert not select_active(SCORES, 0).any()
    blocks = torch.tensor([0, 0, 1, 1, 2, 2])
    assert select_active(SCORES, 6, block_ids=blocks).all()


def test_nan_scores_rank_last() -> None:
    scores = torch.tensor([float("nan"), 0.1, 0.2])
    assert select_active(scores, 2).tolist() == _mask(0, 1, 1)


# blocks: 0 -> tokens 0-1, 1 -> tokens 2-4, 2 -> token 5 (partial blocks at the image edges)
BLOCKS = torch.tensor([0, 0, 1, 1, 1, 2])
BLOCK_SCORES = torch.tensor([0.2, 0.6, 0.5, 0.5, 0.5, 0.55])


def test_block_max_and_mean() -> None:
    # max: block0 0.6, block1 0.5, block2 0.55 -> order 0, 2, 1
    got = select_active(BLOCK_SCORES, 3, block_ids=BLOCKS, block_reduce="max")
    assert got.tolist() == _mask(1, 1, 0, 0, 0, 1)
    # mean: block0 0.4, block1 0.5, block2 0.55 -> order 2, 1, 0
    got = select_active(BLOCK_SCORES, 4, block_ids=BLOCKS, block_reduce="mean")
    assert got.tolist() == _mask(0, 0, 1, 1, 1, 1)


def test_block_stops_at_first_block_that_does_not_fit() -> None:
    # max order 0 (2 tokens), 2 (1), 1 (3): k=4 takes blocks 0 and 2, block 1 would make 6
    got = select_active(BLOCK_SCORES, 4, block_ids=BLOCKS)
    assert got.tolist() == _mask(1, 1, 0, 0, 0, 1)
    # mean order 2, 1, 0: k=3 takes block 2 (1 token) and stops before block 1 (would be 4)
    got = select_active(BLOCK_SCORES, 3, block_ids=BLOCKS, block_reduce="mean")
    assert got.tolist() == _mask(0, 0, 0, 0, 0, 1)


def test_block_at_least_one_block() -> None:
    scores = torch.tensor([0.1, 0.1, 0.9, 0.9, 0.9, 0.1])
    got = select_active(scores, 1, block_ids=BLOCKS)  # best block has 3 tokens > k_keep
    assert got.tolist() == _mask(0, 0, 1, 1, 1, 0)


def test_block_ties_lower_block_id_first() -> None:
    blocks = torch.tensor([4, 4, 7, 7, 9, 9])  # ids need not be contiguous
    assert select_active(torch.ones(6), 2, block_ids=blocks).tolist() == _mask(1, 1, 0, 0, 0, 0)
    assert select_active(torch.ones(6), 4, block_ids=blocks).tolist() == _mask(1, 1, 1, 1, 0, 0)


def test_block_candidates() -> None:
    # token 1 is not a candidate: block 0 is scored by token 0 only and token 1 stays inactive
    cand = torch.tensor(_mask(1, 0, 1, 1, 1, 1))
    got = select_active(BLOCK_SCORES, 2, candidates=cand, block_ids=BLOCKS)
    # max: block0 0.2 (1 cand), block1 0.5 (3), block2 0.55 (1) -> order 2, 1, 0
    assert got.tolist() == _mask(0, 0, 0, 0, 0, 1)
    got = select_active(BLOCK_SCORES, 5, candidates=cand, block_ids=BLOCKS)
    assert got.tolist() == _mask(1, 0, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="block_reduce"):
        select_active(BLOCK_SCORES, 2, block_ids=BLOCKS, block_reduce="sum")


def test_route_request_reroute_vs_remove() -> None:
    first = route_request(SCORES, 3, "remove", None)
    assert first.tolist() == _mask(0, 1, 0, 1, 1, 0)
    # scores change at the next router point: token 0 is now the best
    later = torch.tensor([0.95, 0.9, 0.3, 0.7, 0.5, 0.2])
    # reroute: the deferred token 0 comes back
    assert route_request(later, 2, "reroute", first).tolist() == _mask(1, 1, 0, 0, 0, 0)
    # remove: only previously active tokens compete
    assert route_request(later, 2, "remove", first).tolist() == _mask(0, 1, 0, 1, 0, 0)
    # remove never re-activates, even when k_keep exceeds the survivors
    assert route_request(later, 5, "remove", first).tolist() == first.tolist()
    got = route_request(later, 2, "remove", first, block_ids=BLOCKS, block_reduce="mean")
    assert got.tolist() == _mask(0, 1, 0, 0, 0, 0)  # block0 (token 1 only) 0.9 fits, block1 not
    with pytest.raises(ValueError, match="mode"):
        route_request(SCORES, 2, "off", None)


# ---------------------------------------------- brakes on returning tokens (issue 25)

# tokens 0-1 were active; 2-3 deferred and now score higher
BRAKE_SCORES = torch.tensor([1.0, 0.5, 1.2, 0.9])
BRAKE_PREV = torch.tensor([True, True, False, False])


def _ids(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


def _braked(k: int, incumbency: float = 0.0, max_returners: int | None = None) -> list[int]:
    return _ids(route_request(BRAKE_SCORES, k, "reroute", BRAKE_PREV, incumbency=incumbency,
                              max_returners=max_returners))  # fmt: skip


def test_no_brake_is_todays_reroute() -> None:
    assert _braked(2) == [0, 2] == _ids(route_request(BRAKE_SCORES, 2, "reroute", BRAKE_PREV))


def test_incumbency_margin() -> None:
    # 1.2 beats 1.0 * 1.1 but not 1.0 * 1.5; 0.9 beats 0.5 * 1.5 but not 0.5 * 2
    assert _braked(2, incumbency=0.1) == [0, 2]
    assert _braked(2, incumbency=0.5) == [0, 2]  # 1.2 > 0.5 * 1.5 = 0.75: token 1 goes
    assert _braked(2, incumbency=1.5) == [0, 1]  # 1.2 < 0.5 * 2.5
    assert _braked(2, incumbency=float("inf")) == [0, 1]  # the active set stays: remove-like
    assert _braked(3, incumbency=float("inf")) == [0, 1, 2]  # a larger stage still fills up


def test_max_returners() -> None:
    assert _braked(2, max_returners=0) == [0, 1]
    assert _braked(3, max_returners=0) == [0, 1, 2]  # the slot incumbents cannot fill
    assert _braked(4, max_returners=1) == [0, 1, 2, 3]
    scores = torch.tensor([0.1, 0.2, 0.9, 0.8, 0.7])
    prev = torch.tensor([True, True, False, False, False])
    got = route_request(scores, 2, "reroute", prev, max_returners=1)
    assert _ids(got) == [1, 2]  # one returner (the best), then the best incumbent


def test_brakes_apply_to_reroute_after_the_first_router_point_only() -> None:
    first = route_request(BRAKE_SCORES, 2, "reroute", None, incumbency=9.0, max_returners=0)
    assert _ids(first) == [0, 2]  # nobody is an incumbent at the first router point
    removed = route_request(BRAKE_SCORES, 2, "remove", BRAKE_PREV, incumbency=9.0)
    assert _ids(removed) == [0, 1]
    with pytest.raises(ValueError, match="route tokens, not blocks"):
        route_request(BRAKE_SCORES, 2, "reroute", BRAKE_PREV, block_ids=torch.arange(4),
                      max_returners=1)  # fmt: skip
