"""Scorers: a contract every registered scorer passes, plus exact checks per scorer."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_recroute.config import RoutingConfigError
from vllm_recroute.routing.scorers import (
    SCORERS,
    AttentionScorer,
    KeyNormScorer,
    ScoreInputs,
    Scorer,
    get_scorer,
    query_indices,
)

HEADS, KV_HEADS, DIM = 4, 2, 8


def _inputs(
    seed: int = 0, tokens: int = 12, visual: tuple[int, ...] = (2, 3, 4, 5, 6, 7)
) -> ScoreInputs:
    g = torch.Generator().manual_seed(seed)
    return ScoreInputs(
        q=torch.randn(tokens, HEADS, DIM, generator=g),
        k=torch.randn(tokens, KV_HEADS, DIM, generator=g),
        visual_idx=torch.tensor(visual, dtype=torch.long),
        query_idx=torch.tensor([tokens - 1], dtype=torch.long),
        scale=1 / math.sqrt(DIM),
    )


ALL_SCORERS = sorted(SCORERS)


@pytest.mark.parametrize("name", ALL_SCORERS)
def test_contract_shape_dtype_finite_deterministic(name: str) -> None:
    scorer = get_scorer(name)
    assert isinstance(scorer, Scorer) and scorer.name == name
    x = _inputs()
    x.q, x.k = x.q.to(torch.bfloat16), x.k.to(torch.bfloat16)  # models run in half precision
    out = scorer.score(x)
    assert out.shape == (6,) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out, scorer.score(x))


@pytest.mark.parametrize("name", ALL_SCORERS)
def test_contract_score_is_per_token(name: str) -> None:
    # a token's score does not depend on which other tokens are labelled visual
    scorer = get_scorer(name)
    full = scorer.score(_inputs())
    x = _inputs()
    x.visual_idx = torch.tensor([3, 6])
    assert torch.allclose(scorer.score(x), full[[1, 4]])


@pytest.mark.parametrize("name", ALL_SCORERS)
def test_contract_no_visual_tokens(name: str) -> None:
    x = _inputs()
    x.visual_idx = torch.zeros(0, dtype=torch.long)
    out = get_scorer(name).score(x)
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.parametrize("name", [n for n in ALL_SCORERS if SCORERS[n].causal])
def test_contract_causal_scorers_ignore_later_tokens(name: str) -> None:
    scorer = get_scorer(name)
    short = _inputs(tokens=8)
    long = _inputs(seed=1, tokens=14)
    long.q[:8], long.k[:8] = short.q, short.k  # same prefix, different and more later tokens
    assert torch.allclose(scorer.score(short), scorer.score(long))


def test_registry_and_unknown_name() -> None:
    assert {"attention": AttentionScorer, "key_norm": KeyNormScorer} == SCORERS
    assert not AttentionScorer.causal and KeyNormScorer.causal
    with pytest.raises(RoutingConfigError) as info:
        get_scorer("magic")
    assert info.value.field == "recroute.scorer"
    assert "attention, key_norm" in str(info.value)


def _naive_attention(x: ScoreInputs) -> list[float]:
    """Hand-written loops: per query, per head, causal softmax; mean over heads and queries."""
    heads, kv_heads = x.q.shape[1], x.k.shape[1]
    totals = [0.0] * x.k.shape[0]
    for i in x.query_idx.tolist():
        for h in range(heads):
            kvh = h // (heads // kv_heads)
            logits = [x.scale * float(x.q[i, h] @ x.k[j, kvh]) for j in range(i + 1)]
            top = max(logits)
            exps = [math.exp(v - top) for v in logits]
            for j, e in enumerate(exps):
                totals[j] += e / sum(exps)
    n = len(x.query_idx) * heads
    return [totals[j] / n for j in x.visual_idx.tolist()]


def test_attention_matches_naive_gqa_loop() -> None:
    x = _inputs(tokens=10, visual=(1, 2, 3, 4))
    x.query_idx = torch.tensor([6, 8, 9])  # question tokens: causal mask matters per query
    got = AttentionScorer().score(x)
    assert torch.allclose(got, torch.tensor(_naive_attention(x)), atol=1e-6)
    # a query before some visual tokens pays them nothing (causal)
    x.query_idx = torch.tensor([2])
    assert AttentionScorer().score(x)[2:].abs().max() == 0


def test_attention_last_token_picks_aligned_key() -> None:
    x = _inputs(seed=3)
    x.k = 0.1 * x.k
    direction = torch.zeros(DIM)
    direction[0] = 1.0
    x.q[-1] = 4.0 * direction  # every head of the last token looks along e0
    x.k[5] = 4.0 * direction  # only visual token #3 (index 5) has a key along e0
    x.query_idx = query_indices(12, x.visual_idx, "last")
    scores = AttentionScorer().score(x)
    assert int(scores.argmax()) == 3


def test_key_norm_exact() -> None:
    x = _inputs()
    x.k[4] = 0.0  # zero key: the highest possible score
    x.k[5] = torch.tensor([3.0, 4.0] + [0.0] * (DIM - 2))  # norm 5 on both kv heads
    scores = KeyNormScorer().score(x)
    assert scores[2] == 0 and scores[3] == pytest.approx(-5.0)
    assert int(scores.argmax()) == 2


def test_query_indices() -> None:
    visual = torch.tensor([1, 2, 3])
    assert query_indices(8, visual, "last").tolist() == [7]
    assert query_indices(8, visual, "question").tolist() == [4, 5, 6, 7]
    # prompt ends with the image: fall back to the last token, never an empty query
    assert query_indices(4, visual, "question").tolist() == [3]
    with pytest.raises(RoutingConfigError, match=r"recroute\.score_query"):
        query_indices(8, visual, "first")


def test_attention_scorer_chunks_its_queries_exactly(monkeypatch):
    """The scorer's [Q, KV, G, T] logits are bounded by chunking the queries
    (SCORE_CHUNK_ELEMENTS, the routed step's largest extra activation): chunked scores
    equal unchunked ones, and the bound is honoured (guard: the chunk really is smaller)."""
    import vllm_recroute.routing.scorers as S

    g = torch.Generator().manual_seed(5)
    t, heads = 50, 4
    q, k = torch.randn(t, heads, 16, generator=g), torch.randn(t, 2, 16, generator=g)
    vis = torch.arange(3, 40)
    inputs = S.ScoreInputs(q, k, vis, torch.arange(40, t), 0.25)
    whole = S.AttentionScorer().score(inputs)
    sizes = []
    real = S._attention_sums
    monkeypatch.setattr(
        S, "_attention_sums", lambda q_, *a: sizes.append(q_.shape[0]) or real(q_, *a)
    )
    monkeypatch.setattr(S, "SCORE_CHUNK_ELEMENTS", 3 * heads * t)
    chunked = S.AttentionScorer().score(inputs)
    assert sizes == [3, 3, 3, 1]
    assert torch.allclose(chunked, whole, atol=1e-7)


def test_scoring_layer_before_or_at_the_router_point():
    from vllm_recroute.routing import scoring_layer

    assert (scoring_layer(3, "before"), scoring_layer(3, "at")) == (2, 3)
    with pytest.raises(RoutingConfigError, match="allowed values: before, at"):
        scoring_layer(3, "after")
