"""Tensor parallelism at the worker boundary, on two real gloo ranks in two processes.

Each rank holds half of the attention heads, as under ``--tensor-parallel-size 2``. With
the reduction (worker/tp.py) both ranks take the decision the unsharded model takes;
without it they take different ones (the guard), and the decision check turns that into
a clear error.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HEADS, KV_HEADS, DIM, T = 4, 2, 16, 40
VISUAL = torch.arange(4, 36)
KEEP = 8


def _full_inputs():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(T, HEADS, DIM, generator=g)
    k = torch.randn(T, KV_HEADS, DIM, generator=g)
    # make the heads disagree: shard 0 and shard 1 prefer different tokens
    k[4:20, 0] *= 3.0
    k[20:36, 1] *= 3.0
    return q, k


def _shard(q, k, rank):
    hq, hk = HEADS // 2, KV_HEADS // 2
    return q[:, rank * hq : (rank + 1) * hq], k[:, rank * hk : (rank + 1) * hk]


def _decide(scores):
    from vllm_recroute.routing import route_request

    return route_request(scores, KEEP, "reroute", None)


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    from vllm_recroute.routing import SCORERS, ScoreInputs, query_indices
    from vllm_recroute.routing.rerouting import unit_scores
    from vllm_recroute.worker.tp import DecisionCheck, RankDivergence, TPGroup

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)

    def all_reduce_sum(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    def all_gather(t):
        parts = [torch.empty_like(t) for _ in range(2)]
        dist.all_gather(parts, t.contiguous())
        return torch.stack(parts)

    group = TPGroup(2, all_reduce_sum, all_gather)
    q, k = _shard(*_full_inputs(), rank)
    result = {}
    for name, cls in SCORERS.items():
        x = ScoreInputs(q, k, VISUAL, query_indices(T, VISUAL, "question"), DIM**-0.5)
        local = cls().score(x)
        result[name] = (_decide(local), _decide(group.mean(local)), group.mean(local))
    digests = torch.randn(6, KV_HEADS // 2, DIM, generator=torch.Generator().manual_seed(rank))
    result["units"] = group.mean(unit_scores(q[-1], digests, DIM**-0.5))
    check = DecisionCheck(group)
    check.verify(3, ["r"], [result["attention"][1]])  # reduced: agrees, no error
    try:
        check.verify(3, ["r"], [result["attention"][0]])  # unreduced: diverges
        result["diverged"] = None
    except RankDivergence as err:
        result["diverged"] = str(err)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    mp.start_processes(
        _rank_main, args=(str(tmp / "init"), str(tmp)), nprocs=2, start_method="spawn"
    )
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("scorer", ["attention", "key_norm"])
def test_reduced_scores_are_the_unsharded_models_on_every_rank(ranks, scorer):
    from vllm_recroute.routing import SCORERS, ScoreInputs, query_indices

    q, k = _full_inputs()
    x = ScoreInputs(q, k, VISUAL, query_indices(T, VISUAL, "question"), DIM**-0.5)
    full = SCORERS[scorer]().score(x)
    for r in ranks:
        _, reduced_mask, reduced = r[scorer]
        torch.testing.assert_close(reduced, full, rtol=1e-5, atol=1e-6)
        assert torch.equal(reduced_mask, _decide(full))


def test_guard_without_the_reduction_ranks_decide_differently(ranks):
    local0, local1 = ranks[0]["attention"][0], ranks[1]["attention"][0]
    assert not torch.equal(local0, local1)


def test_parked_unit_scores_agree_across_ranks(ranks):
    torch.testing.assert_close(ranks[0]["units"], ranks[1]["units"])


def test_divergent_decisions_are_a_clear_error(ranks):
    for r in ranks:
        assert r["diverged"] is not None and "different routing decisions" in r["diverged"]
